"""`--dry_run`: show a checked recipe resolved, before any model or dataset is downloaded.

The checks are `checks.check_recipe`'s; this module renders the non-default keys, each stage resolved, the memory
estimate, the notes and the recipe's `# Hardware:`/`# Launch:` lines as YAML (the launch line's accelerate config
also gives the process count the batch arithmetic must work for).
"""

from __future__ import annotations

import dataclasses
import shlex
import warnings
from pathlib import Path
from typing import Any

import yaml
from trl import ModelConfig

from ..data.adapters import answer_type_of
from ..errors import SFTKeyError
from ..files import plain
from ..train.memory import estimate_for_recipe, training_method
from ..train.steps import global_batch, stage_training_args
from .schema import Recipe, SFTKeyConfig, SFTKeyScriptArguments

HARDWARE_PREFIX = "# Hardware:"
LAUNCH_PREFIX = "# Launch:"
STAGE_SUMMARY_KEYS = (
    "loss_type",
    "num_train_epochs",
    "max_steps",
    "learning_rate",
    "lr_scheduler_type",
    "warmup_steps",
    "weight_decay",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
)
DERIVED_TRAINING_KEYS = {"stages", "gradient_checkpointing", "gradient_checkpointing_kwargs", "local_rank"}


def header_value(recipe_path: str | Path, prefix: str) -> str | None:
    """The text after `prefix` on the recipe's leading comment lines (`# Hardware:`, `# Launch:`), or None."""
    with open(recipe_path, encoding="utf-8") as handle:
        for line in handle:
            if not line.startswith("#"):
                break
            if line.startswith(prefix):
                return line[len(prefix) :].strip() or None
    return None


def repo_root(recipe_path: str | Path) -> Path:
    """The folder that holds the `recipes/` folder the recipe lives in (the current folder otherwise)."""
    for parent in Path(recipe_path).resolve().parents:
        if parent.name == "recipes":
            return parent.parent
    return Path.cwd()


def launch_processes(recipe_path: str | Path | None) -> list[int]:
    """Process counts a recipe must work with: one, and the count its `# Launch:` line's accelerate config names."""
    line = header_value(recipe_path, LAUNCH_PREFIX) if recipe_path else None
    try:
        count = processes_of_launch(shlex.split(line), repo_root(recipe_path)) if line else None
    except ValueError:  # a launch line that cannot be split into words is a comment like any other
        count = None
    return [1] if count in (None, 1) else [1, count]


def _non_default(obj, default, skip: frozenset[str] | set[str] = frozenset()) -> dict[str, Any]:
    fields = [f.name for f in dataclasses.fields(obj) if f.init and f.name not in skip]
    pairs = {name: (plain(getattr(obj, name)), plain(getattr(default, name, None))) for name in fields}
    return {name: value for name, (value, base) in pairs.items() if value != base}


def _memory(model_args, training_args, processes: int) -> dict[str, Any] | None:
    estimate = estimate_for_recipe(model_args, training_args, processes)
    if estimate is None:
        return None
    return {
        "method": training_method(model_args),
        "estimated_peak_gib_per_gpu": round(estimate, 1),
        "assumes": f"{processes} GPU(s), batch {training_args.per_device_train_batch_size} x "
        f"{training_args.max_length} tokens; an estimate (sftkey_trl/train/memory.py), not a measurement",
    }


def dry_run(recipe: Recipe, notes: list[str]) -> str:
    """The checked recipe, resolved, as printable YAML (`notes` from `check_recipe`)."""
    script_args, training_args, model_args, recipe_path = recipe.script, recipe.training, recipe.model, recipe.path
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        training_default = SFTKeyConfig()
    report: dict[str, Any] = {"recipe": recipe_path}
    if recipe_path is not None:
        report["hardware"] = header_value(recipe_path, HARDWARE_PREFIX)
        report["launch"] = header_value(recipe_path, LAUNCH_PREFIX)
    report["answer_type"] = answer_type_of(script_args)
    report["settings"] = {
        "model": _non_default(model_args, ModelConfig()),
        "data": _non_default(script_args, SFTKeyScriptArguments()),
        "training": _non_default(training_args, training_default, DERIVED_TRAINING_KEYS),
    }
    count = launch_processes(recipe_path)[-1]
    output_dir = Path(training_args.output_dir)
    resolved = []
    for stage in recipe.stages:
        args = stage_training_args(training_args, stage, str(output_dir / stage.name), count)
        entry: dict[str, Any] = {"name": stage.name, "loss_on": stage.loss_on, "trains_on": stage.description}
        entry.update(stage.options())
        if stage.keep_best:
            entry["keep_best"] = True
        if stage.patience is not None:
            entry["patience"] = stage.patience
        entry["overrides"] = plain(stage.overrides)
        effective = {key: plain(getattr(args, key)) for key in STAGE_SUMMARY_KEYS}
        if effective["max_steps"] in (-1, 0):
            del effective["max_steps"]
        effective["global_batch"] = global_batch(args, count)
        effective["processes"] = count
        entry["effective"] = effective
        entry["output_dir"] = str(output_dir / stage.name)
        resolved.append(entry)
    report["stages"] = resolved
    memory = _memory(model_args, training_args, count)
    if memory is not None:
        report["memory"] = memory
    if notes:
        report["notes"] = notes
    text = yaml.safe_dump(report, sort_keys=False, default_flow_style=False, width=119, allow_unicode=True)
    return "# sftkey dry run: every check passed; nothing was downloaded or trained\n" + text


def processes_of_launch(launch_tokens: list[str], root: Path) -> int | None:
    """`num_processes` of the accelerate config a launch command names with `--config_file` (None: not said)."""
    from .flags import flag_value

    config_file = flag_value(launch_tokens, "--config_file")
    path = root / config_file if config_file else None
    if path is None or not path.is_file():
        return None
    try:
        config: Any = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError:
        raise SFTKeyError(f"accelerate config `{path}` is not valid YAML; fix its syntax") from None
    value = config.get("num_processes") if isinstance(config, dict) else None
    return value if isinstance(value, int) and value > 0 else None
