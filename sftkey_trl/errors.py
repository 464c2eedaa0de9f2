"""One exception type for every problem a user can fix: it prints as one line, never a traceback."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class SFTKeyError(Exception):
    """A problem with the user's recipe, data or environment.

    The message is one line that names the problem and the fix; `recipes/run.py` prints it
    without a traceback (unless `--debug`) and exits with status 2.
    """


def first_line(error: BaseException) -> str:
    """An exception's first line, or its type when it has no message (`StopIteration`, `IndexError`, ...)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def closest(name: str, candidates: Iterable[str]) -> str:
    """Return ' (did you mean `x`?)' for the closest candidate to `name`, or '' when none is close."""
    match = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean `{match[0]}`?)" if match else ""
