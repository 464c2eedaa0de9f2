"""`push_to_hub` for a multi-stage run: one stage (the last, or `hub_stage`) is pushed once, after the run, as an
adapter, merged (`hub_merge: true`) or as full weights, with a model card (its settings: `checks.check_push`). The
Trainer's own push, which would fire for every stage and checkpoint, is off per stage (`Pipeline.stage_args`)."""

from __future__ import annotations

import logging
from pathlib import Path

from ..recipe.schema import Recipe
from .card import model_card
from .export import merge_stage, stage_folder

logger = logging.getLogger(__name__)

# Never uploaded from a stage folder: Trainer checkpoints, the merged copy, evaluation outputs, temporary files
IGNORE = ["checkpoints/**", "merged/**", "predictions.jsonl", ".*"]


def push_run(recipe: Recipe) -> str:
    """Push the chosen stage of a finished run with its model card (also written to `<folder>/README.md`).
    Returns the repository URL."""
    from huggingface_hub import HfApi

    training_args = recipe.training
    stage = training_args.hub_stage or recipe.stages[-1].name
    folder = stage_folder(training_args.output_dir, stage, [s.name for s in recipe.stages])
    form = "adapter" if (folder / "adapter_config.json").exists() else "full"
    if form == "adapter" and training_args.hub_merge:
        folder, form = merge_stage(folder, recipe.model, training_args), "merged"
    repo = training_args.hub_model_id or Path(training_args.output_dir).name  # under the token's account, as Trainer
    api = HfApi(token=training_args.hub_token)
    url = api.create_repo(repo, private=training_args.hub_private_repo, exist_ok=True)
    model_card(folder, stage, form, url.repo_id, recipe).save(folder / "README.md")  # loads `user/name` as created
    api.upload_folder(
        repo_id=url.repo_id,
        folder_path=str(folder),
        commit_message=f"SFTKey: stage {stage} ({form})",
        revision=training_args.hub_revision,
        ignore_patterns=IGNORE,
    )
    logger.info("pushed stage %s (%s) with its model card %s to %s", stage, form, folder / "README.md", url)
    return str(url)
