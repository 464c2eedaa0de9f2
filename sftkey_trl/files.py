"""Atomic file and folder writes (a temporary name, then a rename: a kill never leaves a half-written file), the
JSON/YAML-friendly form of configuration values, and the cache where demo data and models are built."""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

DEMO_PREFIX = "demo:"  # the names of the demo datasets and model, built locally under `cache_root()`


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
def write_folder(directory: str | Path) -> Iterator[Path]:
    """A fresh temporary folder beside `directory` to write into, renamed onto it when the block ends (removed on an
    error). When another process completed `directory` first (several ranks may build it at once), its copy stays."""
    directory = Path(directory)
    tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        try:
            os.replace(tmp, directory)
        except OSError:
            if not directory.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_json(path: str | Path, default: Any = None) -> Any:
    """Read JSON from `path`, or return `default` when the file does not exist."""
    path = Path(path)
    return json.loads(path.read_text()) if path.exists() else default


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
