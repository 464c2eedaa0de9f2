"""Check a recipe offline and show it resolved, before any model or dataset is downloaded.

`dry_run(...)` runs every check that needs no download and returns a printable YAML report: the recipe's
non-default keys, each stage with its overrides resolved, and notes. Each failed check raises `SFTKeyError`
with one line naming the key and the fix. The recipe's header (`# Hardware:` and `# Launch:` comment lines)
is checked too: the launch line must name an accelerate config and a recipe that exist, relative to the
repository root (the folder that holds `recipes/`).
"""

from __future__ import annotations

import dataclasses
import enum
import importlib.util
import shlex
import warnings
from pathlib import Path
from typing import Any

import yaml

from ..data.adapters import Triple, get_adapter
from ..errors import SFTKeyError
from .config import SFTKeyConfig, SFTKeyScriptArguments, Stage, stage_training_args

HARDWARE_PREFIX = "# Hardware:"
LAUNCH_PREFIX = "# Launch:"
FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
STAGE_SUMMARY_KEYS = (
    "num_train_epochs",
    "max_steps",
    "learning_rate",
    "lr_scheduler_type",
    "warmup_steps",
    "weight_decay",
    "per_device_train_batch_size",
)
DERIVED_TRAINING_KEYS = {"stages", "gradient_checkpointing", "gradient_checkpointing_kwargs", "local_rank"}
SAMPLE = Triple("What is 2 + 3?", "2 + 3 = 5", "5")


# --------------------------------------------------------------------------------------------------
# recipe header


def header_lines(recipe_path: str | Path) -> list[str]:
    """The comment lines at the top of a recipe (up to the first line that is not a comment)."""
    lines = []
    with open(recipe_path) as handle:
        for line in handle:
            if not line.startswith("#"):
                break
            lines.append(line.rstrip("\n"))
    return lines


def _header_value(recipe_path: str | Path, prefix: str) -> str | None:
    for line in header_lines(recipe_path):
        if line.startswith(prefix):
            return line[len(prefix) :].strip() or None
    return None


def launch_line(recipe_path: str | Path) -> str | None:
    """The command of the recipe's `# Launch:` header line, or None when it has none."""
    return _header_value(recipe_path, LAUNCH_PREFIX)


def hardware_line(recipe_path: str | Path) -> str | None:
    """The text of the recipe's `# Hardware:` header line, or None when it has none."""
    return _header_value(recipe_path, HARDWARE_PREFIX)


def repo_root(recipe_path: str | Path) -> Path:
    """The folder that holds the `recipes/` folder the recipe lives in (the current folder otherwise)."""
    path = Path(recipe_path).resolve()
    for parent in path.parents:
        if parent.name == "recipes":
            return parent.parent
    return Path.cwd()


def launch_option(tokens: list[str], flag: str) -> str | None:
    """The value of `flag` (`--flag value` or `--flag=value`) among the words of a launch line, or None."""
    for index, token in enumerate(tokens):
        if token == flag and index + 1 < len(tokens):
            return tokens[index + 1]
        if token.startswith(flag + "="):
            return token.split("=", 1)[1]
    return None


def check_launch(recipe_path: str | Path) -> dict[str, Any]:
    """Check the `# Hardware:`/`# Launch:` header; return the launch line, its accelerate config and process count."""
    recipe = Path(recipe_path)
    if hardware_line(recipe) is None:
        raise SFTKeyError(f"recipe `{recipe}` has no `# Hardware: ...` header line; add one naming the GPUs it needs")
    line = launch_line(recipe)
    if line is None:
        raise SFTKeyError(
            f"recipe `{recipe}` has no `# Launch: ...` header line; add one, e.g. `# Launch: accelerate launch "
            f"--config_file accelerate_configs/single_gpu.yaml recipes/run.py --config {recipe}`"
        )
    try:
        tokens = shlex.split(line)
    except ValueError as error:
        raise SFTKeyError(f"the `# Launch:` line of `{recipe}` cannot be split into words ({error})") from None
    if tokens[:2] != ["accelerate", "launch"]:
        raise SFTKeyError(f"the `# Launch:` line of `{recipe}` must start with `accelerate launch`, got `{line}`")
    root = repo_root(recipe)
    info: dict[str, Any] = {"launch": line, "accelerate_config": None, "num_processes": None}
    config_file = launch_option(tokens, "--config_file")
    if config_file is not None:
        path = root / config_file
        if not path.is_file():
            raise SFTKeyError(
                f"the `# Launch:` line of `{recipe}` names `--config_file {config_file}`, which does not exist under "
                f"{root}; fix the path or add that accelerate config"
            )
        info["accelerate_config"] = config_file
        info["num_processes"] = accelerate_num_processes(path)
    named = launch_option(tokens, "--config")
    if named is None:
        raise SFTKeyError(f"the `# Launch:` line of `{recipe}` has no `--config {recipe}`; add it")
    path = root / named
    if not path.is_file():
        raise SFTKeyError(
            f"the `# Launch:` line of `{recipe}` names `--config {named}`, which does not exist under {root}; "
            "make it the recipe's own path, relative to the repository root"
        )
    if not path.samefile(recipe):
        raise SFTKeyError(
            f"the `# Launch:` line of `{recipe}` names `--config {named}`, another recipe; make it this recipe's path"
        )
    return info


def accelerate_num_processes(path: Path) -> int | None:
    """`num_processes` of an accelerate config file (None when it does not say)."""
    try:
        config = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError:
        raise SFTKeyError(f"accelerate config `{path}` is not valid YAML; fix its syntax") from None
    value = config.get("num_processes") if isinstance(config, dict) else None
    return value if isinstance(value, int) and value > 0 else None


# --------------------------------------------------------------------------------------------------
# checks


def check_response_format(script_args) -> list[str]:
    """The tags (for `tags`) or the answer line (for `plain`) must let the answer be found; returns notes."""
    notes = []
    tags = {
        "thinking_open": script_args.thinking_open,
        "thinking_close": script_args.thinking_close,
        "answer_open": script_args.answer_open,
        "answer_close": script_args.answer_close,
    }
    defaults = SFTKeyScriptArguments()
    template_changed = script_args.answer_template != defaults.answer_template
    tags_changed = [key for key, value in tags.items() if value != getattr(defaults, key)]
    if script_args.response_format == "tags":
        for key, value in tags.items():
            if not value or not value.strip():
                raise SFTKeyError(f"`{key}` is empty; response_format `tags` needs four non-empty tag strings")
        for key, value in tags.items():
            for other, other_value in tags.items():
                if key != other and value in other_value:
                    raise SFTKeyError(
                        f"`{key}: {value}` is the same as or part of `{other}: {other_value}`, so the answer cannot "
                        "be located; make the four tags distinct"
                    )
        if template_changed:
            notes.append("`answer_template` is only used by `response_format: plain`; it is ignored with `tags`")
    else:
        template = script_args.answer_template
        if template.count("{answer}") != 1:
            raise SFTKeyError("`answer_template` must contain `{answer}` exactly once, e.g. `The answer is {answer}.`")
        if "\n" in template:
            raise SFTKeyError("`answer_template` must be one line: the answer is read from the last matching line")
        if not template.replace("{answer}", "").strip():
            raise SFTKeyError(
                "`answer_template` needs words around `{answer}` (e.g. `The answer is {answer}.`) so that the "
                "answer line can be told apart from the reasoning"
            )
        if tags_changed:
            notes.append(f"{', '.join(f'`{k}`' for k in tags_changed)} only apply to `response_format: tags`")
    return notes


def check_quantization(model_args) -> None:
    """QLoRA needs a LoRA adapter; one quantisation at a time; the LM head stays out of LoRA."""
    if model_args.load_in_4bit and model_args.load_in_8bit:
        raise SFTKeyError("`load_in_4bit` and `load_in_8bit` are both true; set one of them to false")
    for key in ("load_in_4bit", "load_in_8bit"):
        if getattr(model_args, key) and not model_args.use_peft:
            raise SFTKeyError(
                f"`{key}: true` needs `use_peft: true` (a quantised model cannot be fully fine-tuned); "
                f"set use_peft: true for QLoRA or {key}: false for full fine-tuning"
            )
    targets = model_args.lora_target_modules
    targets = [targets] if isinstance(targets, str) else list(targets or [])
    if model_args.use_peft and "lm_head" in targets:
        raise SFTKeyError(
            "`lora_target_modules` must not contain `lm_head` (TRL's fused LM head reads its weight directly); "
            "remove it (leave the key unset for all linear layers but the LM head)"
        )


def check_chat_template(script_args, training_args) -> list[str]:
    """Render a sample with the recipe's chat template, exactly as training and generation will; returns notes."""
    if not script_args.chat_template:
        return ["chat template: the model's own (checked when its tokenizer loads)"]
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from ..data.formatting import Formatter

    eos = training_args.eos_token
    backend = Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>"))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token=eos or "<unk>")
    formatter = Formatter(tokenizer, script_args, eos)
    if eos is None:
        return [
            "`chat_template` is set but `eos_token` is not: the model's EOS must close the template's assistant turn "
            "(checked at run time); set `eos_token` to the template's end-of-turn token to be sure"
        ]
    try:
        formatter.render(SAMPLE)
    except SFTKeyError:
        raise
    except Exception as error:  # jinja syntax or runtime errors
        detail = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise SFTKeyError(f"`chat_template` does not render ({detail}); fix the Jinja template") from error
    return []


def check_data(script_args) -> list[str]:
    """The dataset and the evaluation split can be resolved (nothing is downloaded); returns notes."""
    adapter = get_adapter(script_args.dataset_format)
    name = script_args.dataset_name or adapter.hub_id
    if not name:
        raise SFTKeyError(
            f"no dataset: `dataset_format: {adapter.name}` has no default, so set `dataset_name` to a hub id or a "
            "local .jsonl/.json/.parquet/.csv file"
        )
    notes = []
    for key in ("dataset_name", "eval_dataset_name"):
        value = getattr(script_args, key)
        looks_local = value and (Path(value).suffix in FILE_SUFFIXES or value.startswith((".", "/", "~")))
        if looks_local and not Path(value).expanduser().exists():
            raise SFTKeyError(f"`{key}`: file `{value}` does not exist; check the path (relative to {Path.cwd()})")
    own_hub_data = name == adapter.hub_id and not script_args.eval_dataset_name
    if own_hub_data and script_args.eval_split and adapter.test_split is None:
        if script_args.eval_split != adapter.train_split:
            raise SFTKeyError(
                f"`eval_split: {script_args.eval_split}`: {adapter.hub_id} has only a `{adapter.train_split}` split; "
                "remove eval_split and hold out rows with `eval_fraction` (e.g. 0.01)"
            )
    train_split = script_args.dataset_split or adapter.train_split
    if script_args.eval_split and not script_args.eval_dataset_name and script_args.eval_split == train_split:
        notes.append(f"evaluation uses the training split `{train_split}`: scores will be optimistic")
    if not (script_args.eval_dataset_name or script_args.eval_split or script_args.eval_fraction > 0):
        notes.append("no evaluation set: set `eval_split` (or `eval_fraction` when the dataset has no test split)")
    return notes


def check_global_batch(training_args, stage_args: dict[str, Any], processes: list[int]) -> None:
    """`global_batch_size` must be a multiple of the per-device batch times the process count, in every stage."""
    for name, args in stage_args.items():
        if not args.global_batch_size:
            continue
        for count in processes:
            per_step = args.per_device_train_batch_size * count
            if args.global_batch_size % per_step:
                plural = "process" if count == 1 else "processes"
                raise SFTKeyError(
                    f"stage `{name}`: `global_batch_size: {args.global_batch_size}` is not a multiple of "
                    f"per_device_train_batch_size {args.per_device_train_batch_size} x {count} {plural} = {per_step}; "
                    "change one of them"
                )


# --------------------------------------------------------------------------------------------------
# report


def _plain(value: Any) -> Any:
    """A YAML-friendly copy of a configuration value."""
    if isinstance(value, enum.Enum):
        return _plain(value.value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _non_default(obj, default, skip: set[str] = frozenset()) -> dict[str, Any]:
    changed = {}
    for f in dataclasses.fields(obj):
        if not f.init or f.name in skip:
            continue
        value, base = _plain(getattr(obj, f.name)), _plain(getattr(default, f.name, None))
        if value != base:
            changed[f.name] = value
    return changed


def _accumulation(args, processes: int) -> int:
    if args.global_batch_size:
        return max(args.global_batch_size // (args.per_device_train_batch_size * processes), 1)
    return args.gradient_accumulation_steps


def _memory(model_args, training_args, processes: int) -> dict[str, Any] | None:
    from ..train.memory import estimate_for_recipe, training_method

    method = training_method(model_args)
    estimate = estimate_for_recipe(model_args, training_args, processes)
    if estimate is None:
        return None
    return {
        "method": method,
        "estimated_peak_gib_per_gpu": round(estimate, 1),
        "assumes": f"{processes} GPU(s), batch {training_args.per_device_train_batch_size} x "
        f"{training_args.max_length} tokens; an estimate (sftkey_trl/memory.py), not a measurement",
    }


def dry_run(script_args, training_args, model_args, stages: list[Stage], recipe_path: str | None) -> str:
    """Check everything that needs no download; return the resolved configuration as printable YAML.

    Raises `SFTKeyError` (one line naming the key and the fix) for the first failed check.
    """
    checks: list[str] = []
    notes: list[str] = []
    launch: dict[str, Any] = {}
    if recipe_path is not None:
        launch = check_launch(recipe_path)
        checks.append("header: `# Hardware:` and `# Launch:` present, launch line names existing files")
    adapter = get_adapter(script_args.dataset_format)
    checks.append(f"dataset_format `{adapter.name}` is a known adapter")
    notes += check_data(script_args)
    checks.append("dataset and evaluation split resolve")
    notes += check_response_format(script_args)
    checks.append(f"response_format `{script_args.response_format}` can locate the answer")
    notes += check_chat_template(script_args, training_args)
    if script_args.chat_template:
        checks.append("chat_template renders a sample identically for training and generation")
    check_quantization(model_args)
    checks.append("LoRA/quantisation settings are consistent")
    if (model_args.load_in_4bit or model_args.load_in_8bit) and importlib.util.find_spec("bitsandbytes") is None:
        notes.append("bitsandbytes is not installed here; the run needs it (`pip install bitsandbytes`)")

    output_dir = Path(training_args.output_dir)
    stage_args = {
        stage.name: stage_training_args(training_args, stage, str(output_dir / stage.name)) for stage in stages
    }
    processes = [1]
    if launch.get("num_processes") and launch["num_processes"] != 1:
        processes.append(launch["num_processes"])
    check_global_batch(training_args, stage_args, processes)
    checks.append(
        "global_batch_size divides by per-device batch x processes"
        if training_args.global_batch_size
        else "batch settings are consistent"
    )
    checks.append(f"{len(stages)} stage(s) parsed")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        training_default = SFTKeyConfig()
    from trl import ModelConfig

    report: dict[str, Any] = {"recipe": recipe_path}
    if recipe_path is not None:
        report["hardware"] = hardware_line(recipe_path)
        report["launch"] = launch.get("launch")
    report["answer_type"] = script_args.answer_type or adapter.answer_type
    report["settings"] = {
        "model": _non_default(model_args, ModelConfig()),
        "data": _non_default(script_args, SFTKeyScriptArguments()),
        "training": _non_default(training_args, training_default, DERIVED_TRAINING_KEYS),
    }
    count = processes[-1]
    resolved = []
    for stage in stages:
        args = stage_args[stage.name]
        entry: dict[str, Any] = {"name": stage.name, "loss_on": stage.loss_on}
        for key in ("loss_normalization", "reasoning_weight", "keep_best"):
            value = getattr(stage, key)
            if value != getattr(Stage(name=stage.name), key):
                entry[key] = value
        entry["overrides"] = _plain(stage.overrides)
        effective = {key: _plain(getattr(args, key)) for key in STAGE_SUMMARY_KEYS}
        if effective["max_steps"] in (-1, 0):
            del effective["max_steps"]
        effective["gradient_accumulation_steps"] = _accumulation(args, count)
        effective["global_batch"] = args.per_device_train_batch_size * effective["gradient_accumulation_steps"] * count
        effective["processes"] = count
        entry["effective"] = effective
        entry["output_dir"] = str(output_dir / stage.name)
        resolved.append(entry)
    report["stages"] = resolved
    memory = _memory(model_args, training_args, count)
    if memory is not None:
        report["memory"] = memory
    report["checks_passed"] = checks
    if notes:
        report["notes"] = notes
    text = yaml.safe_dump(report, sort_keys=False, default_flow_style=False, width=119, allow_unicode=True)
    return "# sftkey dry run: every offline check passed; nothing was downloaded or trained\n" + text
