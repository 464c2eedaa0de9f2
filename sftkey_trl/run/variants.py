"""The arms of the comparison, each exactly what its label says, and how one arm is run for one seed.

Every arm derives from the recipe's first `loss_on: completion` stage (stage 1) and first `loss_on: key` stage
(stage 2). Arms that share a folder share stage 1 (trained once per seed); compute is recorded per arm in optimizer
steps and trained tokens.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import SFTKeyError
from ..recipe.schema import Recipe
from ..train.objectives import Stage
from ..train.steps import optimizer_steps, stage_training_args

MATCHED = "sft_tag_matched"
PAPER = "sftkey_tag"
KEY_WEIGHT = 5.0  # the answer emphasis of the key_weight arms
KEY_WEIGHT_SWEEP = re.compile(r"sft_keyweight_(\d+(?:\.\d+)?)")  # `sft_keyweight_10`: sft_keyweight at weight 10


def swept_key_weights(names: list[str]) -> list[float]:
    """The weights asked for by `sft_keyweight_<weight>` names (a sweep: one arm per weight)."""
    return [float(match[1]) for name in names if (match := KEY_WEIGHT_SWEEP.fullmatch(name))]


@dataclass(frozen=True)
class Variant:
    """One arm: a run folder, a response format, its stages, and what it is in words. `match_steps_of`: the stages
    whose optimizer steps its single stage takes in total (the compute-matched baseline's `max_steps`)."""

    name: str
    folder: str
    response_format: str
    stages: tuple[Stage, ...]
    description: str
    match_steps_of: tuple[Stage, ...] | None = None


def _settings(stage: Stage, args) -> str:
    length = f"{args.max_steps} steps" if args.max_steps and args.max_steps > 0 else f"{args.num_train_epochs:g} ep"
    if stage.patience is not None:
        return f"to convergence: patience {stage.patience}, at most {length}, lr {args.learning_rate:g}"
    return f"{length}, lr {args.learning_rate:g}" + (", keeping its best checkpoint" if stage.keep_best else "")


def build_variants(
    recipe: Recipe, converge: tuple[int, float] | None = None, key_weights: list[float] = ()
) -> dict[str, Variant]:
    """Every arm of the comparison, described from its stages' own `Stage.summary` and settings. Stage 1 keeps the
    recipe's `keep_best`/`patience`; `converge` = (patience, max epochs) trains it to convergence instead (the
    paper's protocol); `key_weights` adds one `sft_keyweight_<weight>` arm per weight."""
    stages, training_args, recipe_format = recipe.stages, recipe.training, recipe.script.response_format
    first = next((s for s in stages if s.loss_on == "completion"), None)
    second = next((s for s in stages if s.loss_on == "key"), None)
    if first is None or second is None:
        raise SFTKeyError("compare.py needs a recipe with a `loss_on: completion` stage and a `loss_on: key` stage")

    def args_of(stage: Stage):
        return stage_training_args(training_args, stage, "unused")

    # Stage 1 as the recipe writes it, its own convergence (keep_best + patience) included
    own = {"keep_best": first.keep_best, "patience": first.patience, "overrides": dict(first.overrides)}
    if converge is not None:
        patience, epochs = converge
        own = {"keep_best": True, "patience": patience, "overrides": {**own["overrides"], "num_train_epochs": epochs}}
    sft = Stage(name="sft", loss_on="completion", **own)
    key = Stage(name="key", loss_on="key", overrides=dict(second.overrides))  # the paper's: hard mask, no keep_best
    continued = Stage(name="continue", loss_on="completion", overrides=dict(second.overrides))
    epochs_2, lr_1 = args_of(second).num_train_epochs, args_of(first).learning_rate
    key_from_base = Stage(name="key", loss_on="key", overrides={**first.overrides, "num_train_epochs": epochs_2})

    def form(suffix: str, **changes) -> tuple[Stage, Stage]:  # a stage-2 form on the shared stage 1
        return sft, dataclasses.replace(key, name=f"key_{suffix}", **changes)

    weighted = dataclasses.replace(sft, key_weight=KEY_WEIGHT)
    # (name, folder, response format, stages, what the stages' own words do not say)
    arms = [
        ("sft", "plain", "plain", (sft,), "stage 1 only"),
        ("sft_tag", "tags", "tags", (sft,), "stage 1 only"),
        ("key_tag", "key_only", "tags", (key_from_base,), "from the base model"),
        (PAPER, "tags", "tags", (sft, key), "the paper's key stage: hard mask, no keep_best"),
        ("sft_continue", "tags", "tags", (sft, continued), "stage 2 with the key stage's steps and schedule"),
        (MATCHED, "matched", "tags", (Stage(name="sft", loss_on="completion", overrides=dict(first.overrides)),),
         f"as many optimizer steps as {PAPER}'s two stages (one schedule)"),
        ("recipe", "recipe", recipe_format, tuple(copy.deepcopy(stages)), "the recipe's stages, exactly as written"),
        ("sft_keyweight", "keyweight", "tags", (weighted,), "one stage: sft_tag's compute"),
        ("sft_continue_keyweight", "tags", "tags",
         (sft, dataclasses.replace(continued, name="continue_keyweight", key_weight=KEY_WEIGHT)), "the same compute"),
        ("sftkey_tag_norm", "tags", "tags", form("norm", loss_normalization="completion_tokens"), ""),
        ("sftkey_tag_mix", "tags", "tags", form("mix", reasoning_weight=0.1), ""),
        ("sftkey_tag_dft", "tags", "tags", form("dft", overrides={**key.overrides, "loss_type": "dft"}),
         "DFT on the key tokens: each token's loss scaled by its own probability (loss_type: dft)"),
        ("sftkey_tag_best", "tags", "tags", form("best", keep_best=True), "the incoming weights included"),
        ("sftkey_tag_detached", "tags", "tags", form("detached", context="detached"), "no gradient into the prefix"),
        ("sftkey_tag_stage1_lr", "tags", "tags", form("stage1_lr", overrides={**key.overrides, "learning_rate": lr_1}),
         "stage 2 at stage 1's learning rate"),
    ]  # fmt: skip
    arms += [
        (f"sft_keyweight_{w:g}", f"keyweight_{w:g}", "tags", (dataclasses.replace(sft, key_weight=w),), "")
        for w in key_weights
    ]
    matched = {MATCHED: (sft, key)}
    return {
        name: Variant(name, folder, layout, arm, _describe(layout, arm, args_of, note), matched.get(name))
        for name, folder, layout, arm, note in arms
    }


def _describe(response_format: str, stages: tuple[Stage, ...], args_of, note: str) -> str:
    """An arm in words: its format, each stage's objective (`Stage.summary`) and settings, then `note`."""
    parts = [f"{stage.summary} [{_settings(stage, args_of(stage))}]" for stage in stages]
    return f"{response_format}: " + ", then ".join(parts) + (f"; {note}" if note else "")


DEFAULT_VARIANTS = ["sft", "sft_tag", "key_tag", PAPER, "sft_continue", MATCHED]
# The arms `build_variants` builds, in its order, for `--help` without a recipe (a test checks they agree)
VARIANT_NAMES = (
    "sft", "sft_tag", "key_tag", PAPER, "sft_continue", MATCHED, "recipe", "sft_keyweight", "sft_continue_keyweight",
    "sftkey_tag_norm", "sftkey_tag_mix", "sftkey_tag_dft", "sftkey_tag_best", "sftkey_tag_detached",
    "sftkey_tag_stage1_lr",
)  # fmt: skip


def planned_steps(stages: tuple[Stage, ...], training_args, num_rows: int, processes: int) -> int:
    """Optimizer steps the stages take in total over `num_rows` training rows."""
    return sum(
        optimizer_steps(stage_training_args(training_args, stage, "unused", processes), num_rows, processes)
        for stage in stages
    )


def kept_per_example(stage_dir: Path, answer_type: str) -> dict:
    """`{"per_example": ...}` rebuilt from a stage's `predictions.jsonl` (a run finished before results.json kept
    per-example values); empty when the stage kept no predictions."""
    from ..evaluation.metrics import summarise

    path = stage_dir / "predictions.jsonl"
    if not path.exists():
        return {}
    predictions = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {"per_example": summarise(predictions, answer_type)["per_example"]} if predictions else {}


def run_variant(variant: Variant, seed: int, recipe: Recipe, root: Path, steps_to_match: int | None = None) -> dict:
    """Train and evaluate one arm with one seed; return its last stage's metrics plus `optimizer_steps` and
    `train_tokens` over its stages. A matched arm takes `steps_to_match` steps (else the target's planned ones)."""
    from .pipeline import Pipeline

    recipe = copy.deepcopy(dataclasses.replace(recipe, stages=list(variant.stages)))
    recipe.script.response_format = variant.response_format
    recipe.training.seed = seed
    recipe.training.output_dir = str(root / f"seed{seed}" / variant.folder)
    recipe.training.restart_from = None
    pipeline = Pipeline(recipe, one_run=False)  # arms share a folder's stage 1: its other stages are other arms'
    if variant.match_steps_of is not None:
        if steps_to_match is None:
            rows, processes = len(pipeline.data.train), pipeline.state.num_processes
            steps_to_match = planned_steps(variant.match_steps_of, recipe.training, rows, processes)
        recipe.stages[0].overrides["max_steps"] = steps_to_match
    results = pipeline.run()
    trained = [results["stages"][stage.name].get("training", {}) for stage in recipe.stages]
    last = recipe.stages[-1].name
    record = dict(results["stages"][last])
    record.pop("training", None)
    if "num_examples" in record and "per_example" not in record:  # evaluated before per-example values were kept
        record.update(kept_per_example(Path(recipe.training.output_dir) / last, results.get("answer_type", "math")))
    record["optimizer_steps"] = sum(t.get("optimizer_steps", 0) for t in trained)
    record["train_tokens"] = sum(t.get("train_tokens", 0) for t in trained)
    return record
