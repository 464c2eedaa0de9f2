"""The stage plan and `<output_dir>/manifest.json`: per-stage resolved configuration, hashes, status and timings,
so that a rerun skips finished stages, resumes a killed one from its last complete checkpoint and refuses a
silently changed configuration. The disk wins over the manifest: a finished stage whose weights are gone is trained
again; a manifest that cannot be read is set aside; a folder holds one run's stages, never a mix."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import logging
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import SFTKeyError, first_line
from ..files import check_discardable, discard, folder_marker, mark_folder, plain, set_aside, write_json
from ..recipe.schema import Recipe
from ..train.keep_best import BEST_DIR
from ..train.objectives import Stage

logger = logging.getLogger(__name__)

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


DISCARDING = "discarding"  # a manifest entry's status while its stage folder is deleted: the stage is trained again


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


def read_run_file(path: Path, set_aside_if_unreadable: bool = True) -> dict | None:
    """`manifest.json` or `results.json` (a dict with a `stages` dict of dicts), or None when it does not exist or
    cannot be read; an unreadable one (truncated, not JSON, another shape) is set aside (`files.set_aside`, never
    deleted) with one line, by the process that writes (`set_aside_if_unreadable`; the others just read None)."""
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        stages = data.get("stages") if isinstance(data, dict) else None
        problem = None if isinstance(stages, dict) and all(isinstance(v, dict) for v in stages.values()) else ""
        problem = "not a record of stages" if problem == "" else problem
    except (OSError, UnicodeDecodeError, ValueError) as error:
        problem = first_line(error)
    if problem is None:
        return data
    if set_aside_if_unreadable:
        moved = set_aside(path, "cannot be read")
        logger.warning("%s cannot be read (%s): set aside as %s; going on without it", path, problem, moved.name)
    return None


class Manifest:
    """Read/modify/write wrapper around `manifest.json` (written atomically after every change)."""

    def __init__(self, output_dir: Path, write: bool = True):
        self.path = Path(output_dir) / "manifest.json"
        self.write = write
        existed = self.path.exists()
        read = read_run_file(self.path, write)
        self.unreadable = existed and read is None  # set aside: the stages it named cannot be checked
        self.data = read or {"stages": {}}

    def stage(self, name: str) -> dict | None:
        """The manifest entry of stage `name`, or None if it never started."""
        return self.data["stages"].get(name)

    def update(self, name: str, **fields: Any) -> None:
        """Merge `fields` into stage `name`'s entry, stamped with the time and library versions."""
        self.data["stages"].setdefault(name, {}).update(fields, updated=time.strftime("%Y-%m-%dT%H:%M:%S"))
        self.save()

    def save(self) -> None:
        """Write the manifest as it is in memory, stamped with the library versions (after `update`, or after
        changes to several entries at once)."""
        self.data["library_versions"] = library_versions()
        if self.write:
            write_json(self.path, self.data)

    def forget(self, name: str) -> None:
        """Drop stage `name`'s entry (it will be trained again)."""
        if self.data["stages"].pop(name, None) is not None and self.write:
            write_json(self.path, self.data)

    def stage_names(self) -> list[str]:
        """The stages of the run this folder holds (an earlier version's manifest: those that started)."""
        names = self.data.get("stage_names")
        return list(names) if isinstance(names, list) else list(self.data["stages"])

    def record_stage_names(self, names: list[str]) -> None:
        """Record the stages of the run this folder holds (`check_stage_names` compares a rerun's with them)."""
        if self.data.get("stage_names") != names:
            self.data["stage_names"] = names
            if self.write:
                write_json(self.path, self.data)


def check_stage_names(manifest: Manifest, names: list[str]) -> None:
    """A folder holds one run: refuse stages other than its run's (more stages after them may follow)."""
    before = manifest.stage_names()
    if before and names[: len(before)] != before:
        raise SFTKeyError(
            f"{manifest.path.parent} holds a run of the stages {before}, this recipe's are {names}: a folder holds "
            "one run, never a mix; use another output_dir, or pass --overwrite_output_dir true to replace that run"
        )


def own_run_folder(output_dir: Path, manifest: Manifest) -> None:
    """Mark `output_dir` as this project's run folder. A run folder an earlier version wrote (no marker, a manifest
    of sftkey-trl's) has the stage folders its manifest lists marked too, their keep_best snapshots and merges
    included: the manifest says this project made them, so a restart may replace them."""
    earlier = folder_marker(output_dir) is None and "sftkey-trl" in (manifest.data.get("library_versions") or {})
    mark_folder(output_dir, "run")
    if not earlier:
        return
    for name in manifest.data["stages"]:
        stage_dir = output_dir / name
        if stage_dir.is_dir() and not stage_dir.is_symlink() and folder_marker(stage_dir) is None:
            mark_folder(stage_dir, "stage", stage=name)
            if (stage_dir / BEST_DIR).is_dir():
                mark_folder(stage_dir / BEST_DIR, "snapshots")
                for snapshot in (stage_dir / BEST_DIR).glob("step-*"):
                    mark_folder(snapshot, "snapshot")
            if (stage_dir / "merged" / "config.json").is_file():
                mark_folder(stage_dir / "merged", "merge")


def clear_run(output_dir: Path, stage_names: list[str]) -> None:
    """`overwrite_output_dir`: delete the run in `output_dir` (the stages its manifest and `stage_names` name, the
    manifest and results.json), only where this project made it; anything else is refused before any deletion.
    The records go first: a kill midway leaves no stage reported, or called done, without its files, and the
    manifest's `discarding` entries make the next run finish the deletion (`plan_stages`)."""
    manifest = Manifest(output_dir)
    own_run_folder(output_dir, manifest)
    names = list(dict.fromkeys([*manifest.data["stages"], *stage_names]))
    stages = [output_dir / name for name in names]
    records = [output_dir / "results.json", output_dir / "manifest.json"]
    check_discardable(*stages, kinds=["stage"], fix=f"move it out of {output_dir}, or use another output_dir")
    check_discardable(*records, kinds=["run"])
    for name, stage_dir in zip(names, stages):
        if stage_dir.exists():
            manifest.data["stages"][name] = {**(manifest.stage(name) or {}), "status": DISCARDING}
    manifest.save()
    discard(records[0], kinds=["run"])
    discard(*stages, kinds=["stage"])
    discard(records[1], kinds=["run"])


def delete_stage(manifest: Manifest, name: str, fix: str) -> None:
    """Delete stage `name`'s folder to train it again: checked first, its manifest entry `discarding` while it goes
    (a kill midway: the next run finishes the deletion) and then dropped. Only the main process (`manifest.write`)
    deletes; every process's manifest forgets the stage."""
    stage_dir = manifest.path.parent / name
    if manifest.write:
        check_discardable(stage_dir, kinds=["stage"], fix=fix)
        if stage_dir.exists() and manifest.stage(name) is not None:
            manifest.update(name, status=DISCARDING)
        discard(stage_dir, kinds=["stage"], fix=fix)
    manifest.forget(name)


def _safetensors_complete(path: Path) -> bool:
    """Whether a .safetensors file holds all the bytes its header promises (a truncated copy does not)."""
    try:
        with open(path, "rb") as handle:
            (size,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(size))
        ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
        return path.stat().st_size >= 8 + size + max(ends, default=0)
    except (OSError, ValueError, KeyError, TypeError, IndexError, struct.error):
        return False


def missing_parts(stage_dir: Path, recorded: dict | None) -> str | None:
    """What a finished stage has lost (None: nothing): its weights, or its training record in results.json."""
    if gone := missing_weights(stage_dir):
        return gone
    if recorded is not None and "training" not in (recorded.get(stage_dir.name) or {}):
        return "results.json has no record of its training"
    return None


def missing_weights(folder: Path) -> str | None:
    """What a saved stage folder lacks to be loaded (None: nothing): its config and its weights, an adapter or full
    weights (one file or every shard its index names), each complete."""
    if not folder.is_dir():
        return f"{folder} is missing"
    if (folder / "adapter_config.json").is_file():
        files = ["adapter_model.safetensors"]
    elif not (folder / "config.json").is_file():
        return f"{folder} has no config.json or adapter_config.json"
    elif (folder / "model.safetensors.index.json").is_file():
        try:
            files = sorted(
                set(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"].values())
            )
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return f"{folder / 'model.safetensors.index.json'} cannot be read"
    else:
        files = ["model.safetensors"]
    for name in files:
        if not (folder / name).is_file():
            return f"{folder} has no {name}"
        if not _safetensors_complete(folder / name):
            return f"{folder / name} is incomplete"
    return None


@dataclass
class PlannedStage:
    """A stage with its resolved training arguments, its configuration hash and whether it is retrained."""

    stage: Stage
    args: Any
    digest: str
    config: dict
    restarting: bool


def plan_stages(
    recipe: Recipe,
    stage_args,
    data_hash: str,
    manifest: Manifest,
    processes: int,
    one_run: bool = True,
    recorded: dict | None = None,
) -> list[PlannedStage]:
    """Resolve each stage's arguments (`stage_args(stage)`) and configuration hash (which chains the previous
    stage's) for a launch of `processes` processes; refuse a changed finished stage unless `restart_from` says. The
    disk wins: a finished stage whose weights are gone, or whose training record is not in `recorded` (results.json's
    stages; None: not checked), is trained again, and the stages after it. `one_run`: refuse another run's stages
    (`check_stage_names`; compare.py's arms share their stage 1 folders on purpose)."""
    plan, previous, restarting = [], data_hash, False
    output_dir, restart_from = manifest.path.parent, recipe.training.restart_from
    if one_run:
        check_stage_names(manifest, [stage.name for stage in recipe.stages])
    for index, stage in enumerate(recipe.stages):
        args = stage_args(stage)
        config = resolved_config(recipe, args, stage, data_hash, previous, processes)
        digest = config_hash(config)
        restarting = restarting or stage.name == restart_from
        entry = manifest.stage(stage.name)
        status = (entry or {}).get("status")
        if status == DISCARDING and not restarting:
            if manifest.write:
                logger.warning(
                    "stage %s was being deleted to be trained again when a run stopped: training it again%s",
                    stage.name, " (and the stages after it)" if index + 1 < len(recipe.stages) else "",
                )  # fmt: skip
            restarting = True
        if (
            status in ("trained", "done")
            and not restarting
            and (gone := missing_parts(output_dir / stage.name, recorded))
        ):
            if manifest.write:
                later = " (and the stages after it: their input changes)" if index + 1 < len(recipe.stages) else ""
                logger.warning(
                    "stage %s is %s in the manifest but %s: training it again%s", stage.name, status, gone, later
                )
            restarting = True
        if not entry and not restarting and (output_dir / stage.name).exists():
            if folder_marker(output_dir / stage.name) is None:
                raise SFTKeyError(
                    f"{output_dir / stage.name} exists and is not sftkey-trl's (it has no .sftkey marker); move it "
                    "out of the output_dir, or use another output_dir"
                )
            if manifest.unreadable:
                raise SFTKeyError(
                    f"{output_dir / stage.name} exists but {manifest.path} could not be read (set aside), so its "
                    "configuration cannot be checked; pass --overwrite_output_dir true to train it again, or use "
                    "another output_dir"
                )
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
