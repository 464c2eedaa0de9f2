"""Where a dataset's rows come from: the offline demo (built into the cache on first use), a local file or folder,
or the Hugging Face Hub; each way it can fail is one line."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

from datasets import Dataset, Features, Value, load_dataset

from ..errors import SFTKeyError, first_line
from ..files import DEMO_PREFIX, cache_root

logger = logging.getLogger(__name__)

FILE_LOADERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
TEXT_SUFFIXES = (".jsonl", ".json", ".csv")
DEMO_SPLITS = ("train", "test")


def local_path(name: str, what: str = "dataset_name") -> Path | None:
    """The local file or folder that `name` names (None for a hub id or a demo name); a one-line error when it
    does not exist or is not a .jsonl/.json/.parquet/.csv file."""
    path, shown = Path(name).expanduser(), name.replace("\n", "\\n")
    try:
        exists = path.exists()
    except OSError as error:  # a name too long for a path, or one the OS cannot look up
        fix = "give a hub id or the path of a .jsonl/.json/.parquet/.csv file"
        raise SFTKeyError(f"`{what}`: `{shown[:60]}` is not a usable file name ({error.strerror}); {fix}") from None
    if name.startswith(DEMO_PREFIX) or not (path.suffix in FILE_LOADERS or exists or name.startswith((".", "/", "~"))):
        return None
    if not exists:
        raise SFTKeyError(f"`{what}`: file `{shown}` does not exist; check the path (relative to {Path.cwd()})")
    if path.is_file() and path.suffix not in FILE_LOADERS:
        raise SFTKeyError(f"`{what}`: `{name}` is not a .jsonl, .json, .parquet or .csv file")
    if path.is_file() and _is_blank(path):
        raise SFTKeyError(f"`{what}`: `{name}` is empty; point `{what}` at a file with at least one row")
    return path


def _is_blank(path: Path) -> bool:
    """A zero-byte file, or a small text file of whitespace only (which `datasets` reads as 'no data'); read as
    bytes, so that a file that is not UTF-8 reaches the reader's one-line error."""
    size = path.stat().st_size
    return size == 0 or (path.suffix in (".jsonl", ".json", ".csv") and size < 4096 and not path.read_bytes().strip())


def _load_demo(name: str, split: str, what: str) -> Dataset:
    """Build a demo dataset under the cache on first use (folder names are versioned), then load one split."""
    from . import synthetic, word_problems

    writers = {
        "demo:arithmetic": ("demo-arithmetic-v2", synthetic.write_arithmetic_dataset),
        "demo:remainder": ("demo-remainder-v1", synthetic.write_remainder_dataset),
        "demo:word_problems": ("demo-word-problems-v1", word_problems.write_word_problem_dataset),
    }  # bump a folder's version when its generator changes
    if name not in writers:
        raise SFTKeyError(f"`{what}: {name}` is not a known demo dataset; use one of {', '.join(writers)}")
    folder, write = writers[name]
    directory = cache_root() / folder
    if split not in DEMO_SPLITS:
        raise SFTKeyError(f"the demo dataset has splits {' and '.join(DEMO_SPLITS)}, not `{split}`")
    for attempt in ("first", "again"):
        if attempt == "again" or not all((directory / f"{part}.jsonl").is_file() for part in DEMO_SPLITS):
            write(directory)  # atomically, file by file
        try:
            return load_dataset("json", data_files=str(directory / f"{split}.jsonl"), split="train")
        except Exception as error:  # a damaged file in the cache: written again, once
            if attempt == "again":
                raise SFTKeyError(
                    f"`{what}: {name}`: its files under {directory} cannot be read ({first_line(error)}); check that "
                    "folder (SFTKEY_CACHE)"
                ) from error
            logger.warning("the demo data under %s cannot be read (%s): written again", directory, first_line(error))
    raise AssertionError("unreachable")


def _read_local(path: Path, config: str | None, split: str) -> Dataset:
    """A local dataset folder, or a file with its loader; a CSV's cells as their text (pandas would read `007` as 7,
    `2.50` as 2.5, a column of `True`/`False` as booleans and `NA` as a missing value)."""
    if path.is_dir():
        return load_dataset(str(path), config, split=split)
    options = {}
    if path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8-sig") as handle:  # as pandas, a byte-order mark is no name
            header = next(csv.reader(handle), [])
        options["features"] = Features({column: Value("string") for column in header})
        options["keep_default_na"] = False  # `NA`, `None` and `nan` are text in a CSV; an empty cell is empty
    return load_dataset(FILE_LOADERS[path.suffix], data_files=str(path), split="train", **options)


def _first_invalid_utf8(path: Path) -> tuple[int, int] | None:
    """(line number, byte) of the first bytes of a text file that are not UTF-8, or None (a character never spans
    lines: a newline byte is never part of one)."""
    with open(path, "rb") as handle:
        for number, line in enumerate(handle, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as error:
                return number, line[error.start]
    return None


def load_source(name: str, config: str | None, split: str, what: str = "dataset_name") -> Dataset:
    """Load one split from the demo, a local file/folder, or the hub, with one-line errors for each failure."""
    if name.startswith(DEMO_PREFIX):
        return _load_demo(name, split, what)
    path = local_path(name, what)
    if path is not None:
        try:
            dataset = _read_local(path, config, split)
            dataset.data.table.validate(full=True)  # pyarrow reads JSON strings without checking their UTF-8
        except Exception as error:  # datasets raises many types for malformed files
            invalid = _first_invalid_utf8(path) if path.suffix in TEXT_SUFFIXES else None
            if invalid is not None:
                line, byte = invalid
                raise SFTKeyError(
                    f"`{what}`: `{name}` is not UTF-8 text (byte {byte:#04x} on line {line}); save it as UTF-8"
                ) from error
            raise SFTKeyError(
                f"`{what}`: could not read `{name}` ({first_line(error)}); check that it is a valid "
                f"{path.suffix or 'dataset folder'} with at least one row"
            ) from error
        if len(dataset) == 0:
            raise SFTKeyError(f"`{what}`: `{name}` has no rows; point `{what}` at a file with at least one row")
        return dataset
    try:
        return load_dataset(name, config, split=split)
    except Exception as error:  # network, auth, missing split: all are user-fixable
        raise SFTKeyError(
            f"`{what}: {name}` could not be loaded from the Hugging Face Hub ({first_line(error)}); check the id, "
            f"split and network, or download it and point `{what}` at a local .jsonl/.parquet copy"
        ) from error
