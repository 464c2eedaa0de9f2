"""The recipe's keys: thin layers over TRL's `SFTConfig` and `ModelConfig`, read by `trl.TrlParser`."""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import SFTConfig

DEMO_RECIPE = "recipes/demo/sftkey_tiny.yaml"  # run.py with no --config
COMPARE_DEMO_RECIPE = "recipes/demo/remainder.yaml"  # compare.py with no --config: a task with headroom
PAPER_STAGES = [{"name": "sft", "loss_on": "completion"}, {"name": "key", "loss_on": "key"}]
# Recipe keys with a fixed set of values (None: unset, the adapter decides)
CHOICES = {
    "response_format": ("tags", "plain"),
    "on_invalid": ("error", "skip"),
    "eval_backend": ("hf", "vllm"),
    "answer_type": (None, "numeric", "math", "multiple_choice", "text"),
}


@dataclass
class SFTKeyScriptArguments:
    """Data, formatting and evaluation settings (everything that is not a training argument or the model)."""

    dataset_name: str | None = field(
        default=None,
        metadata={"help": "Hub id, local .jsonl/.json/.parquet/.csv file, `demo:arithmetic` or `demo:remainder`."},
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Dataset config name (hub datasets)."})
    dataset_split: str | None = field(default=None, metadata={"help": "Training split (default: the adapter's)."})
    dataset_format: str = field(
        default="generic",
        metadata={"help": "Adapter: generic, gsm8k, openr1_math, openbookqa, cot_collection, math."},
    )
    question_field: str = field(default="question", metadata={"help": "generic adapter: question column."})
    reasoning_field: str = field(default="reasoning", metadata={"help": "generic adapter: reasoning column."})
    answer_field: str = field(default="answer", metadata={"help": "generic adapter: answer column."})
    answer_type: str | None = field(
        default=None, metadata={"help": "numeric, math, multiple_choice or text (default: the adapter's)."}
    )
    eval_dataset_name: str | None = field(default=None, metadata={"help": "Evaluation dataset (id or local file)."})
    eval_dataset_config: str | None = field(default=None, metadata={"help": "Evaluation dataset config name."})
    eval_split: str | None = field(default=None, metadata={"help": "Evaluation split (default: the adapter's)."})
    eval_fraction: float = field(default=0.0, metadata={"help": "Hold out this fraction of train for evaluation."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use at most this many training rows."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Evaluate on at most this many rows."})
    response_format: str = field(default="tags", metadata={"help": "tags (<Thinking>/<Answer>) or plain."})
    thinking_open: str = "<Thinking>"
    thinking_close: str = "</Thinking>"
    answer_open: str = "<Answer>"
    answer_close: str = "</Answer>"
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
        metadata={"help": "Stages in order: each has name, loss_on (completion|key) and training-argument overrides."},
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
            self.bf16 = bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
        if self.activation_checkpointing is None and self.gradient_checkpointing is None:
            self.activation_checkpointing = True  # TRL's default
        if self.dataloader_pin_memory is None:  # pinning without an accelerator only makes torch warn
            self.dataloader_pin_memory = torch.accelerator.is_available() and not self.use_cpu
        super().__post_init__()
