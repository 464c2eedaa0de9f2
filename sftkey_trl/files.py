"""The project's files: atomic file and folder writes (a temporary name, then a rename: a kill never leaves a
half-written file), the marker that says which folders this project made, and `discard`, the one gate every delete
goes through (tests/test_files.py checks that nothing else in the package deletes, renames or replaces); also the
JSON/YAML-friendly form of configuration values, and the cache where demo data and models are built."""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import json
import logging
import os
import secrets
import shutil
import time
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any

from .errors import SFTKeyError, first_line

logger = logging.getLogger(__name__)

DEMO_PREFIX = "demo:"  # the names of the demo datasets and model, built locally under `cache_root()`
MARKER = ".sftkey"  # {"kind": ..., ...}: written into every folder this project creates and may later delete
KINDS = {
    "run": "the output folder of an sftkey-trl run",
    "stage": "a stage folder of an sftkey-trl run",
    "snapshots": "keep_best's snapshot folder",
    "snapshot": "a keep_best snapshot",
    "merge": "a merged model written by --merge",
    "comparison": "a compare.py folder",
    "tmp": "a temporary folder of sftkey-trl",
    "cache": "a cache folder of sftkey-trl (tokenized data)",
    "lock": "an sftkey-trl lock file",
}


def cache_root() -> Path:
    """Where locally built demo data and models live (`SFTKEY_CACHE`, default `~/.cache/sftkey_trl`)."""
    return Path(os.environ.get("SFTKEY_CACHE", Path.home() / ".cache" / "sftkey_trl"))


def write_text(path: str | Path, text: str) -> None:
    """Write `text` to `path` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def write_json(path: str | Path, data: Any) -> None:
    """Write `data` as indented JSON, atomically."""
    write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def write_jsonl(path: str | Path, rows: list[dict]) -> None:
    """Write one JSON object per line, atomically."""
    write_text(path, "".join(json.dumps(row, default=str) + "\n" for row in rows))


@contextlib.contextmanager
def write_folder(directory: str | Path, kind: str | None = None) -> Iterator[Path]:
    """A fresh temporary folder beside `directory` to write into, renamed onto it when the block ends (removed on an
    error); with `kind`, the folder carries that marker. When another process completed `directory` first (several
    ranks may build it at once), its copy stays. An earlier folder the block means to replace, it removes itself
    (`discard`): the rename never replaces a folder."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    tmp.mkdir()  # a new name: never an earlier one's leftover
    mark_folder(tmp, "tmp")
    try:
        yield tmp
        if kind is not None:
            mark_folder(tmp, kind, replace="tmp")
        try:
            os.replace(tmp, directory)  # onto an empty folder at most: a complete one stays (ENOTEMPTY)
        except OSError:
            if not directory.is_dir():
                raise
        else:
            if kind is None:
                discard(directory / MARKER, kinds=["tmp"])
    finally:
        discard(tmp, kinds=["tmp", kind or "tmp"])


@contextlib.contextmanager
def created_for(folder: str | Path) -> Iterator[Path]:
    """`folder`, created for the block where missing; the folders this call created and the block left empty are
    removed after it (`os.rmdir` removes only an empty folder), so a start that fails leaves nothing behind."""
    folder = Path(folder)
    missing = [path for path in [folder, *folder.parents] if not path.exists()]
    created = []
    for path in reversed(missing):
        try:
            path.mkdir()
            created.append(path)  # made by this call, not by another process at the same moment
        except FileExistsError:
            pass
    try:
        yield folder
    finally:
        for path in reversed(created):
            try:
                os.rmdir(path)
            except OSError:  # not empty (the run wrote into it), or gone
                break


def folder_marker(folder: str | Path) -> dict | None:
    """The marker this project wrote into `folder` (None: none, or not readable as one)."""
    try:
        found = json.loads((Path(folder) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) and found.get("kind") in KINDS else None


def describe_folder(folder: str | Path) -> str:
    """What `folder` is, in words, from its marker."""
    found = folder_marker(folder)
    return KINDS[found["kind"]] if found else f"a folder sftkey-trl did not create (it has no {MARKER} marker)"


def mark_folder(folder: str | Path, kind: str, replace: str | None = None, **identity: Any) -> None:
    """Create `folder` if needed and mark it as this project's, of `kind` (see KINDS) with `identity` (kept when it
    already carries that kind). A folder marked as another kind is refused (`replace`: the one kind it may be)."""
    folder = Path(folder)
    found = folder_marker(folder)
    if found is not None and found["kind"] == kind:
        return
    if found is not None and found["kind"] != replace:
        raise SFTKeyError(f"{folder} is {KINDS[found['kind']]}, not {KINDS[kind]}; use another folder")
    folder.mkdir(parents=True, exist_ok=True)
    # No host or user: a marker travels with the folder (a merged model uploaded by hand, say)
    write_json(folder / MARKER, {"kind": kind, "created": time.strftime("%Y-%m-%dT%H:%M:%S"), **identity})


def discard(*paths: str | Path, kinds: Collection[str], fix: str = "") -> None:
    """The one place the package deletes: remove each of `paths` (a missing one is fine) after checking, for all of
    them first, that this project made it: a folder must carry this project's marker of one of `kinds`; a file must
    lie in such a folder, or be a record of one of `kinds` itself (a lock file). Anything else (a symbolic link
    included) is refused in one line naming it and `fix`, and nothing is deleted."""
    paths = [Path(path) for path in paths]
    check_discardable(*paths, kinds=kinds, fix=fix)
    for path in paths:
        if not path.is_dir():
            path.unlink(missing_ok=True)
            continue
        for child in path.iterdir():  # the marker last: a kill midway leaves a folder this gate still knows
            if child.name != MARKER:
                shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
        (path / MARKER).unlink(missing_ok=True)
        path.rmdir()


def check_discardable(*paths: str | Path, kinds: Collection[str], fix: str = "") -> None:
    """`discard`'s check alone, for a caller that must know before it changes anything (a record that vouches for
    the paths, say) that the deletion will go ahead."""
    for path in map(Path, paths):
        if path.is_symlink() or path.exists() and not _made_here(path, kinds):
            what = "a symbolic link" if path.is_symlink() else _owner_words(path)
            fix = fix or "move it away yourself if it should go, or choose another folder"
            raise SFTKeyError(f"refusing to delete {path}: it is {what}; nothing was deleted; {fix}")


def _made_here(path: Path, kinds: Collection[str]) -> bool:
    if path.is_dir():
        found = folder_marker(path)
        return found is not None and found["kind"] in kinds
    found = folder_marker(path.parent)
    if found is not None and found["kind"] in kinds:
        return True
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and record.get("kind") in kinds and record.get("kind") in KINDS


def _owner_words(path: Path) -> str:
    if path.is_dir():
        return describe_folder(path)
    return f"a file in {describe_folder(path.parent)}"


def set_aside(path: str | Path, why: str) -> Path:
    """Rename a file this project cannot read (a truncated manifest, say) to `<name>.corrupt-<time>` beside it, never
    deleting it; return the new path. `why`: for the refusal when that name is taken (never overwritten)."""
    path = Path(path)
    target = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
    if target.exists():
        raise SFTKeyError(f"{path} {why} and {target} exists already; move one of them away and rerun")
    os.rename(path, target)
    return target


def read_json(path: str | Path, default: Any = None, without: str | None = None) -> Any:
    """Read JSON from `path`, or return `default` when the file does not exist. With `without` (what the caller does
    without the file, in words), a file that cannot be read (truncated, not JSON, not UTF-8) is a warning line naming
    it and `without`, and `default`; the file stays as it is."""
    path = Path(path)
    if not path.exists():
        return default
    if without is None:
        return json.loads(path.read_text())
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        logger.warning("%s cannot be read (%s): %s", path, first_line(error), without)
        return default


def plain(value: Any) -> Any:
    """A JSON/YAML-friendly copy of a configuration value (dataclasses and dicts become dicts, enums their value)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return plain(value.value)
    if isinstance(value, dict):
        return {str(key): plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(item) for item in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)
