"""Reading one `--flag value` from a command line, without importing the ML libraries (the entry points read the
recipe path before they set up the process), and the command-line parsers' one-line errors."""

from __future__ import annotations

import argparse
import re

from ..errors import SFTKeyError

# argparse's type names, in the words the recipe checks use
TYPE_WORDS = {"int": "a whole number", "float": "a number", "string_to_bool": "true or false"}
_INVALID_VALUE = re.compile(r"argument (--[\w-]+)[^:]*: invalid (\w+) value: '(.*)'$", re.S)
_ARGUMENT = re.compile(r"argument (--[\w-]+)[^:]*: (.*)$", re.S)


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


def usage_error(message: str) -> str:
    """argparse's error message as one line naming the flag and what it takes (argparse prints the whole usage, some
    160 lines for the recipe's keys, before it)."""
    invalid = _INVALID_VALUE.match(message)
    if invalid:
        flag, kind, value = invalid.groups()
        wanted = TYPE_WORDS.get(kind, f"a valid {kind} value")
        return f"`{flag} {value}` has the wrong type; give {wanted}"
    argument = _ARGUMENT.match(message)
    if argument:
        flag, problem = argument.groups()
        return f"`{flag}`: {problem.replace(chr(10), ' ')}"
    return f"{message.replace(chr(10), ' ')} (see --help)"


class OneLineErrors:
    """An `argparse.ArgumentParser` mix-in whose errors are one-line `SFTKeyError`s (argparse's documented way:
    overriding `error`), never its usage text; abbreviated flags are not read as others (`allow_abbrev`)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        raise SFTKeyError(usage_error(message))


class FlagParser(OneLineErrors, argparse.ArgumentParser):
    """An entry point's own flags (`run.py`, `compare.py`)."""
