"""Read a recipe: `--config FILE` plus command-line overrides into a `Recipe` (its dataclasses and stages).
Only the parsing lives here (unknown keys, wrong types); every rule about the values is in `checks.py`."""

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
from .flags import flag_value
from .schema import Recipe, SFTKeyConfig, SFTKeyScriptArguments
from .values import check_key_value


def parse_config(argv: list[str] | None = None) -> Recipe:
    """Parse `--config FILE` plus CLI overrides (`--stages` takes a YAML/JSON list) into a `Recipe`; unknown keys
    and wrong types or values raise a one-line `SFTKeyError` naming the key and the closest valid one."""
    argv = list(sys.argv[1:] if argv is None else argv)
    config_path = flag_value(argv, "--config", remove=True)
    overrides = list(argv)  # the command-line keys a model card records, never the secret `--hub_token`
    while flag_value(overrides, "--hub_token", remove=True) is not None:
        pass
    stages_override = flag_value(argv, "--stages", remove=True)
    classes = (SFTKeyScriptArguments, SFTKeyConfig, ModelConfig)
    parser = TrlParser(classes)
    known = {action.dest for action in parser._actions}
    config: dict[str, Any] = {}
    if config_path is not None:
        try:
            with open(config_path) as handle:
                config = yaml.safe_load(handle) or {}
        except FileNotFoundError:
            raise SFTKeyError(f"recipe `{config_path}` does not exist; check the path given to --config") from None
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark else ""
            raise SFTKeyError(f"recipe `{config_path}` is not valid YAML{where}; fix the syntax there") from None
        if not isinstance(config, dict):
            raise SFTKeyError(f"recipe `{config_path}` must be a YAML mapping of keys to values")
    for key in config:
        if key not in known and key != "env":
            raise SFTKeyError(f"unknown recipe key `{key}` in {config_path}{closest(key, known)}")
    for item in argv:
        if item.startswith("--"):
            key = item[2:].split("=", 1)[0]
            if key not in known:
                raise SFTKeyError(f"unknown command-line option `--{key}`{closest(key, known)}")
    if stages_override is not None:
        config["stages"] = yaml.safe_load(stages_override)
    for key, value in config.items():  # CLI strings are typed by argparse; YAML values must be checked here
        check_key_value(key, value)
        if key not in ("env", "stages"):  # typed now: argparse would print its usage for a string it cannot read
            config[key] = _coerce(parser, key, value)
    for name, value in (config.pop("env", None) or {}).items():
        os.environ[name] = str(value)
    parser.set_defaults_with_config(**config)
    try:
        script_args, training_args, model_args = parser.parse_args_into_dataclasses(args=argv)
    except SystemExit as exit_:  # argparse already printed a one-line usage error
        raise SFTKeyError("invalid command-line arguments (see the message above)") from exit_
    except Exception as error:  # TRL's __post_init__ raises many types for values it refuses
        own = [(cls, {k: v for k, v in config.items() if k in _field_names(cls)}, None) for cls in classes]
        raise invalid_arguments(error, own) from error
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
        kind = getattr(action.type, "__name__", "")
        kind = {"int": "a whole number", "float": "a number", "string_to_bool": "true or false"}.get(kind, "")
        raise SFTKeyError(
            f"{where}`{key}: {show_value(value)}` has the wrong type; give {kind or 'a valid value (see --help)'}"
        ) from None


def _field_names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls) if f.init}


def _action(parser: TrlParser, key: str):
    return next((action for action in parser._actions if action.dest == key), None)
