"""The stage plan and `<output_dir>/manifest.json`: per-stage resolved configuration, hashes, status and timings,
so that a rerun skips finished stages, resumes a killed one from its last complete checkpoint and refuses a
silently changed configuration."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import SFTKeyError
from ..files import plain, read_json, write_json
from ..recipe.schema import Recipe
from ..train.objectives import Stage

# Keys that change where or how often things are written or shown, never what is trained or measured
NON_RESULT_KEYS = {
    "output_dir", "logging_steps", "logging_first_step", "logging_strategy", "logging_dir", "report_to", "run_name",
    "save_strategy", "save_steps", "save_total_limit", "save_only_model", "disable_tqdm", "dataloader_num_workers",
    "dataloader_pin_memory", "push_to_hub", "hub_model_id", "hub_strategy", "hub_token", "hub_private_repo",
    "overwrite_output_dir", "restart_from", "eval_batch_size", "eval_after_stages", "log_level", "log_level_replica",
    "dataloader_persistent_workers", "dataloader_prefetch_factor", "include_num_input_tokens_seen", "debug",
    "hub_revision", "hub_stage", "hub_merge",
}  # fmt: skip
PACKAGES = ["sftkey-trl", "torch", "transformers", "trl", "peft", "datasets", "accelerate", "bitsandbytes"]


def library_versions() -> dict[str, str | None]:
    """Installed versions of the packages that decide the results."""
    versions = dict.fromkeys(PACKAGES)
    for name in PACKAGES:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[name] = importlib.metadata.version(name)
    return versions


def result_values(obj, skip: set[str] = NON_RESULT_KEYS) -> dict:
    """The fields of a dataclass that decide a result: all but `skip` and the private ones."""
    return {k: v for k, v in plain(obj).items() if k not in skip and not k.startswith("_")}


def resolved_config(recipe: Recipe, stage_args, stage, data_hash: str, previous: str | None, processes: int) -> dict:
    """Everything that decides a stage's result: data, model, the stage's training arguments, the launch's process
    count (without `global_batch_size` it sets the global batch; a checkpoint resumes on its own count) and its
    parent."""
    training = result_values(stage_args, NON_RESULT_KEYS | {"stages"})
    config = {"data": result_values(recipe.script), "model": result_values(recipe.model), "training": training}
    config.update(stage=plain(stage), processes=processes, data_hash=data_hash, previous_stage_hash=previous)
    return config


def config_hash(config: dict) -> str:
    """A short, order-independent fingerprint of a resolved stage configuration."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def changed_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two resolved configurations."""
    keys = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += changed_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            keys.append(f"{prefix}{key}")
    return keys


class Manifest:
    """Read/modify/write wrapper around `manifest.json` (written atomically after every change)."""

    def __init__(self, output_dir: Path, write: bool = True):
        self.path = Path(output_dir) / "manifest.json"
        self.write = write
        self.data = read_json(self.path, None) or {"stages": {}}

    def stage(self, name: str) -> dict | None:
        """The manifest entry of stage `name`, or None if it never started."""
        return self.data["stages"].get(name)

    def update(self, name: str, **fields: Any) -> None:
        """Merge `fields` into stage `name`'s entry, stamped with the time and library versions."""
        self.data["stages"].setdefault(name, {}).update(fields, updated=time.strftime("%Y-%m-%dT%H:%M:%S"))
        self.data["library_versions"] = library_versions()
        if self.write:
            write_json(self.path, self.data)

    def forget(self, name: str) -> None:
        """Drop stage `name`'s entry (it will be trained again)."""
        if self.data["stages"].pop(name, None) is not None and self.write:
            write_json(self.path, self.data)


@dataclass
class PlannedStage:
    """A stage with its resolved training arguments, its configuration hash and whether it is retrained."""

    stage: Stage
    args: Any
    digest: str
    config: dict
    restarting: bool


def plan_stages(recipe: Recipe, stage_args, data_hash: str, manifest: Manifest, processes: int) -> list[PlannedStage]:
    """Resolve each stage's arguments (`stage_args(stage)`) and configuration hash (which chains the previous
    stage's) for a launch of `processes` processes; refuse a changed finished stage unless `restart_from` says."""
    plan, previous, restarting = [], data_hash, False
    output_dir, restart_from = manifest.path.parent, recipe.training.restart_from
    for stage in recipe.stages:
        args = stage_args(stage)
        config = resolved_config(recipe, args, stage, data_hash, previous, processes)
        digest = config_hash(config)
        restarting = restarting or stage.name == restart_from
        entry = manifest.stage(stage.name)
        if not entry and not restarting and (output_dir / stage.name).exists():
            raise SFTKeyError(
                f"{output_dir / stage.name} exists but the manifest does not know it (another run's output?); "
                "pass --overwrite_output_dir true or use another output_dir"
            )
        if entry and entry.get("hash") != digest and not restarting:
            before = entry.get("config", {}).get("processes")
            if before is not None and before != processes:
                raise SFTKeyError(
                    f"stage `{stage.name}` in {output_dir} was run on {before} process(es), this launch has "
                    f"{processes}: its global batch and checkpoints belong to {before}; launch {before} process(es), "
                    f"or pass --restart_from {stage.name} or --overwrite_output_dir true"
                )
            changed = ", ".join(changed_keys(entry.get("config", {}), config)[:8]) or "the previous stage"
            raise SFTKeyError(
                f"stage `{stage.name}` in {output_dir} was run with another config (changed: {changed}); "
                f"pass --restart_from {stage.name} or --overwrite_output_dir true, or use another output_dir"
            )
        plan.append(PlannedStage(stage, args, digest, config, restarting))
        previous = digest
    return plan


def evaluated(results_entry: dict | None) -> bool:
    """Whether a stage's results.json entry holds its evaluation (a run with `eval_after_stages: false` trains
    without one, and a rerun that asks for evaluation still owes it)."""
    return bool(results_entry) and "num_examples" in results_entry


def last_complete_checkpoint(directory: Path, holds: Callable[[Path], bool] | None = None) -> str | None:
    """The newest `checkpoint-N` whose `trainer_state.json` (written last by Trainer) is readable and, if given,
    `holds(checkpoint)` is true (e.g. keep_best's state is there); a folder a kill left mid-save lacks them."""
    candidates = sorted(
        (p for p in directory.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
        key=lambda p: int(p.name.split("-")[-1]),
        reverse=True,
    )
    for candidate in candidates:
        try:
            json.loads((candidate / "trainer_state.json").read_text())
            if holds is None or holds(candidate):
                return str(candidate)
        except (OSError, ValueError):
            continue
    return None
