"""Every recipe value against its key's type and range (`schema.KEY_RANGES`, `schema.key_types`), and the values
that name something (an adapter, a column, the model, a demo split). YAML values bypass argparse's typing, so
`parse_config` checks raw values here and `check_recipe` the stage overrides and the resolved values.
"""

from __future__ import annotations

from typing import Any

from ..errors import SFTKeyError, closest, show_value
from ..files import DEMO_PREFIX
from ..models import DEMO_MODEL
from .options import UNSUPPORTED_OPTIONS
from .schema import KEY_RANGES, Recipe, key_types


def _is_bool_word(value: str) -> bool:
    """Whether the recipe parser reads `value` as a boolean (transformers' `string_to_bool`, its argparse type)."""
    from argparse import ArgumentTypeError

    from transformers.hf_argparser import string_to_bool

    try:
        return isinstance(string_to_bool(value), bool)
    except ArgumentTypeError:
        return False


_KIND_WORDS = {"bool": "true or false", "int": "a whole number", "float": "a number", "str": "a string",
               "list": "a list", "dict": "a mapping"}  # fmt: skip


def _number(value: Any, integer: bool) -> float | int | None:
    """`value` as a finite number (a numeric string too: PyYAML reads `2e-4` as one), else None. Never a bool."""
    if isinstance(value, str):
        try:
            value = int(value) if integer else float(value)
        except ValueError:
            return None
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        return None
    return value if value == value and abs(value) != float("inf") else None


def check_key_value(key: str, value: Any, where: str = "") -> None:
    """One recipe value against its key's type (annotation) and range (`KEY_RANGES`); `where` prefixes the error
    (a stage). Keys outside the schema are the unknown-key check's business."""
    kind = key_types().get(key)
    if kind is None or key == "stages":
        return
    named, got = f"{where}`{key}`", show_value(value)
    if value is None:
        if kind.nullable:
            return
        raise SFTKeyError(f"{named} cannot be null; give a value, or remove the key for its default")
    if (kind.choices and _is_choice(value, kind.choices)) or kind.opaque:
        return
    if kind.choices and isinstance(value, str) and key in {option[0] for option in UNSUPPORTED_OPTIONS}:
        return  # `check_trainer_options` refuses it naming the alternative
    if isinstance(value, bool) and "bool" in kind.kinds:
        return
    rule = KEY_RANGES.get(key)
    bool_word = "bool" in kind.kinds and isinstance(value, str) and _is_bool_word(value)
    if isinstance(value, str) and not rule and ("str" in kind.kinds or bool_word):
        return
    numeric = kind.kinds & {"int", "float"}
    if numeric and not isinstance(value, (list, dict)):
        integer = numeric == {"int"} or (rule is not None and rule.integer)
        number = _number(value, integer)
        if number is None:
            wanted = rule.text if rule else _KIND_WORDS["int" if integer else "float"]
            raise SFTKeyError(f"{named} must be {wanted}, got {got}")
        if rule and not rule.holds(number):
            raise SFTKeyError(f"{named} must be {rule.text}, got {got}")
        return
    if isinstance(value, list) and "list" in kind.kinds and all(isinstance(item, (str, dict)) for item in value):
        return
    if isinstance(value, dict) and "dict" in kind.kinds:
        return
    expected = [_KIND_WORDS[k] for k in sorted(kind.kinds)]
    expected += [f"one of {', '.join(map(show_value, kind.choices))}"] if kind.choices else []
    expected += ["null"] if kind.nullable else []
    raise SFTKeyError(f"{named} must be {' or '.join(expected)}, got {got}")


def _is_choice(value: Any, choices: tuple) -> bool:
    return any(value == choice or (isinstance(value, str) and value == str(choice)) for choice in choices)


def check_key_values(recipe: Recipe) -> None:
    """The resolved values of the keys with a range, and every stage override, against the schema."""
    for args in (recipe.script, recipe.training, recipe.model):
        for key in KEY_RANGES:
            if hasattr(args, key):
                check_key_value(key, getattr(args, key))
    for index, stage in enumerate(recipe.stages):
        for key, value in stage.overrides.items():
            check_key_value(key, value, f"stages[{index}] ({stage.name}): ")


NON_EMPTY_KEYS = ("dataset_format", "question_field", "reasoning_field", "answer_field", "answer_template",
                  "prompt_template", "model_name_or_path")  # fmt: skip


def check_named_values(script_args, model_args) -> None:
    """Values that name something: the adapter, the columns, the model (required) and the demo data's splits."""
    from ..data.adapters import ADAPTERS
    from ..data.sources import DEMO_SPLITS

    for key in NON_EMPTY_KEYS:
        args = model_args if key == "model_name_or_path" else script_args
        value = getattr(args, key)
        if value is None or not str(value).strip():
            raise SFTKeyError(f"`{key}` is {'not set' if value is None else 'empty'}; give {_NAMED[key]}")
    if script_args.dataset_format not in ADAPTERS:
        name, hint = script_args.dataset_format, closest(script_args.dataset_format, ADAPTERS)
        raise SFTKeyError(f"`dataset_format: {show_value(name)}` is not valid{hint}; use one of {', '.join(ADAPTERS)}")
    name, eval_name = script_args.dataset_name or "", script_args.eval_dataset_name or ""
    splits = [(name, "dataset_split", script_args.dataset_split)]
    splits.append((eval_name or name, "eval_split", script_args.eval_split))
    for source, key, split in splits:
        if source.startswith(DEMO_PREFIX) and split is not None and split not in DEMO_SPLITS:
            raise SFTKeyError(
                f"`{key}: {show_value(split)}`: the demo dataset `{source}` has the splits "
                f"{' and '.join(DEMO_SPLITS)}; use one of them"
            )


_NAMED = {
    "dataset_format": "an adapter name (generic, gsm8k, ...)",
    "question_field": "the question column's name",
    "reasoning_field": "the reasoning column's name",
    "answer_field": "the answer column's name",
    "answer_template": "a line with `{answer}`, e.g. `The answer is {answer}.`",
    "prompt_template": "a layout with `{question}`",
    "model_name_or_path": f"a hub id, a local folder or `{DEMO_MODEL}`",
}
