"""Recipe configuration: thin layers over TRL's `SFTConfig` and `ModelConfig`, parsed by `trl.TrlParser`."""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass, field
from typing import Any

import yaml
from trl import ModelConfig, SFTConfig, TrlParser

from ..errors import SFTKeyError, closest

DEMO_RECIPE = "recipes/demo/sftkey_tiny.yaml"
LOSS_ON = ("completion", "key")
LOSS_NORMALIZATIONS = ("supervised_tokens", "completion_tokens")
PAPER_STAGES = [{"name": "sft", "loss_on": "completion"}, {"name": "key", "loss_on": "key"}]


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

    def __post_init__(self):
        if self.bf16 is None:  # TRL defaults to bf16, which raises on machines without bf16 support
            import torch

            self.bf16 = bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
        super().__post_init__()


@dataclass
class Stage:
    """One training stage, as resolved from the recipe's `stages:` list."""

    name: str
    loss_on: str = "completion"
    loss_normalization: str = "supervised_tokens"
    reasoning_weight: float = 0.0
    keep_best: bool = False
    overrides: dict[str, Any] = field(default_factory=dict)


STAGE_KEYS = {f.name for f in dataclasses.fields(Stage)} - {"overrides"}


def parse_stages(raw: Any, training_args: SFTConfig, parser: TrlParser | None = None) -> list[Stage]:
    """Validate the `stages:` list and return `Stage` objects; every problem is a one-line `SFTKeyError`."""
    if not isinstance(raw, list) or not raw:
        raise SFTKeyError("`stages` must be a non-empty list, e.g. [{name: sft, loss_on: completion}, ...]")
    training_keys = {f.name for f in dataclasses.fields(type(training_args))} - {"stages"}
    stages, names = [], set()
    for index, entry in enumerate(raw):
        where = f"stages[{index}]"
        if not isinstance(entry, dict):
            raise SFTKeyError(f"{where} must be a mapping with `name` and `loss_on`, got {entry!r}")
        entry = dict(entry)
        name = entry.pop("name", None)
        if not name or not isinstance(name, str):
            raise SFTKeyError(f"{where} has no `name`; give each stage a unique name such as `sft` or `key`")
        if name in names:
            raise SFTKeyError(f"stage name `{name}` repeats in `stages`; stage names must be unique")
        if "/" in name or name.startswith("."):
            raise SFTKeyError(f"stage name `{name}` is used as a folder name; use letters, digits, - and _")
        names.add(name)
        values = {key: entry.pop(key) for key in list(entry) if key in STAGE_KEYS}
        try:
            values["reasoning_weight"] = float(values.get("reasoning_weight", 0.0))
        except (TypeError, ValueError):
            raise SFTKeyError(f"{where} ({name}): `reasoning_weight` must be a number") from None
        stage = Stage(name=name, **values)
        if stage.loss_on not in LOSS_ON:
            raise SFTKeyError(f"{where} ({name}): `loss_on: {stage.loss_on}` is not valid; use one of {LOSS_ON}")
        if stage.loss_normalization not in LOSS_NORMALIZATIONS:
            raise SFTKeyError(
                f"{where} ({name}): `loss_normalization: {stage.loss_normalization}` is not valid; "
                f"use one of {LOSS_NORMALIZATIONS}"
            )
        if not 0.0 <= stage.reasoning_weight <= 1.0:
            raise SFTKeyError(f"{where} ({name}): `reasoning_weight` must be between 0 and 1")
        for key in entry:
            if key not in training_keys:
                hint = closest(key, training_keys | STAGE_KEYS)
                raise SFTKeyError(f"{where} ({name}): unknown key `{key}`{hint}")
            if parser is not None:
                entry[key] = _coerce(parser, key, entry[key], f"{where} ({name}): ")
        stage.overrides = entry
        stages.append(stage)
    return stages


def stage_training_args(base: SFTConfig, stage: Stage, output_dir: str) -> SFTConfig:
    """The training arguments of one stage: the recipe's values with the stage's overrides applied."""
    values = {f.name: getattr(base, f.name) for f in dataclasses.fields(base) if f.init}
    values.update(stage.overrides)
    values["output_dir"] = output_dir
    try:
        return type(base)(**values)
    except (TypeError, ValueError) as error:
        raise SFTKeyError(f"stage `{stage.name}`: invalid training arguments: {error}") from error


CHOICES = {
    "response_format": ("tags", "plain"),
    "on_invalid": ("error", "skip"),
    "eval_backend": ("hf", "vllm"),
    "answer_type": (None, "numeric", "math", "multiple_choice", "text"),
}


def _check_script_args(args: SFTKeyScriptArguments) -> None:
    for key, allowed in CHOICES.items():
        value = getattr(args, key)
        if value not in allowed:
            valid = ", ".join(str(a) for a in allowed if a is not None)
            raise SFTKeyError(f"`{key}: {value}` is not valid{closest(str(value), valid.split(', '))}; use {valid}")
    if not 0.0 <= args.eval_fraction < 1.0:
        raise SFTKeyError(f"`eval_fraction: {args.eval_fraction}` must be in [0, 1)")
    if "{answer}" not in args.answer_template:
        raise SFTKeyError("`answer_template` must contain `{answer}`, e.g. `The answer is {answer}.`")
    if "{question}" not in args.prompt_template:
        raise SFTKeyError("`prompt_template` must contain `{question}`")


def _pop_flag(argv: list[str], flag: str) -> str | None:
    for index, item in enumerate(argv):
        if item == flag and index + 1 < len(argv):
            value = argv[index + 1]
            del argv[index : index + 2]
            return value
        if item.startswith(flag + "="):
            del argv[index]
            return item.split("=", 1)[1]
    return None


def parse_config(argv: list[str] | None = None):
    """Parse `--config FILE` plus CLI overrides into (script_args, training_args, model_args, stages).

    `--stages` on the command line takes a YAML/JSON list. Unknown keys, wrong types and wrong values raise
    `SFTKeyError` with one line naming the key and the closest valid one.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    stages_override = _pop_flag(argv, "--stages")
    config_path = _pop_flag(argv, "--config")
    parser = TrlParser((SFTKeyScriptArguments, SFTKeyConfig, ModelConfig))
    known = {action.dest for action in parser._actions}
    config: dict[str, Any] = {}
    if config_path is not None:
        try:
            with open(config_path) as handle:
                config = yaml.safe_load(handle) or {}
        except FileNotFoundError:
            raise SFTKeyError(f"recipe `{config_path}` does not exist; check the path given to --config") from None
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark else ""
            raise SFTKeyError(f"recipe `{config_path}` is not valid YAML{where}; fix the syntax there") from None
        if not isinstance(config, dict):
            raise SFTKeyError(f"recipe `{config_path}` must be a YAML mapping of keys to values")
    for key in config:
        if key not in known and key != "env":
            raise SFTKeyError(f"unknown recipe key `{key}` in {config_path}{closest(key, known)}")
    for item in argv:
        if item.startswith("--"):
            key = item[2:].split("=", 1)[0]
            if key not in known:
                raise SFTKeyError(f"unknown command-line option `--{key}`{closest(key, known)}")
    if stages_override is not None:
        config["stages"] = yaml.safe_load(stages_override)
    for key, value in config.items():  # CLI strings are typed by argparse; YAML values must be checked here
        _check_yaml_type(parser, key, value)
    for name, value in (config.pop("env", None) or {}).items():
        os.environ[name] = str(value)
    parser.set_defaults_with_config(**config)
    try:
        script_args, training_args, model_args = parser.parse_args_into_dataclasses(args=argv)
    except SystemExit as exit_:  # argparse already printed a one-line usage error
        raise SFTKeyError("invalid command-line arguments (see the message above)") from exit_
    except (ValueError, TypeError) as error:
        raise SFTKeyError(f"invalid configuration: {str(error).splitlines()[0]}") from error
    _check_script_args(script_args)
    stages = parse_stages(training_args.stages, training_args, parser)
    return script_args, training_args, model_args, stages


def _check_yaml_type(parser: TrlParser, key: str, value: Any) -> None:
    """YAML values bypass argparse's type conversion; reject a value of the wrong kind with the key named."""
    if key in ("env", "stages") or value is None:
        return
    for action in parser._actions:
        if action.dest != key:
            continue
        kind = action.type
        if action.choices and value not in action.choices and str(value) not in map(str, action.choices):
            raise SFTKeyError(f"`{key}: {value}` is not valid; use one of {list(action.choices)}")
        if kind in (int, float) and (isinstance(value, bool) or not isinstance(value, (int, float))):
            try:
                kind(value)
            except (TypeError, ValueError):
                raise SFTKeyError(f"`{key}` must be a number, got {value!r}") from None
        if action.nargs in ("+", "*") and not isinstance(value, list):
            raise SFTKeyError(f"`{key}` must be a list, got {value!r}")
        return


def _coerce(parser: TrlParser, key: str, value: Any, where: str = "") -> Any:
    """Convert a YAML string (PyYAML reads `2e-4` as a string) with the argparse type of `key`."""
    if not isinstance(value, str):
        return value
    for action in parser._actions:
        if action.dest == key and action.type is not None and action.type is not str:
            try:
                return action.type(value)
            except (TypeError, ValueError):
                kind = getattr(action.type, "__name__", "value")
                raise SFTKeyError(f"{where}`{key}: {value}` has the wrong type; give a {kind}") from None
    return value
