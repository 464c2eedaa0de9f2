"""Reading one `--flag value` from a command line, without importing the ML libraries (the entry points read the
recipe path before they set up the process)."""

from __future__ import annotations


def flag_value(argv: list[str], flag: str, remove: bool = False) -> str | None:
    """The value of `flag` given as `--flag value` or `--flag=value` in `argv` (removed from it with `remove`)."""
    for index, item in enumerate(argv):
        if item == flag and index + 1 < len(argv):
            value = argv[index + 1]
            if remove:
                del argv[index : index + 2]
            return value
        if item.startswith(flag + "="):
            if remove:
                del argv[index]
            return item.split("=", 1)[1]
    return None
