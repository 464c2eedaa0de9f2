"""Tests for sftkey_trl.evaluation.answers: extraction, matching, reasoning's final value, composite score."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from sftkey_trl.data.formatting import Tags
from sftkey_trl.evaluation.answers import (
    ANSWER_TYPES,
    Extraction,
    answers_match,
    composite_score,
    extract_answer,
    gold_is_parseable,
)
from sftkey_trl.evaluation.reasoning import reasoning_final_value

STRICT = "<Thinking>3 + 4 = 7</Thinking>\n<Answer>7</Answer>"


# ----------------------------------------------------------------------------------------------------- tags extraction
@pytest.mark.parametrize(
    "generation, expected",
    [
        (STRICT, Extraction("7", "strict_tags", True, "3 + 4 = 7")),
        ("\n  " + STRICT + "\n\n", Extraction("7", "strict_tags", True, "3 + 4 = 7")),
        ("<Thinking>a\nb</Thinking>\n<Answer> 42 </Answer>", Extraction("42", "strict_tags", True, "a\nb")),
        # extra text after </Answer>: lenient, not strict
        (STRICT + " Hope this helps!", Extraction("7", "lenient_tags", False, "3 + 4 = 7")),
        # wrong newline count between the blocks
        ("<Thinking>r</Thinking>\n\n<Answer>7</Answer>", Extraction("7", "lenient_tags", False, "r")),
        ("<Thinking>r</Thinking><Answer>7</Answer>", Extraction("7", "lenient_tags", False, "r")),
        # junk before the thinking block
        ("Sure! " + STRICT, Extraction("7", "lenient_tags", False, "3 + 4 = 7")),
        # two answers: the last wins and it is not strict even though the regex could span both
        (
            "<Thinking>r</Thinking>\n<Answer>1</Answer>\n<Answer>2</Answer>",
            Extraction("2", "lenient_tags", False, "r"),
        ),
        # unclosed answer tag runs to the end
        ("<Thinking>r</Thinking>\n<Answer>12 apples", Extraction("12 apples", "lenient_tags", False, "r")),
        # unclosed thinking tag: reasoning runs up to the answer tag
        ("<Thinking>r 5\n<Answer>9</Answer>", Extraction("9", "lenient_tags", False, "r 5")),
        # empty trailing unclosed tag: the last answer with content is used
        ("<Answer>5</Answer> <Answer>", Extraction("5", "lenient_tags", False, None)),
        # empty answer in a strict frame: format ok, no answer, no number fallback
        ("<Thinking>so 9</Thinking>\n<Answer> </Answer>", Extraction(None, "strict_tags", True, "so 9")),
        # no answer tag: last-number fallback, never format_ok
        ("<Thinking>2 + 2 = 4</Thinking>\nSo 4.", Extraction("4", "last_number", False, "2 + 2 = 4")),
        ("<Thinking>counting 1, 2, 3", Extraction("3", "last_number", False, "counting 1, 2, 3")),
        ("I do not know.", Extraction(None, "none", False, None)),
        ("", Extraction(None, "none", False, None)),
    ],
)
def test_extract_tags(generation: str, expected: Extraction) -> None:
    assert extract_answer(generation) == expected


def test_extract_custom_tags() -> None:
    tags = Tags("<think>", "</think>", "<answer>", "</answer>")
    result = extract_answer("<think>r</think>\n<answer>B</answer>", tags=tags)
    assert result == Extraction("B", "strict_tags", True, "r")
    # the default tags are not found in a custom-tag generation
    assert extract_answer("<think>r</think>\n<answer>B</answer>").method == "none"


def test_answer_string_in_reasoning_does_not_confuse_extraction() -> None:
    generation = "<Thinking>First guess <Answer>3</Answer> is wrong; 5 is right</Thinking>\n<Answer>5</Answer>"
    result = extract_answer(generation)
    assert result.answer == "5"
    assert result.method == "lenient_tags"  # a tag inside the reasoning breaks the strict format
    plain = "The answer is 3 was my first guess, but no.\nRecheck: 2 + 3 = 5\nThe answer is 5."
    result = extract_answer(plain, "plain")
    assert (result.answer, result.format_ok) == ("5", True)
    assert result.reasoning == "The answer is 3 was my first guess, but no.\nRecheck: 2 + 3 = 5"


# ---------------------------------------------------------------------------------------------------- plain extraction
@pytest.mark.parametrize(
    "generation, expected",
    [
        ("2 + 3 = 5\nThe answer is 5.", Extraction("5", "answer_line", True, "2 + 3 = 5")),
        ("2 + 3 = 5\nthe answer is 5\n\n", Extraction("5", "answer_line", True, "2 + 3 = 5")),
        ("r\nThe answer is 3.14.", Extraction("3.14", "answer_line", True, "r")),
        ("r\nThe answer is $\\frac{1}{2}$.", Extraction("$\\frac{1}{2}$", "answer_line", True, "r")),
        ("The answer is 5.", Extraction("5", "answer_line", True, None)),
        ("The answer is 3. The answer is 5.", Extraction("5", "answer_line", True, None)),
        # answer line in the middle: found, not format_ok
        ("r\nThe answer is 5.\nWait, let me check 6.", Extraction("5", "answer_line", False, "r")),
        # no answer line: last number, never format_ok
        ("We get 12 then 13.", Extraction("13", "last_number", False, None)),
        ("no numbers here", Extraction(None, "none", False, None)),
    ],
)
def test_extract_plain(generation: str, expected: Extraction) -> None:
    assert extract_answer(generation, "plain") == expected


def test_extract_plain_custom_template() -> None:
    template = "Final answer: {answer}"
    result = extract_answer("work\nFinal answer: 42", "plain", answer_template=template)
    assert result == Extraction("42", "answer_line", True, "work")
    assert extract_answer("work\nThe answer is 42.", "plain", answer_template=template).method == "last_number"


@pytest.mark.parametrize("kwargs", [{"response_format": "json"}, {"response_format": "plain", "answer_template": "x"}])
def test_extract_rejects_bad_arguments(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        extract_answer("The answer is 5.", **kwargs)


@pytest.mark.parametrize(
    "generation, expected",
    [
        ("it costs 1,234 dollars", "1234"),
        ("the change is \u22127", "-7"),
        ("x = 5 - 3", "3"),
        ("half is 1/2", "1/2"),
        ("ratio \\frac{3}{4}", "3/4"),
        ("so 3.5.", "3.5"),
        ("value -0.25 here", "-0.25"),
    ],
)
@pytest.mark.parametrize("response_format", ["tags", "plain"])
def test_last_number_fallback(generation: str, expected: str, response_format: str) -> None:
    result = extract_answer(generation, response_format)
    assert (result.answer, result.method, result.format_ok) == (expected, "last_number", False)


# ------------------------------------------------------------------------------------------------ numeric / math match
@pytest.mark.parametrize(
    "predicted, gold, answer_type",
    [
        ("1,234", "1234", "numeric"),
        ("1234.0", "1,234", "numeric"),
        ("\u22127", "-7", "numeric"),
        ("-7", "\u22127", "math"),
        ("3/4", "0.75", "numeric"),
        ("0.75", "3/4", "math"),
        ("\\frac{3}{4}", "0.75", "math"),
        ("\\dfrac{3}{4}", "0.75", "numeric"),
        ("\\boxed{42}", "42", "math"),
        ("$\\boxed{\\frac{1}{2}}$", "0.5", "math"),
        ("50%", "50", "numeric"),
        ("50\\%", "50", "math"),
        ("50%", "0.5", "numeric"),
        ("$5", "5", "numeric"),
        ("5 dollars", "5", "math"),
        ("12 apples.", "12", "numeric"),
        ("**12**", "12", "numeric"),
        ("The answer is 5", "5", "math"),
        ("1+x", "x+1", "math"),
        ("\\sqrt{8}", "2\\sqrt{2}", "math"),
        ("\\pi/2", "\\frac{\\pi}{2}", "math"),
        ("x = 5", "5", "math"),
    ],
)
def test_numeric_math_match(predicted: str, gold: str, answer_type: str) -> None:
    assert answers_match(predicted, gold, answer_type)


@pytest.mark.parametrize(
    "predicted, gold, answer_type",
    [
        ("6", "5", "numeric"),
        ("1000001", "1000000", "numeric"),
        ("1000000.5", "1000000", "numeric"),  # an integer gold needs an exactly equal number (was a match)
        ("0.5", "50", "numeric"),
        ("2\\sqrt{2}", "2", "math"),
        ("5 pi", "5", "math"),
        ("2 x", "2", "math"),
        ("-7", "7", "numeric"),
        ("x+2", "x+1", "math"),
        ("", "5", "numeric"),
        (None, "5", "math"),
    ],
)
def test_numeric_math_mismatch(predicted: str | None, gold: str, answer_type: str) -> None:
    assert not answers_match(predicted, gold, answer_type)


@pytest.mark.parametrize(
    "gold, answer_type",
    [("", "numeric"), ("N/A", "numeric"), ("n/a", "math"), ("  ", "math"), ("unknown", "numeric")],
)
def test_unparseable_numeric_gold_never_matches(gold: str, answer_type: str) -> None:
    assert not gold_is_parseable(gold, answer_type)
    assert not answers_match(gold, gold, answer_type)


@pytest.mark.parametrize("gold, answer_type", [("1,234", "numeric"), ("\\frac{1}{2}", "numeric"), ("x^2+1", "math")])
def test_parseable_gold(gold: str, answer_type: str) -> None:
    assert gold_is_parseable(gold, answer_type)
    assert answers_match(gold, gold, answer_type)


def test_math_verify_path_works_off_the_main_thread() -> None:
    with ThreadPoolExecutor(max_workers=1) as pool:
        assert pool.submit(answers_match, "1+x", "x+1", "math").result(timeout=60)


def test_pathological_input_is_rejected_quickly() -> None:
    start = time.monotonic()
    assert not answers_match("9^9^9^9", "5", "math")
    assert not answers_match("$10^{10^{10}}$", "5", "math")
    assert time.monotonic() - start < 2.0


# ----------------------------------------------------------------------------------------------------- multiple choice
@pytest.mark.parametrize(
    "predicted",
    ["B", "b", "(B)", "(b)", "B.", "B) photosynthesis", "B. photosynthesis", "The answer is B", "The answer is (B).",
     "Answer: B", "answer is option B", "Option A is wrong, so the answer is B.", "\\boxed{B}", "I pick (B) here"],
)  # fmt: skip
def test_multiple_choice_match(predicted: str) -> None:
    assert answers_match(predicted, "B", "multiple_choice")


@pytest.mark.parametrize("predicted", ["C", "(c)", "A plant makes food", "The answer is a bit unclear", "", "BE"])
def test_multiple_choice_mismatch(predicted: str) -> None:
    assert not answers_match(predicted, "B", "multiple_choice")


@pytest.mark.parametrize(
    "predicted, committed",
    [("Answer: B because option D is false", "B"), ("The answer is C. Option A is wrong.", "C"),
     ("The answer is A. No, wait: the answer is D.", "D"), ("Option E is right; the others are not", "E"),
     ("Option A or option C, hard to say", None), ("Either (A) or maybe (C)", None),
     ("The answer is not A", None)],
)  # fmt: skip
def test_multiple_choice_scores_the_committed_letter(predicted: str, committed: str | None) -> None:
    for letter in "ABCDE":
        assert answers_match(predicted, letter, "multiple_choice") is (letter == committed), letter


@pytest.mark.parametrize(
    "gold, ok", [("A", True), ("e", True), (" C ", True), ("F", False), ("AB", False), ("", False)]
)
def test_multiple_choice_gold(gold: str, ok: bool) -> None:
    assert gold_is_parseable(gold, "multiple_choice") is ok
    assert answers_match(gold, gold, "multiple_choice") is ok


# ---------------------------------------------------------------------------------------------------------------- text
@pytest.mark.parametrize(
    "predicted, gold, expected",
    [
        ("the Eiffel  Tower.", "Eiffel Tower", True),
        ("An apple!", "apple", True),
        ("  PARIS ", "Paris", True),
        ("theory", "ory", False),  # only a whole leading word is an article
        ("Paris", "London", False),
        (None, "Paris", False),
    ],
)
def test_text_match(predicted: str | None, gold: str, expected: bool) -> None:
    assert answers_match(predicted, gold, "text") is expected


def test_text_custom_normalizer_and_empty_gold() -> None:
    assert answers_match("PARIS", "paris", "text", normalizer=str.lower)
    assert not answers_match("the paris", "paris", "text", normalizer=str.lower)
    assert not gold_is_parseable("  . ", "text")
    assert gold_is_parseable("the", "text")  # a lone article is kept
    assert not answers_match("", "", "text")


def test_unknown_answer_type() -> None:
    assert "numeric" in ANSWER_TYPES
    with pytest.raises(ValueError):
        answers_match("1", "1", "date")
    with pytest.raises(ValueError):
        gold_is_parseable("1", "date")


# ----------------------------------------------------------------------------------------------- reasoning / composite
@pytest.mark.parametrize(
    "reasoning, expected",
    [
        ("3 + 4 = 7\nSo she has 7 apples.", "7"),
        ("2 * 3 = 6, then 6 + 1 = 7 apples, and 2 were eaten.", "7"),
        ("x = 3 + 4", "4"),  # right-hand side is an expression: last number instead
        ("total = $1,234.50", "1234.50"),
        ("she owes \u22125 overall", "-5"),
        ("a = \\frac{3}{4}", "3/4"),
        ("x <= 5 and we take 6", "6"),
        ("no numbers at all", None),
        ("", None),
        (None, None),
    ],
)
def test_reasoning_final_value(reasoning: str | None, expected: str | None) -> None:
    assert reasoning_final_value(reasoning) == expected


@pytest.mark.parametrize(
    "accuracy, format_accuracy, expected", [(1.0, 1.0, 1.0), (0.0, 1.0, 0.3), (1.0, 0.0, 0.7), (0.5, 0.8, 0.59)]
)
def test_composite_score(accuracy: float, format_accuracy: float, expected: float) -> None:
    assert composite_score(accuracy, format_accuracy) == pytest.approx(expected)


@pytest.mark.parametrize("accuracy, format_accuracy", [(85.0, 0.5), (0.5, -0.1)])
def test_composite_score_rejects_non_fractions(accuracy: float, format_accuracy: float) -> None:
    with pytest.raises(ValueError):
        composite_score(accuracy, format_accuracy)
