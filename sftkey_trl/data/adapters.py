"""Dataset adapters: turn one raw dataset row (a dict) into a (question, reasoning, answer) triple.

Each adapter knows one layout (its columns, hub defaults and answer kind). It strips every field, reads None or a
missing key as empty and a number as its text (`scalar_text`), and raises `RowRejected` with a snake_case `reason`
(counted per reason by the caller) for a row it cannot use, such as an empty question or answer, or a field that is
not text (a list, a mapping, true/false). Tags inside the reasoning are left to the validation.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from ..errors import SFTKeyError, closest


@dataclass(frozen=True)
class Triple:
    """One training/evaluation example: the question, the chain of thought and the final answer."""

    question: str
    reasoning: str
    answer: str


class RowRejected(ValueError):
    """Raised by an adapter for a row it cannot use; `reason` is a short snake_case code used for counting."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class FieldNames:
    """Column names read by the `generic` adapter (recipe keys `question_field`/`reasoning_field`/`answer_field`)."""

    question: str = "question"
    reasoning: str = "reasoning"
    answer: str = "answer"


@dataclass(frozen=True)
class Adapter:
    """A dataset layout: how to convert a row, which columns it needs and its hub defaults."""

    name: str
    convert: Callable[[dict, FieldNames], Triple]
    required_columns: Callable[[FieldNames], list[str]]
    answer_type: str
    description: str
    hub_id: str | None = None
    hub_config: str | None = None
    train_split: str = "train"
    test_split: str | None = "test"


def scalar_text(value: Any) -> str | None:
    """A field's value as text: a string as it is, a number as its text (a whole float as a whole number: a column
    mixing 8 and 2.5 reaches us as 8.0), None or NaN (a missing cell) as ''; None for what is not text (a list, a
    mapping, true/false, an infinite number), which would otherwise be trained as Python's repr."""
    if value is None or isinstance(value, str):
        return value or ""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value)
    if isinstance(value, (float, Decimal)):
        if value != value:
            return ""
        if not math.isfinite(value):
            return None
        return str(int(value)) if value == int(value) and abs(value) < 2**53 else str(value)
    return None


def _field(row: dict, key: str, kind: str) -> str:
    """The stripped text of `row[key]`, one of the triple's `kind` (question, reasoning, answer): `RowRejected` as
    `non_text_<kind>` when it is not text, `empty_<kind>` when it is missing or empty."""
    value = row.get(key)
    text = scalar_text(value)
    if text is None:
        shown = type(value).__name__ if not isinstance(value, (bool, float)) else str(value).lower()
        raise RowRejected(f"non_text_{kind}", f"`{key}` is {shown}, not text")
    return _require(text.strip(), f"empty_{kind}", f"`{key}`")


def _require(value: str, reason: str, what: str) -> str:
    if not value:
        raise RowRejected(reason, f"{what} is empty")
    return value


def _fixed(*columns: str) -> Callable[[FieldNames], list[str]]:
    def required(fields: FieldNames) -> list[str]:
        return list(columns)

    return required


def _generic_columns(fields: FieldNames) -> list[str]:
    return [fields.question, fields.reasoning, fields.answer]


def _generic(row: dict, fields: FieldNames) -> Triple:
    question = _field(row, fields.question, "question")
    answer = _field(row, fields.answer, "answer")
    reasoning = _field(row, fields.reasoning, "reasoning")
    return Triple(question, reasoning, answer)


_CALCULATOR = re.compile(r"<<[^>]*>>")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")


def _gsm8k(row: dict, fields: FieldNames) -> Triple:
    question = _field(row, "question", "question")
    solution = _field(row, "answer", "answer")
    if "####" not in solution:
        raise RowRejected("no_final_answer", "`answer` has no `#### <number>` line")
    body, _, final = solution.rpartition("####")
    answer = _require(_THOUSANDS.sub("", final.strip()), "empty_answer", "the text after `####`")
    reasoning = _require(_CALCULATOR.sub("", body).strip(), "empty_reasoning", "the solution before `####`")
    return Triple(question, reasoning, answer)


_UNUSABLE_ANSWERS = frozenset({"proof", "notfound", "none"})


def _openr1_math(row: dict, fields: FieldNames) -> Triple:
    question = _field(row, "problem", "question")
    answer = _field(row, "answer", "answer")
    if answer.lower() in _UNUSABLE_ANSWERS:
        raise RowRejected("unusable_answer", f"`answer` is {answer!r}")
    reasoning = _field(row, "solution", "reasoning")
    return Triple(question, reasoning, answer)


def _openbookqa(row: dict, fields: FieldNames) -> Triple:
    stem = _field(row, "question_stem", "question")
    key = _field(row, "answerKey", "answer")
    choices = row.get("choices")
    if not isinstance(choices, dict):
        raise RowRejected("bad_choices", "`choices` is not a {text, label} mapping")
    texts, labels = choices.get("text"), choices.get("label")
    if not isinstance(texts, (list, tuple)) or not isinstance(labels, (list, tuple)) or not labels:
        raise RowRejected("bad_choices", "`choices.text`/`choices.label` are not non-empty lists")
    if len(texts) != len(labels):
        raise RowRejected("bad_choices", f"{len(labels)} labels but {len(texts)} texts")
    labels, texts = [scalar_text(label) for label in labels], [scalar_text(text) for text in texts]
    if None in labels or None in texts:
        raise RowRejected("bad_choices", "a choice's `text` or `label` is not text")
    labels, texts = [label.strip() for label in labels], [text.strip() for text in texts]
    if key not in labels:
        raise RowRejected("bad_answer_key", f"answerKey {key!r} not in labels {labels}")
    reasoning = _field(row, "fact1", "reasoning")
    lines = [stem] + [f"{label}. {text}" for label, text in zip(labels, texts)]
    return Triple("\n".join(lines), reasoning, key)


def _cot_collection(row: dict, fields: FieldNames) -> Triple:
    question = _field(row, "source", "question")
    answer = _field(row, "target", "answer")
    reasoning = _field(row, "rationale", "reasoning")
    return Triple(question, reasoning, answer)


_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")


def last_boxed(text: str) -> str:
    """Return the content of the last `\\boxed{...}` or `\\fbox{...}` in `text`, honouring nested braces (escaped
    braces are content); `RowRejected` with `no_boxed_answer` or `unbalanced_boxed` otherwise."""
    matches = list(_BOXED.finditer(text))
    if not matches:
        raise RowRejected("no_boxed_answer", "no `\\boxed{...}` in the solution")
    start = matches[-1].end()
    depth, i = 1, start
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 2
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[start:i].strip()
        i += 1
    raise RowRejected("unbalanced_boxed", "the last `\\boxed{` is never closed")


def _math(row: dict, fields: FieldNames) -> Triple:
    question = _field(row, "problem", "question")
    reasoning = _field(row, "solution", "reasoning")
    answer = _require(last_boxed(reasoning), "empty_answer", "the last `\\boxed{}`")
    return Triple(question, reasoning, answer)


ADAPTERS: dict[str, Adapter] = {
    adapter.name: adapter
    for adapter in (
        Adapter(
            name="generic",
            convert=_generic,
            required_columns=_generic_columns,
            answer_type="numeric",
            description="any dataset with question/reasoning/answer columns (rename with `*_field`; "
            "set `answer_type` for non-numeric answers)",
        ),
        Adapter(
            name="gsm8k",
            convert=_gsm8k,
            required_columns=_fixed("question", "answer"),
            answer_type="numeric",
            hub_id="openai/gsm8k",
            hub_config="main",
            description="grade-school math word problems; worked solution ending in `#### <number>`",
        ),
        Adapter(
            name="openr1_math",
            convert=_openr1_math,
            required_columns=_fixed("problem", "solution", "answer"),
            answer_type="math",
            hub_id="open-r1/OpenR1-Math-220k",
            hub_config="default",
            test_split=None,
            description="competition math problems with a reference solution and a final answer (train only)",
        ),
        Adapter(
            name="openbookqa",
            convert=_openbookqa,
            required_columns=_fixed("question_stem", "choices", "answerKey", "fact1"),
            answer_type="multiple_choice",
            hub_id="allenai/openbookqa",
            hub_config="additional",
            description="4-way multiple-choice science questions; the supporting fact is the reasoning",
        ),
        Adapter(
            name="cot_collection",
            convert=_cot_collection,
            required_columns=_fixed("source", "rationale", "target"),
            answer_type="text",
            hub_id="kaist-ai/CoT-Collection",
            test_split=None,
            description="instruction/rationale/target triples from many tasks (train only)",
        ),
        Adapter(
            name="math",
            convert=_math,
            required_columns=_fixed("problem", "solution"),
            answer_type="math",
            hub_id="EleutherAI/hendrycks_math",
            hub_config="algebra",
            description="MATH competition problems; the answer is the last `\\boxed{...}` of the solution",
        ),
    )
}


def get_adapter(name: str) -> Adapter:
    """Return the adapter registered as `name`; raise `SFTKeyError` (with a suggestion) for an unknown name."""
    try:
        return ADAPTERS[name]
    except KeyError:
        raise SFTKeyError(
            f"unknown dataset_format `{name}`{closest(name, ADAPTERS)}; valid: {', '.join(ADAPTERS)}"
        ) from None


def answer_type_of(script_args) -> str:
    """The kind of answer the recipe's data has: its `answer_type`, else its adapter's."""
    return script_args.answer_type or get_adapter(script_args.dataset_format).answer_type


def check_columns(adapter: Adapter, columns: list[str], fields: FieldNames) -> None:
    """Raise a one-line `SFTKeyError` when the dataset lacks a column that `adapter` needs, naming the missing
    columns (with a close match), the columns found and the fix (`*_field` keys for `generic`, else a format)."""
    found = list(columns)
    missing = [column for column in adapter.required_columns(fields) if column not in found]
    if not missing:
        return
    missing_text = ", ".join(f"`{column}`{closest(column, found)}" for column in missing)
    found_text = ", ".join(f"`{column}`" for column in found) or "none"
    if adapter.name == "generic":
        fix = (
            "set `question_field`/`reasoning_field`/`answer_field` in the recipe to the dataset's column names, "
            f"or pick another `dataset_format` ({', '.join(ADAPTERS)})"
        )
    else:
        fix = f"pick another `dataset_format` ({', '.join(ADAPTERS)}) or use `generic` with `*_field` column names"
    raise SFTKeyError(
        f"dataset_format `{adapter.name}` needs column(s) {missing_text} that the dataset lacks "
        f"(found: {found_text}); {fix}"
    )
