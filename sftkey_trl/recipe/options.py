"""TRL / transformers options that SFTKey's own data path and loss would drop: refused in one line (recipe-wide or
in a stage), and those with no effect on the loss or the data: noted."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from ..errors import SFTKeyError
from ..files import plain
from ..train.objectives import LOSS_TYPES, Stage
from ..train.steps import stage_training_args

_BY_GENERATION = (
    "SFTKey evaluates by generating answers (`eval_after_stages`; a stage's `keep_best` every `eval_steps`), "
    "never by an eval loss; remove it"
)
# TRL / transformers options whose effect SFTKey's data path or loss would drop: (key, refused when, why and the fix)
UNSUPPORTED_OPTIONS = (
    ("loss_type", lambda v: v not in LOSS_TYPES,
     f"the per-token loss is one of {LOSS_TYPES} (TRL reads the deprecated `chunked_nll` as `nll`); use one of them"),
    ("label_smoothing_factor", lambda v: float(v) > 0,
     "label smoothing needs the full-vocabulary logits that TRL's fused LM head never builds; set it to 0"),
    ("packing", bool,
     "SFTKey collates whole examples with their stage masks; use `padding_free: true` (flash-attention) instead"),
    ("completion_only_loss", lambda v: v is False,
     "the stages choose the trained tokens (`loss_on`) and the prompt is never one of them; remove it"),
    ("assistant_only_loss", bool,
     "the stages choose the trained tokens (`loss_on: completion` is the assistant's reply); remove it"),
    ("dataset_text_field", lambda v: v != "text",
     "SFTKey renders each example from its question, reasoning and answer; set `question_field`, "
     "`reasoning_field` and `answer_field` instead"),
    ("chat_template_path", lambda v: v is not None,
     "TRL would swap the template after SFTKey rendered the data; set `chat_template` (Jinja text or a .jinja file)"),
    ("truncation_mode", lambda v: v == "keep_end",
     "SFTKey never truncates (a longer example is reported as `key_truncated`); remove it and raise `max_length`"),
    ("model_init_kwargs", bool,
     "SFTKey loads the model itself; use the model keys (`dtype`, `attn_implementation`, `model_revision`, ...)"),
    ("resume_from_checkpoint", lambda v: v is not None,
     "SFTKey resumes a killed stage from its last complete checkpoint by itself (`<output_dir>/<stage>/checkpoints`); "
     "rerun the same command instead"),
    ("eval_strategy", lambda v: plain(v) != "no", _BY_GENERATION),
    ("eval_on_start", bool, _BY_GENERATION),
    ("liger_kernel_config", lambda v: bool((v or {}).get("fused_linear_cross_entropy")),
     "Liger's fused linear cross-entropy replaces the forward that carries TRL's fused LM head; remove it "
     "(`use_liger_kernel: true` alone still applies Liger's layer kernels)"),
)  # fmt: skip
# Options with no effect on SFTKey's loss or data: a note, not an error
IGNORED_OPTIONS = (
    ("dataset_num_proc", lambda v: v is not None, "SFTKey tokenises the data once itself"),
    ("dataset_kwargs", bool, "SFTKey tokenises the data itself and always skips TRL's preparation"),
    ("shuffle_dataset", bool, "the Trainer's sampler already shuffles the examples every epoch"),
    ("eval_packing", bool, "SFTKey evaluates by generation, never by an eval loss"),
    ("pad_token", lambda v: v is not None, "SFTKey pads with the tokenizer's pad token (else EOS), never trained on"),
)


def check_trainer_options(training_args, stages: list[Stage]) -> list[str]:
    """TRL / transformers options that SFTKey's own data path and loss would silently drop are refused (recipe-wide
    or in a stage); options with no effect on the loss or the data are noted. Returns the notes."""
    notes: list[str] = []
    output_dir = Path(training_args.output_dir)
    for stage in stages:
        args = stage_training_args(training_args, stage, str(output_dir / stage.name))
        for key, refused, why in UNSUPPORTED_OPTIONS:
            value = getattr(args, key)
            if refused(value):
                where = f"stage `{stage.name}`: " if key in stage.overrides else ""
                raise SFTKeyError(f"{where}`{key}: {plain(value)}` is not supported: {why}")
        for key, ignored, why in IGNORED_OPTIONS:
            note = f"`{key}` has no effect: {why}"
            if ignored(getattr(args, key)) and note not in notes:
                notes.append(note)
        if args.use_liger_kernel and importlib.util.find_spec("liger_kernel") is None:
            raise SFTKeyError(
                "`use_liger_kernel: true` needs liger-kernel: `pip install liger-kernel`, or set it to false"
            )
    sharded = _sequence_parallel_sizes(training_args)
    if sharded:
        raise SFTKeyError(
            f"{sharded} splits each sequence across GPUs, but not SFTKey's per-token stage weights; launch without "
            "sequence/context parallelism (DDP, ZeRO or FSDP shard the batch or the weights instead)"
        )
    return notes


def _sequence_parallel_sizes(training_args) -> str:
    """'`sp_size: 2`' / '`cp_size: 2`' when the training arguments or the accelerate launch shard sequences."""
    config = training_args.parallelism_config
    sizes = {}
    for name in ("sp_size", "cp_size"):
        value = config.get(name) if isinstance(config, dict) else getattr(config, name, None)
        if value is None and os.environ.get("ACCELERATE_USE_PARALLELISM_CONFIG", "").lower() == "true":
            value = os.environ.get(f"PARALLELISM_CONFIG_{name.upper()}")
        if value is not None and int(value) > 1:
            sizes[name] = int(value)
    return ", ".join(f"`{name}: {value}`" for name, value in sizes.items())
