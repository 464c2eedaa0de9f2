"""The rules for every folder the project writes (`output_dir`, the cache, `--merge_dir`, compare.py's
`--comparison_dir`): each refused in one line when it cannot be written or is another kind of this project's
folders, before any model or data is loaded. They only read: `--dry_run` runs them and creates nothing."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import SFTKeyError
from ..files import cache_root, describe_folder, folder_marker


def check_writable_folder(path: str | Path, name: str) -> None:
    """`path` is a folder, or can be made one: not a file, under no file, its nearest existing folder writable.
    `name`: how the user gave it (`output_dir: x`), for the message."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise SFTKeyError(f"{name} is a file, not a folder; name a folder")
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise SFTKeyError(f"{name} cannot be created: {existing} is a file; name a folder whose parents are folders")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise SFTKeyError(f"{name} cannot be written: {existing} is not writable; name a folder you can write to")


def check_kind(path: str | Path, name: str, kind: str, fix: str) -> None:
    """A folder that carries this project's marker must carry `kind`'s (a run must not write into a stage's)."""
    found = folder_marker(path) if Path(path).is_dir() else None
    if found is not None and found["kind"] != kind:
        raise SFTKeyError(f"{name} is {describe_folder(path)}; {fix}")


def check_output_folders(training_args) -> None:
    """The run's `output_dir` and the cache (`SFTKEY_CACHE`): writable folders; `output_dir` no other kind of this
    project's folders (a stage folder, a merged model, compare.py's folder)."""
    name = f"`output_dir: {training_args.output_dir}`"
    check_writable_folder(training_args.output_dir, name)
    check_kind(training_args.output_dir, name, "run", "a run writes its own folder: use another output_dir")
    check_writable_folder(cache_root(), f"the cache {cache_root()} (SFTKEY_CACHE)")


def check_merge_folder(merge_dir: str | Path) -> None:
    """`--merge_dir`: a merge replaces its folder, so it must not exist yet or hold an earlier merge."""
    name = f"`--merge_dir {merge_dir}`"
    check_writable_folder(merge_dir, name)
    if Path(merge_dir).exists() and (folder_marker(merge_dir) or {}).get("kind") != "merge":
        raise SFTKeyError(
            f"{name} is {describe_folder(merge_dir)}; a merge replaces its folder, so it writes only into a new "
            "folder or an earlier merge's: nothing was deleted, name one of those"
        )


def check_comparison_folder(comparison_dir: str | Path) -> None:
    """compare.py's folder: writable, and no other kind of this project's folders."""
    name = f"`--comparison_dir {comparison_dir}`"
    check_writable_folder(comparison_dir, name)
    check_kind(comparison_dir, name, "comparison", "compare.py writes its own folder: name another")
