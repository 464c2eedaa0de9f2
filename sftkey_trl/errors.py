"""One exception type for every problem a user can fix: it prints as one line, never a traceback."""

from __future__ import annotations

import difflib
import warnings
from collections.abc import Iterable
from typing import Any


class SFTKeyError(Exception):
    """A problem with the user's recipe, data or environment: one line naming the problem and the fix, which
    `recipes/run.py` prints without a traceback (unless `--debug`), exiting with status 2."""


def first_line(error: BaseException) -> str:
    """An exception's first line, or its type when it has no message (`StopIteration`, `IndexError`, ...)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def closest(name: str, candidates: Iterable[str]) -> str:
    """Return ' (did you mean `x`?)' for the closest candidate to `name`, or '' when none is close."""
    match = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean `{match[0]}`?)" if match else ""


def show_value(value: Any) -> str:
    """A value as YAML would show it, on one short line (for error messages)."""
    plain = isinstance(value, str) and value.isprintable() and value.strip() == value and value != ""
    text = "null" if value is None else str(value).lower() if isinstance(value, bool) else repr(value)
    text = value if plain else text
    return text if len(text) <= 40 else text[:37] + "..."


def key_of_failure(cls: type, values: dict[str, Any], base: dict[str, Any] | None = None) -> str | None:
    """The key of `values` that alone (over `base`, else the defaults) makes building `cls` fail, or None."""
    for key, value in values.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cls(**{**(base or {}), key: value})
        except Exception:  # any failure of TRL's __post_init__ points at this key
            return key
    return None


def invalid_arguments(error: Exception, candidates: list[tuple[type, dict, dict | None]], where: str = ""):
    """The one-line `SFTKeyError` for TRL / transformers refusing the recipe's arguments while building them (any
    exception type: a missing DeepSpeed file, an unknown accelerator option, ...), naming the key that causes it.
    `candidates`: (dataclass, the recipe's values for it, the values it is built over)."""
    detail = first_line(error)
    detail = detail if len(detail) <= 200 else detail[:197] + "..."
    for cls, values, base in candidates:
        key = key_of_failure(cls, values, base)
        if key is not None:
            return SFTKeyError(f"{where}`{key}: {show_value(values[key])}` is not valid ({detail}); fix or remove it")
    return SFTKeyError(f"{where}invalid configuration: {detail}")
