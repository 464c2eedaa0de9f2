"""Export a LoRA or QLoRA stage as a standalone model: the adapter merged into its base with peft's
`merge_and_unload`, saved with the stage's tokenizer, chat template and stop tokens.

    python recipes/run.py --config recipes/<...>.yaml --merge key [--merge_dir DIR]
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

from ..errors import SFTKeyError, first_line
from ..files import discard, write_folder
from ..recipe.folders import check_merge_folder
from ..train.distributed import native_bf16
from .plan import missing_weights

logger = logging.getLogger(__name__)


def merge_dtype(model_args) -> str:
    """The dtype the base is loaded in for merging: the recipe's `dtype`; for QLoRA bf16 where supported, else
    float32 (merging into 4-bit weights would round the adapter away, as peft documents); else the checkpoint's."""
    if model_args.dtype in ("bfloat16", "float16", "float32"):
        return model_args.dtype
    if model_args.load_in_4bit or model_args.load_in_8bit:
        return "bfloat16" if native_bf16() else "float32"
    return "auto"


def stage_folder(output_dir: str | Path, stage: str, stage_names: list[str]) -> Path:
    """`<output_dir>/<stage>/`, checked to be a stage of the recipe that has been trained."""
    if stage not in stage_names:
        raise SFTKeyError(f"`{stage}` is not a stage of this recipe; stages are {stage_names}")
    folder = Path(output_dir) / stage
    if not (folder / "adapter_config.json").exists() and not (folder / "config.json").exists():
        raise SFTKeyError(f"stage `{stage}` has not been trained in {output_dir}; run the recipe first")
    if gone := missing_weights(folder):
        raise SFTKeyError(f"stage `{stage}` cannot be merged: {gone}; rerun the recipe to train it again")
    return folder


def merge_stage(stage_dir: Path, model_args, training_args, merge_dir: str | Path | None = None) -> Path:
    """Merge the adapter saved in `stage_dir` into its base and save a standalone model (default:
    `<stage_dir>/merged`, which goes away with the stage when it is retrained). Returns the folder. `merge_dir` must
    not exist yet or hold an earlier merge, which is replaced (`recipe.folders.check_merge_folder`, checked before
    the model is loaded)."""
    from ..evaluation.generation import stop_token_ids
    from ..train.modeling import load_model

    if not (stage_dir / "adapter_config.json").exists():
        raise SFTKeyError(
            f"{stage_dir} holds full weights, not an adapter: it is already a standalone model; use it as it is"
        )
    merge_dir = Path(merge_dir) if merge_dir else stage_dir / "merged"
    check_merge_folder(merge_dir)
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(stage_dir))  # carries the chat template the stage trained with
    except (OSError, ValueError) as error:  # a tokenizer file truncated or not JSON
        raise SFTKeyError(
            f"stage `{stage_dir.name}` cannot be merged: its tokenizer in {stage_dir} cannot be read "
            f"({first_line(error)}); restore the stage folder, or rerun with `--restart_from {stage_dir.name}`"
        ) from None
    unquantized = copy.copy(model_args)
    unquantized.load_in_4bit = unquantized.load_in_8bit = False
    unquantized.dtype = merge_dtype(model_args)
    model = load_model(unquantized, training_args, stage_dir, purpose="merge").merge_and_unload()
    # `generate` then stops at the end-of-turn token the stage learned to emit, as the evaluation did
    model.generation_config.eos_token_id = stop_token_ids(tokenizer, training_args.eos_token or tokenizer.eos_token)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    with write_folder(merge_dir, kind="merge") as tmp:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        discard(merge_dir, kinds=["merge"])  # an earlier merge is replaced, not merged into
    logger.info(
        "merged %s into %s (%s): %s", stage_dir.name, model_args.model_name_or_path, unquantized.dtype, merge_dir
    )
    return merge_dir
