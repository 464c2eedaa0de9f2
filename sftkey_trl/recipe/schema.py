"""The recipe's keys: thin layers over TRL's `SFTConfig` and `ModelConfig`, read by `trl.TrlParser`."""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trl import ModelConfig, SFTConfig

from ..data.adapters import ADAPTERS
from ..data.formatting import RESPONSE_FORMATS, Tags
from ..evaluation.answers import ANSWER_TYPES
from ..train.objectives import OBJECTIVES, Stage

DEMO_RECIPE = "recipes/demo/sftkey_tiny.yaml"  # run.py with no --config
COMPARE_DEMO_RECIPE = "recipes/demo/remainder.yaml"  # compare.py with no --config: a task with headroom


def bundled_recipe(name: str) -> Path:
    """A recipe the project ships (`recipes/...`): the checkout's file when the package runs from one, else the copy
    an installed package carries in `sftkey_trl/recipes/` (pyproject's package-dir), so that `sftkey-trl train` with
    no --config finds the demo after `pip install`."""
    relative = Path(name).relative_to("recipes")
    package = Path(__file__).resolve().parents[1]
    checkout = package.parent / "recipes" / relative
    return checkout if checkout.is_file() else package / "recipes" / relative


PAPER_STAGES = [{"name": "sft", "loss_on": "completion"}, {"name": "key", "loss_on": "key"}]
# Recipe keys with a fixed set of values (None: unset, the adapter decides)
CHOICES = {
    "response_format": RESPONSE_FORMATS,
    "on_invalid": ("error", "skip"),
    "eval_backend": ("hf", "vllm"),
    "answer_type": (None, *ANSWER_TYPES),
}


@dataclass
class SFTKeyScriptArguments:
    """Data, formatting and evaluation settings (everything that is not a training argument or the model)."""

    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Hub id, local .jsonl/.json/.parquet/.csv file, or a demo task: `demo:arithmetic`, "
            "`demo:remainder`, `demo:word_problems`."
        },
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Dataset config name (hub datasets)."})
    dataset_split: str | None = field(default=None, metadata={"help": "Training split (default: the adapter's)."})
    dataset_format: str = field(
        default="generic",
        metadata={"help": f"Adapter: {', '.join(ADAPTERS)}."},
    )
    question_field: str = field(default="question", metadata={"help": "generic adapter: question column."})
    reasoning_field: str = field(default="reasoning", metadata={"help": "generic adapter: reasoning column."})
    answer_field: str = field(default="answer", metadata={"help": "generic adapter: answer column."})
    answer_type: str | None = field(
        default=None, metadata={"help": f"{', '.join(CHOICES['answer_type'][1:])} (default: the adapter's)."}
    )
    eval_dataset_name: str | None = field(default=None, metadata={"help": "Evaluation dataset (id or local file)."})
    eval_dataset_config: str | None = field(default=None, metadata={"help": "Evaluation dataset config name."})
    eval_split: str | None = field(default=None, metadata={"help": "Evaluation split (default: the adapter's)."})
    eval_fraction: float = field(default=0.0, metadata={"help": "Hold out this fraction of train for evaluation."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use at most this many training rows."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Evaluate on at most this many rows."})
    response_format: str = field(default="tags", metadata={"help": "tags (<Thinking>/<Answer>) or plain."})
    thinking_open: str = Tags.thinking_open
    thinking_close: str = Tags.thinking_close
    answer_open: str = Tags.answer_open
    answer_close: str = Tags.answer_close
    answer_template: str = field(
        default="The answer is {answer}.", metadata={"help": "plain format: the final answer line."}
    )
    system_prompt: str | None = field(default=None, metadata={"help": "Optional system message (chat models)."})
    chat_template: str | None = field(
        default=None, metadata={"help": "Jinja chat template (string or .jinja path) for models without one."}
    )
    prompt_template: str = field(
        default="### Question:\n{question}\n\n### Response:\n",
        metadata={"help": "Prompt layout for models without a chat template (plain prompt/completion)."},
    )
    on_invalid: str = field(default="error", metadata={"help": "error: stop with a report; skip: drop bad rows."})
    eval_batch_size: int = field(default=32, metadata={"help": "Generation batch size for evaluation."})
    max_new_tokens: int = field(default=512, metadata={"help": "Generation budget per evaluation example."})
    eval_base: bool = field(default=False, metadata={"help": "Also evaluate the untrained model."})
    eval_backend: str = field(default="hf", metadata={"help": "hf (transformers generate) or vllm."})
    eval_after_stages: bool = field(default=True, metadata={"help": "Evaluate after each stage."})
    select_on_test: bool = field(
        default=False,
        metadata={"help": "Allow keep_best to select on the evaluation set itself (reports then say so)."},
    )


@dataclass
class SFTKeyConfig(SFTConfig):
    """`trl.SFTConfig` plus the SFTKey stage list. Every stage starts from these values and applies its overrides."""

    stages: list[dict] = field(
        default_factory=lambda: [dict(stage) for stage in PAPER_STAGES],
        metadata={"help": f"Stages in order, each: name, loss_on ({'|'.join(OBJECTIVES)}), training overrides."},
    )
    global_batch_size: int | None = field(
        default=None,
        metadata={"help": "Fix the global batch; gradient accumulation is derived from it and the process count."},
    )
    log_part_losses: bool = field(
        default=True,
        metadata={"help": "Log the loss on reasoning and on key tokens separately (scores the whole response)."},
    )

    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Discard a previous run in output_dir (all stages) and start over."}
    )
    restart_from: str | None = field(
        default=None, metadata={"help": "Retrain from this stage on; earlier finished stages are kept."}
    )
    hub_stage: str | None = field(
        default=None, metadata={"help": "With push_to_hub: the stage to push (default: the last), once, with a card."}
    )
    hub_merge: bool = field(
        default=False, metadata={"help": "With push_to_hub: push a LoRA/QLoRA stage merged into its base model."}
    )
    # TRL defaults the deprecated `gradient_checkpointing` to True, which makes transformers warn on every run; the
    # same default is applied to `activation_checkpointing` in __post_init__ instead
    gradient_checkpointing: bool | None = field(
        default=None, metadata={"help": "Deprecated alias of `activation_checkpointing`."}
    )
    dataloader_pin_memory: bool | None = field(
        default=None, metadata={"help": "Pin batches in memory (default: true when there is a GPU/accelerator)."}
    )

    def __post_init__(self):
        import torch

        if self.bf16 is None:  # TRL defaults to bf16, which raises on machines without bf16 support
            from ..train.distributed import native_bf16

            self.bf16 = native_bf16()
        if self.activation_checkpointing is None and self.gradient_checkpointing is None:
            self.activation_checkpointing = True  # TRL's default
        if self.dataloader_pin_memory is None:  # pinning without an accelerator only makes torch warn
            self.dataloader_pin_memory = torch.accelerator.is_available() and not self.use_cpu
        super().__post_init__()


@dataclass
class Recipe:
    """A parsed recipe: its arguments, its stages, and the `--config` file and command-line keys a card records."""

    script: SFTKeyScriptArguments
    training: SFTKeyConfig
    model: ModelConfig
    stages: list[Stage]
    path: str | None = None
    overrides: list[str] = field(default_factory=list)


# Every key's type (its annotation, `key_types`) and range (`KEY_RANGES`), stated once and checked by
# `values.check_key_value`: bools are never numbers nor numbers bools; NaN and infinity are never valid.


@dataclass(frozen=True)
class Range:
    """The numbers a key takes: whole numbers only with `integer`; `low`/`high` included unless `*_open`."""

    text: str
    integer: bool = False
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def holds(self, number: float) -> bool:
        """Whether `number` lies in the range."""
        if self.low is not None and (number < self.low or (self.low_open and number == self.low)):
            return False
        return self.high is None or (number < self.high or (not self.high_open and number == self.high))


COUNT = Range("a whole number of at least 1", integer=True, low=1)
WHOLE = Range("a whole number of at least 0", integer=True, low=0)
POSITIVE = Range("a number above 0", low=0, low_open=True)
NON_NEGATIVE = Range("a number of at least 0", low=0)
FRACTION = Range("a fraction from 0 up to (not including) 1", low=0, high=1, high_open=True)
KEY_RANGES: dict[str, Range] = {
    # counts of rows, tokens, examples, steps and ranks
    **dict.fromkeys(
        ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
         "global_batch_size", "max_train_samples", "max_eval_samples", "eval_batch_size", "max_new_tokens",
         "max_length", "pad_to_multiple_of", "lora_r", "save_total_limit", "eval_accumulation_steps"),
        COUNT,
    ),
    **dict.fromkeys(("dataloader_num_workers", "seed", "data_seed"), WHOLE),
    # positive numbers (`*_steps` below 1: a fraction of the training steps)
    **dict.fromkeys(("num_train_epochs", "adam_epsilon", "lora_alpha", "logging_steps", "eval_steps",
                     "save_steps"), POSITIVE),
    # learning_rate 0 trains nothing on purpose: a stage that only evaluates its incoming weights
    **dict.fromkeys(("learning_rate", "warmup_steps", "weight_decay", "max_grad_norm", "neftune_noise_alpha",
                     "label_smoothing_factor"), NON_NEGATIVE),
    **dict.fromkeys(("eval_fraction", "lora_dropout", "adam_beta1", "adam_beta2"), FRACTION),
    "max_steps": Range("-1 or 0 (train for num_train_epochs) or a whole number of steps", integer=True, low=-1),
}  # fmt: skip


@dataclass(frozen=True)
class KeyType:
    """What a key's annotation allows: `kinds` among bool, int, float, str, list, dict; `choices` (an enum, a
    `Literal` or the field's `choices`); `nullable` when null means unset; `opaque` for a TRL object type."""

    kinds: frozenset[str]
    choices: tuple = ()
    nullable: bool = False
    opaque: bool = False


def _key_type(dataclass_field, annotation: Any) -> KeyType:
    union = isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union
    metadata_choices = list(dataclass_field.metadata.get("choices", ()))
    kinds, choices, nullable, opaque = set(), metadata_choices, dataclass_field.default is None, False
    closed = bool(choices)  # a string must be one of the choices
    for member in typing.get_args(annotation) if union else (annotation,):
        origin = typing.get_origin(member) or member
        if member is type(None):
            nullable = True
        elif origin is typing.Literal:
            choices += list(typing.get_args(member))
        elif isinstance(origin, type) and issubclass(origin, enum.Enum):
            choices, closed = choices + [item.value for item in origin], True
        elif origin in (bool, int, float, str, list, dict):
            kinds.add(origin.__name__)
        else:
            opaque = True
    if closed:
        kinds.discard("str")
    return KeyType(frozenset(kinds), tuple(choices), nullable, opaque)


def key_types() -> dict[str, KeyType]:
    """Every recipe key's `KeyType`, from the three dataclasses a recipe fills (built once)."""
    if not _KEY_TYPES:
        for cls in (SFTKeyScriptArguments, SFTKeyConfig, ModelConfig):
            hints = typing.get_type_hints(cls)
            _KEY_TYPES.update({f.name: _key_type(f, hints[f.name]) for f in dataclasses.fields(cls) if f.init})
    return _KEY_TYPES


_KEY_TYPES: dict[str, KeyType] = {}
