"""Dataset adapters: turn one raw dataset row (a dict) into a (question, reasoning, answer) triple.

Each adapter knows one layout (its columns, hub defaults and answer kind). It strips every field, reads None or a
missing key as empty, and raises `RowRejected` with a snake_case `reason` (counted per reason by the caller) for a
row it cannot use, such as an empty question or answer. Tags inside the reasoning are left to the validation.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
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


def _text(row: dict, key: str) -> str:
    """The stripped string value of `row[key]`; '' for a missing key or None."""
    value: Any = row.get(key)
    return "" if value is None else str(value).strip()


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
    question = _require(_text(row, fields.question), "empty_question", f"`{fields.question}`")
    answer = _require(_text(row, fields.answer), "empty_answer", f"`{fields.answer}`")
    reasoning = _require(_text(row, fields.reasoning), "empty_reasoning", f"`{fields.reasoning}`")
    return Triple(question, reasoning, answer)


_CALCULATOR = re.compile(r"<<[^>]*>>")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")


def _gsm8k(row: dict, fields: FieldNames) -> Triple:
    question = _require(_text(row, "question"), "empty_question", "`question`")
    solution = _require(_text(row, "answer"), "empty_answer", "`answer`")
    if "####" not in solution:
        raise RowRejected("no_final_answer", "`answer` has no `#### <number>` line")
    body, _, final = solution.rpartition("####")
    answer = _require(_THOUSANDS.sub("", final.strip()), "empty_answer", "the text after `####`")
    reasoning = _require(_CALCULATOR.sub("", body).strip(), "empty_reasoning", "the solution before `####`")
    return Triple(question, reasoning, answer)


_UNUSABLE_ANSWERS = frozenset({"proof", "notfound", "none"})


def _openr1_math(row: dict, fields: FieldNames) -> Triple:
    question = _require(_text(row, "problem"), "empty_question", "`problem`")
    answer = _require(_text(row, "answer"), "empty_answer", "`answer`")
    if answer.lower() in _UNUSABLE_ANSWERS:
        raise RowRejected("unusable_answer", f"`answer` is {answer!r}")
    reasoning = _require(_text(row, "solution"), "empty_reasoning", "`solution`")
    return Triple(question, reasoning, answer)


def _openbookqa(row: dict, fields: FieldNames) -> Triple:
    stem = _require(_text(row, "question_stem"), "empty_question", "`question_stem`")
    key = _require(_text(row, "answerKey"), "empty_answer", "`answerKey`")
    choices = row.get("choices")
    if not isinstance(choices, dict):
        raise RowRejected("bad_choices", "`choices` is not a {text, label} mapping")
    texts, labels = choices.get("text"), choices.get("label")
    if not isinstance(texts, (list, tuple)) or not isinstance(labels, (list, tuple)) or not labels:
        raise RowRejected("bad_choices", "`choices.text`/`choices.label` are not non-empty lists")
    if len(texts) != len(labels):
        raise RowRejected("bad_choices", f"{len(labels)} labels but {len(texts)} texts")
    labels = ["" if label is None else str(label).strip() for label in labels]
    texts = ["" if text is None else str(text).strip() for text in texts]
    if key not in labels:
        raise RowRejected("bad_answer_key", f"answerKey {key!r} not in labels {labels}")
    reasoning = _require(_text(row, "fact1"), "empty_reasoning", "`fact1`")
    lines = [stem] + [f"{label}. {text}" for label, text in zip(labels, texts)]
    return Triple("\n".join(lines), reasoning, key)


def _cot_collection(row: dict, fields: FieldNames) -> Triple:
    question = _require(_text(row, "source"), "empty_question", "`source`")
    answer = _require(_text(row, "target"), "empty_answer", "`target`")
    reasoning = _require(_text(row, "rationale"), "empty_reasoning", "`rationale`")
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
    question = _require(_text(row, "problem"), "empty_question", "`problem`")
    reasoning = _require(_text(row, "solution"), "empty_reasoning", "`solution`")
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
