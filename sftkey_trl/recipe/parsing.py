"""Read a recipe: `--config FILE` plus command-line overrides into a `Recipe` (its dataclasses and stages).
Only the parsing lives here (unknown keys, wrong types, keys given twice); every rule about the values is in
`checks.py`."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Any

import yaml
from trl import ModelConfig, TrlParser

from ..errors import SFTKeyError, closest, invalid_arguments, show_value
from ..train.objectives import parse_stages
from .flags import TYPE_WORDS, OneLineErrors, flag_value
from .schema import Recipe, SFTKeyConfig, SFTKeyScriptArguments
from .values import check_key_value


class RecipeParser(OneLineErrors, TrlParser):
    """TRL's parser of the recipe's keys, its errors one line (argparse would print some 160 lines of usage)."""


class DuplicateKey(yaml.YAMLError):
    """A mapping in YAML text gives one key twice (PyYAML would silently keep the last)."""

    def __init__(self, key: Any, lines: tuple[int, int]):
        super().__init__(f"key `{key}` is given twice (lines {lines[0]} and {lines[1]})")


class RecipeLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            try:
                if key in seen:
                    raise DuplicateKey(key, (seen[key], line))
                seen[key] = line
            except TypeError:  # an unhashable key: PyYAML's own error follows
                break
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str, where: str) -> Any:
    """YAML text (a recipe, or the `--stages` value) with one-line errors that name `where` and the line."""
    try:
        return yaml.load(text, Loader=RecipeLoader)
    except DuplicateKey as error:
        raise SFTKeyError(f"{where}: {error}; keep one of them") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        problem = getattr(error, "problem", None)
        detail = f" ({problem})" if problem else ""
        raise SFTKeyError(f"{where} is not valid YAML{at}{detail}; fix the syntax there") from None


def read_recipe(config_path: str) -> dict[str, Any]:
    """The recipe file's mapping of keys to values, with one-line errors for a file that cannot be read."""
    try:
        with open(config_path, encoding="utf-8") as handle:
            text = handle.read()
    except FileNotFoundError:
        raise SFTKeyError(f"recipe `{config_path}` does not exist; check the path given to --config") from None
    except IsADirectoryError:
        raise SFTKeyError(f"recipe `{config_path}` is a folder; give --config a recipe's .yaml file") from None
    except UnicodeDecodeError as error:
        byte, line = error.object[error.start], error.object[: error.start].count(b"\n") + 1
        raise SFTKeyError(
            f"recipe `{config_path}` is not UTF-8 text (byte {byte:#04x} on line {line}); save it as UTF-8"
        ) from None
    except OSError as error:
        raise SFTKeyError(f"recipe `{config_path}` cannot be read ({error.strerror}); check the file") from None
    config = load_yaml(text, f"recipe `{config_path}`") or {}
    if not isinstance(config, dict):
        raise SFTKeyError(f"recipe `{config_path}` must be a YAML mapping of keys to values")
    return config


SINGLE_FLAGS = ("--config", "--stages")  # read apart from argparse (whose usual rule, the last one wins, is theirs)


def repeated_flag(argv: list[str]) -> str | None:
    """`--config` or `--stages` when given twice on the command line."""
    for flag in SINGLE_FLAGS:
        if sum(item == flag or item.startswith(flag + "=") for item in argv) > 1:
            return flag
    return None


def parse_config(argv: list[str] | None = None) -> Recipe:
    """Parse `--config FILE` plus CLI overrides (`--stages` takes a YAML/JSON list) into a `Recipe`; unknown keys
    and wrong types or values raise a one-line `SFTKeyError` naming the key and the closest valid one."""
    argv = list(sys.argv[1:] if argv is None else argv)
    repeated = repeated_flag(argv)
    if repeated is not None:
        raise SFTKeyError(f"`{repeated}` is given twice on the command line; keep one")
    config_path = flag_value(argv, "--config", remove=True)
    overrides = list(argv)  # the command-line keys a model card records, never the secret `--hub_token`
    while flag_value(overrides, "--hub_token", remove=True) is not None:
        pass
    stages_override = flag_value(argv, "--stages", remove=True)
    classes = (SFTKeyScriptArguments, SFTKeyConfig, ModelConfig)
    parser = RecipeParser(classes)
    known = {action.dest for action in parser._actions}
    config: dict[str, Any] = read_recipe(config_path) if config_path is not None else {}
    for key in config:
        if key not in known and key != "env":
            raise SFTKeyError(f"unknown recipe key `{key}` in {config_path}{closest(key, known)}")
    for item in argv:
        if item.startswith("--"):
            key = item[2:].split("=", 1)[0]
            if key not in known:
                raise SFTKeyError(f"unknown command-line option `--{key}`{closest(key, known)}")
    if stages_override is not None:
        config["stages"] = load_yaml(stages_override, "`--stages`")
    for key, value in config.items():  # CLI strings are typed by argparse; YAML values must be checked here
        check_key_value(key, value)
        if key not in ("env", "stages"):  # typed now: argparse would print its usage for a string it cannot read
            config[key] = _coerce(parser, key, value)
    for name, value in _environment(config.pop("env", None)).items():
        os.environ[name] = value
    parser.set_defaults_with_config(**config)
    try:
        script_args, training_args, model_args, stray = parser.parse_args_into_dataclasses(
            args=argv, return_remaining_strings=True
        )
    except SFTKeyError:  # the parser's own one-line error (`RecipeParser`)
        raise
    except Exception as error:  # TRL's __post_init__ raises many types for values it refuses
        own = [(cls, {k: v for k, v in config.items() if k in _field_names(cls)}, None) for cls in classes]
        raise invalid_arguments(error, own) from error
    if stray:
        raise SFTKeyError(
            f"`{stray[0]}` on the command line belongs to no `--key`: give each key one value (`--key value`)"
        )
    training_keys = {f.name for f in dataclasses.fields(training_args)} - {"stages"}
    stages = parse_stages(training_args.stages, training_keys, lambda *args: _coerce(parser, *args))
    return Recipe(script_args, training_args, model_args, stages, config_path, overrides)


def _coerce(parser: TrlParser, key: str, value: Any, where: str = "") -> Any:
    """Convert a YAML string (PyYAML reads `2e-4` as a string) with the argparse type of `key`."""
    action = _action(parser, key)
    if not isinstance(value, str) or action is None or action.type in (None, str):
        return value
    try:
        return action.type(value)
    except (TypeError, ValueError, argparse.ArgumentTypeError):
        kind = TYPE_WORDS.get(getattr(action.type, "__name__", ""), "")
        raise SFTKeyError(
            f"{where}`{key}: {show_value(value)}` has the wrong type; give {kind or 'a valid value (see --help)'}"
        ) from None


def _field_names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls) if f.init}


def _action(parser: TrlParser, key: str):
    return next((action for action in parser._actions if action.dest == key), None)


def _environment(env: Any) -> dict[str, str]:
    """The recipe's `env:` mapping of environment variable names to plain values, as strings."""
    if env is None:
        return {}
    if not isinstance(env, dict):
        raise SFTKeyError(f"`env` must be a mapping of environment variable names to values, got {show_value(env)}")
    for name, value in env.items():
        if not isinstance(name, str) or not name or "=" in name or isinstance(value, (list, dict)) or value is None:
            raise SFTKeyError(f"`env`: `{name}: {show_value(value)}` is not a variable name with a plain value")
    return {name: str(value).lower() if isinstance(value, bool) else str(value) for name, value in env.items()}
