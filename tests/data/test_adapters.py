"""Tests for sftkey_trl.adapters: hand-written rows in each dataset's real layout (no downloads)."""

from __future__ import annotations

import pytest

from sftkey_trl.data.adapters import (
    ADAPTERS,
    Adapter,
    FieldNames,
    RowRejected,
    Triple,
    check_columns,
    get_adapter,
    last_boxed,
)
from sftkey_trl.errors import SFTKeyError

DEFAULT = FieldNames()


def convert(name: str, row: dict, fields: FieldNames = DEFAULT) -> Triple:
    return get_adapter(name).convert(row, fields)


def rejected(name: str, row: dict, fields: FieldNames = DEFAULT) -> str:
    with pytest.raises(RowRejected) as info:
        convert(name, row, fields)
    return info.value.reason


# ------------------------------------------------------------------------------------------------ registry


def test_registry_names_and_metadata() -> None:
    assert list(ADAPTERS) == ["generic", "gsm8k", "openr1_math", "openbookqa", "cot_collection", "math"]
    for name, adapter in ADAPTERS.items():
        assert isinstance(adapter, Adapter)
        assert adapter.name == name
        assert adapter.answer_type in {"numeric", "math", "multiple_choice", "text"}
        assert adapter.description and "\n" not in adapter.description
        assert adapter.train_split == "train"
    assert get_adapter("gsm8k").hub_id == "openai/gsm8k"
    assert get_adapter("gsm8k").hub_config == "main"
    assert get_adapter("openr1_math").test_split is None
    assert get_adapter("openbookqa").hub_config == "additional"
    assert get_adapter("openbookqa").answer_type == "multiple_choice"
    assert get_adapter("cot_collection").answer_type == "text"
    assert get_adapter("math").answer_type == "math"
    assert get_adapter("generic").hub_id is None


def test_get_adapter_unknown_suggests_closest() -> None:
    with pytest.raises(SFTKeyError) as info:
        get_adapter("gsm8")
    message = str(info.value)
    assert "unknown dataset_format `gsm8`" in message
    assert "did you mean `gsm8k`?" in message
    assert "valid: generic, gsm8k, openr1_math, openbookqa, cot_collection, math" in message
    assert "\n" not in message


def test_get_adapter_unknown_without_close_match() -> None:
    with pytest.raises(SFTKeyError) as info:
        get_adapter("zzzzzz")
    assert "did you mean" not in str(info.value)
    assert "valid: generic" in str(info.value)


def test_row_rejected_carries_reason_and_detail() -> None:
    error = RowRejected("empty_answer", "`answer` is empty")
    assert isinstance(error, ValueError)
    assert error.reason == "empty_answer"
    assert error.detail == "`answer` is empty"
    assert str(error) == "empty_answer: `answer` is empty"
    assert str(RowRejected("bad_choices")) == "bad_choices"


# ------------------------------------------------------------------------------------------------ check_columns


def test_check_columns_ok() -> None:
    check_columns(get_adapter("gsm8k"), ["question", "answer"], DEFAULT)
    check_columns(get_adapter("generic"), ["q", "r", "a", "extra"], FieldNames("q", "r", "a"))


def test_check_columns_lists_missing_and_found_generic() -> None:
    with pytest.raises(SFTKeyError) as info:
        check_columns(get_adapter("generic"), ["prompt", "rationale", "answer"], DEFAULT)
    message = str(info.value)
    assert "`question`" in message and "`reasoning`" in message
    assert "found: `prompt`, `rationale`, `answer`" in message
    assert "`question_field`/`reasoning_field`/`answer_field`" in message
    assert "\n" not in message


def test_check_columns_named_format_suggests_other_format_and_close_column() -> None:
    with pytest.raises(SFTKeyError) as info:
        check_columns(get_adapter("openbookqa"), ["id", "question_stem", "choice", "answerKey"], DEFAULT)
    message = str(info.value)
    assert "dataset_format `openbookqa`" in message
    assert "`choices` (did you mean `choice`?)" in message
    assert "`fact1`" in message
    assert "found: `id`, `question_stem`, `choice`, `answerKey`" in message
    assert "pick another `dataset_format`" in message


def test_check_columns_no_columns() -> None:
    with pytest.raises(SFTKeyError, match="found: none"):
        check_columns(get_adapter("math"), [], DEFAULT)


# ------------------------------------------------------------------------------------------------ generic


def test_generic_good_rows() -> None:
    row = {"question": "  What is 2+3? ", "reasoning": "2 plus 3 is 5.\n", "answer": " 5 "}
    assert convert("generic", row) == Triple("What is 2+3?", "2 plus 3 is 5.", "5")
    row = {"question": "How many legs do 3 cats have?", "reasoning": "Each cat has 4 legs; 3*4=12.", "answer": 12}
    assert convert("generic", row).answer == "12"


def test_generic_overridden_field_names() -> None:
    fields = FieldNames(question="prompt", reasoning="cot", answer="final")
    row = {"prompt": "What is 10/4?", "cot": "10 divided by 4 is 2.5.", "final": 2.5, "question": "ignored"}
    assert convert("generic", row, fields) == Triple("What is 10/4?", "10 divided by 4 is 2.5.", "2.5")
    assert get_adapter("generic").required_columns(fields) == ["prompt", "cot", "final"]


def test_generic_rejections() -> None:
    good = {"question": "q?", "reasoning": "because", "answer": "1"}
    assert rejected("generic", {**good, "question": "   "}) == "empty_question"
    assert rejected("generic", {**good, "answer": None}) == "empty_answer"
    assert rejected("generic", {**good, "reasoning": ""}) == "empty_reasoning"
    assert rejected("generic", {"question": "q?", "answer": "1"}) == "empty_reasoning"


@pytest.mark.parametrize(
    "value, text",
    [(8, "8"), (8.0, "8"), (2.5, "2.5"), (-3, "-3"), (1e-07, "1e-07"), (10**20, "100000000000000000000")],
)
def test_a_number_is_its_text(value, text) -> None:
    """A JSON number is a common, legitimate answer; a whole float (pyarrow reads a column mixing 8 and 2.5 as
    floats) is written as the whole number."""
    row = {"question": "q?", "reasoning": "because", "answer": value}
    assert convert("generic", row).answer == text


@pytest.mark.parametrize("field", ["question", "reasoning", "answer"])
@pytest.mark.parametrize("value", [[8], {"value": 8}, True, False, float("inf")])
def test_a_field_that_is_not_text_rejects_its_row(field, value) -> None:
    """It was trained as Python's repr: `<Answer>[8]</Answer>`."""
    row = {"question": "q?", "reasoning": "because", "answer": "1", field: value}
    assert rejected("generic", row) == f"non_text_{field}"


def test_non_text_is_rejected_by_every_adapter() -> None:
    assert rejected("gsm8k", {"question": ["q"], "answer": "#### 1"}) == "non_text_question"
    assert rejected("cot_collection", {"source": "q", "rationale": "r", "target": {"a": 1}}) == "non_text_answer"
    assert rejected("openr1_math", {"problem": "p", "solution": "s", "answer": [1]}) == "non_text_answer"
    choices = {"text": [["a"], "b"], "label": ["A", "B"]}
    row = {"question_stem": "q", "choices": choices, "answerKey": "A", "fact1": "f"}
    assert rejected("openbookqa", row) == "bad_choices"


def test_nan_is_a_missing_value() -> None:
    assert rejected("generic", {"question": "q?", "reasoning": "because", "answer": float("nan")}) == "empty_answer"


def test_tags_in_reasoning_are_not_rejected_here() -> None:
    row = {"question": "q?", "reasoning": "<Thinking>x</Thinking> <Answer>1</Answer>", "answer": "1"}
    assert convert("generic", row).reasoning == "<Thinking>x</Thinking> <Answer>1</Answer>"


# ------------------------------------------------------------------------------------------------ gsm8k

NATALIA = {
    "question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?",
    "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
    "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72",
}


def test_gsm8k_natalia() -> None:
    triple = convert("gsm8k", NATALIA)
    assert triple.question == NATALIA["question"]
    assert triple.reasoning == (
        "Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips altogether in April and May."
    )
    assert "<<" not in triple.reasoning and ">>" not in triple.reasoning
    assert triple.answer == "72"


def test_gsm8k_thousands_separators() -> None:
    row = {
        "question": "A company earns $1,250 a day for 800 days. How much does it earn?",
        "answer": "It earns 1,250 * 800 = $<<1250*800=1000000>>1,000,000.\n#### 1,000,000",
    }
    triple = convert("gsm8k", row)
    assert triple.answer == "1000000"
    assert triple.reasoning == "It earns 1,250 * 800 = $1,000,000."
    row = {"question": "What is 5 - 7.5?", "answer": "5 - 7.5 = <<5-7.5=-2.5>>-2.5\n####  -2.5 "}
    assert convert("gsm8k", row).answer == "-2.5"


def test_gsm8k_rejections() -> None:
    assert rejected("gsm8k", {**NATALIA, "question": ""}) == "empty_question"
    assert rejected("gsm8k", {**NATALIA, "answer": " "}) == "empty_answer"
    assert rejected("gsm8k", {**NATALIA, "answer": "Natalia sold 72 clips.\n72"}) == "no_final_answer"
    assert rejected("gsm8k", {**NATALIA, "answer": "Natalia sold 72 clips.\n#### "}) == "empty_answer"
    assert rejected("gsm8k", {**NATALIA, "answer": "<<48+24=72>>\n#### 72"}) == "empty_reasoning"


# ------------------------------------------------------------------------------------------------ openr1_math


def openr1_row(**overrides: object) -> dict:
    row = {
        "problem": "Find all real x such that x^2 - 5x + 6 = 0.",
        "solution": "Factor: (x-2)(x-3) = 0, so x = 2 or x = 3.",
        "answer": "2,3",
        "problem_type": "Algebra",
        "question_type": "math-word-problem",
        "source": "olympiads",
        "uuid": "3f2b9c1e-0000-5000-8000-000000000000",
        "is_reasoning_complete": [True, True],
        "generations": ["<think>...</think> 2, 3", "<think>...</think> 2 and 3"],
        "correctness_math_verify": [True, True],
        "correctness_llama": None,
        "finish_reasons": None,
        "correctness_count": 2,
        "messages": [],
    }
    row.update(overrides)
    return row


def test_openr1_math_good_rows() -> None:
    assert convert("openr1_math", openr1_row()) == Triple(
        "Find all real x such that x^2 - 5x + 6 = 0.", "Factor: (x-2)(x-3) = 0, so x = 2 or x = 3.", "2,3"
    )
    row = openr1_row(problem="Compute 1/2 + 1/3.", solution="Common denominator 6: 3/6 + 2/6.", answer=" \\frac{5}{6}")
    assert convert("openr1_math", row).answer == "\\frac{5}{6}"


@pytest.mark.parametrize("answer", ["proof", "Proof", "notfound", "NotFound", "None", "none", " NONE "])
def test_openr1_math_unusable_answers(answer: str) -> None:
    assert rejected("openr1_math", openr1_row(answer=answer)) == "unusable_answer"


def test_openr1_math_rejections() -> None:
    assert rejected("openr1_math", openr1_row(problem=None)) == "empty_question"
    assert rejected("openr1_math", openr1_row(answer="")) == "empty_answer"
    assert rejected("openr1_math", openr1_row(answer=None)) == "empty_answer"
    assert rejected("openr1_math", openr1_row(solution="  \n")) == "empty_reasoning"


# ------------------------------------------------------------------------------------------------ openbookqa


def obqa_row(**overrides: object) -> dict:
    row = {
        "id": "7-980",
        "question_stem": "The sun is responsible for",
        "choices": {
            "text": [
                "puppies learning new tricks",
                "children growing up and getting old",
                "flowers wilting in a vase",
                "plants sprouting, blooming and wilting",
            ],
            "label": ["A", "B", "C", "D"],
        },
        "answerKey": "D",
        "fact1": "the sun is the source of energy for physical cycles on Earth",
        "humanScore": 1.0,
        "clarity": 2.0,
        "turkIdAnswer": "336YQZE83VDAQVZ26HW59X51JZ9M5M",
    }
    row.update(overrides)
    return row


def test_openbookqa_good_rows() -> None:
    triple = convert("openbookqa", obqa_row())
    assert triple.question == (
        "The sun is responsible for\n"
        "A. puppies learning new tricks\n"
        "B. children growing up and getting old\n"
        "C. flowers wilting in a vase\n"
        "D. plants sprouting, blooming and wilting"
    )
    assert triple.reasoning == "the sun is the source of energy for physical cycles on Earth"
    assert triple.answer == "D"
    row = obqa_row(
        question_stem="When food is reduced in the stomach",
        choices={
            "text": [
                "the mind needs time to digest",
                "take a second to digest what I said",
                "nutrients are being deconstructed",
                "reader's digest is a body of works",
            ],
            "label": ["A", "B", "C", "D"],
        },
        answerKey=" C ",
        fact1="digestion is when stomach acid breaks down food",
    )
    triple = convert("openbookqa", row)
    assert triple.answer == "C"
    assert triple.question.splitlines()[3] == "C. nutrients are being deconstructed"


def test_openbookqa_rejections() -> None:
    assert rejected("openbookqa", obqa_row(question_stem="")) == "empty_question"
    assert rejected("openbookqa", obqa_row(answerKey=None)) == "empty_answer"
    assert rejected("openbookqa", obqa_row(answerKey="E")) == "bad_answer_key"
    choices = {"text": ["a", "b", "c"], "label": ["A", "B", "C", "D"]}
    assert rejected("openbookqa", obqa_row(choices=choices)) == "bad_choices"
    assert rejected("openbookqa", obqa_row(choices=None)) == "bad_choices"
    assert rejected("openbookqa", obqa_row(choices={"text": [], "label": []})) == "bad_choices"
    assert rejected("openbookqa", obqa_row(fact1=" ")) == "empty_reasoning"


# ------------------------------------------------------------------------------------------------ cot_collection


def cot_row(**overrides: object) -> dict:
    row = {
        "source": "Premise: A man is playing a guitar on stage.\nHypothesis: A man is performing music.\n"
        "Does the premise entail the hypothesis? Options: yes, no, it is not possible to tell",
        "target": "yes",
        "rationale": "Playing a guitar on stage is a way of performing music.",
        "task": "anli_r1",
        "type": "CoT",
    }
    row.update(overrides)
    return row


def test_cot_collection_good_rows() -> None:
    triple = convert("cot_collection", cot_row())
    assert triple.question.startswith("Premise: A man is playing a guitar on stage.")
    assert triple.reasoning == "Playing a guitar on stage is a way of performing music."
    assert triple.answer == "yes"
    row = cot_row(
        source="Q: What is the capital of France?", target=" Paris\n", rationale="France's capital is Paris."
    )
    assert convert("cot_collection", row) == Triple(
        "Q: What is the capital of France?", "France's capital is Paris.", "Paris"
    )


def test_cot_collection_rejections() -> None:
    assert rejected("cot_collection", cot_row(source="")) == "empty_question"
    assert rejected("cot_collection", cot_row(target=None)) == "empty_answer"
    assert rejected("cot_collection", cot_row(rationale="")) == "empty_reasoning"


# ------------------------------------------------------------------------------------------------ math


def math_row(solution: str) -> dict:
    return {
        "problem": "If $x + 2 = 5$, what is $x$?",
        "level": "Level 1",
        "type": "Algebra",
        "solution": solution,
    }


def test_math_good_rows() -> None:
    solution = "Subtract 2 from both sides: $x = 5 - 2 = \\boxed{3}$."
    assert convert("math", math_row(solution)) == Triple("If $x + 2 = 5$, what is $x$?", solution, "3")
    solution = "We have $\\frac{1}{4} \\cdot 2 = \\boxed{\\frac{1}{2}}$."
    assert convert("math", math_row(solution)).answer == "\\frac{1}{2}"
    solution = "The area is $\\fbox{12}$ square units."
    assert convert("math", math_row(solution)).answer == "12"


def test_math_keeps_reasoning_verbatim_with_surrounding_whitespace_stripped() -> None:
    solution = "Line one.\n\nThen $\\boxed{7}$."
    assert convert("math", math_row(f"  {solution}\n")).reasoning == solution


def test_math_takes_last_boxed() -> None:
    solution = "First guess $\\boxed{4}$ is wrong; correcting, $x = \\boxed{\\sqrt{\\frac{9}{4}}}$."
    assert convert("math", math_row(solution)).answer == "\\sqrt{\\frac{9}{4}}"


def test_last_boxed_escaped_braces() -> None:
    assert last_boxed("so the set is $\\boxed{\\{1, 2\\}}$") == "\\{1, 2\\}"
    assert last_boxed("$\\boxed{\\left\\{ x \\right.}$") == "\\left\\{ x \\right."


def test_math_rejections() -> None:
    assert rejected("math", {**math_row("$\\boxed{3}$"), "problem": " "}) == "empty_question"
    assert rejected("math", math_row("")) == "empty_reasoning"
    assert rejected("math", math_row("The answer is 3.")) == "no_boxed_answer"
    assert rejected("math", math_row("So $x = \\boxed{\\frac{1}{2}$.")) == "unbalanced_boxed"
    assert rejected("math", math_row("So $x = \\boxed{ }$.")) == "empty_answer"
