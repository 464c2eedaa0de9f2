"""`<output_dir>/manifest.json`: per-stage resolved configuration, hashes, status, checkpoint and timings, so that
a rerun skips finished stages, resumes a killed one and refuses a silently changed configuration."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import time
from pathlib import Path
from typing import Any

from ..files import read_json, write_json

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
STATUSES = ("running", "trained", "done", "failed")


def library_versions() -> dict[str, str | None]:
    """Installed versions of the packages that decide the results."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def resolved_config(script_args, stage_args, model_args, stage, data_hash: str, previous: str | None) -> dict:
    """Everything that decides a stage's result: data, model, the stage's training arguments, and its parent."""
    sections = {"data": script_args, "model": model_args, "training": stage_args}
    config = {
        name: {k: v for k, v in _plain(obj).items() if k not in NON_RESULT_KEYS and not k.startswith("_")}
        for name, obj in sections.items()
    }
    config["training"].pop("stages", None)
    config["stage"] = {k: v for k, v in _plain(stage).items()}
    config["data_hash"] = data_hash
    config["previous_stage_hash"] = previous
    return config


def config_hash(config: dict) -> str:
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
        return self.data["stages"].get(name)

    def update(self, name: str, **fields: Any) -> None:
        entry = self.data["stages"].setdefault(name, {})
        entry.update(fields)
        entry["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        self.data["library_versions"] = library_versions()
        if self.write:
            write_json(self.path, self.data)

    def forget(self, name: str) -> None:
        if self.data["stages"].pop(name, None) is not None and self.write:
            write_json(self.path, self.data)
