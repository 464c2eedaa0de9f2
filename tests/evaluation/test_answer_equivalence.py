"""Regression set for answer equivalence and the reasoning's final value (issue 16).

Every case states its verdict both ways where it matters: the false positives that used to match, the false
negatives that used to fail, and short gold/prediction pairs covering the usual shapes of math answers.
"""

from __future__ import annotations

import time

import pytest

from sftkey_trl.evaluation.answers import answers_match
from sftkey_trl.evaluation.reasoning import reasoning_final_value

# (predicted, gold, answer_type, expected)
FORMER_FALSE_POSITIVES = [
    ("1000000", "1000000.5", "numeric", False),
    ("1000000", "1000000.5", "math", False),
    ("1000000.5", "1000000", "numeric", False),
    ("1.5", "1.500001", "numeric", False),
    ("1.5", "1.500001", "math", False),
    ("111", "0,111", "numeric", False),
    ("111", "0,111", "math", False),
    ("2 3", "5", "numeric", False),
    ("2 3", "5", "math", False),
    ("1 000", "0", "numeric", False),
    ("1 000", "0", "math", False),
    ("3 (or maybe 4)", "4", "numeric", False),
    ("3 (or maybe 4)", "4", "math", False),
    ("3 or 4", "4", "math", False),
    ("either 4 or 5", "5", "math", False),
    ("2+3", "5", "numeric", False),
    ("\\frac{10}{2}", "5", "numeric", True),  # a fraction is a number, not arithmetic
    ("2 \\times 3", "6", "numeric", False),
]
FORMER_FALSE_NEGATIVES = [
    ("1,22", "1.22", "numeric", True),
    ("1.22", "1,22", "math", True),
    ("0,111", "0.111", "numeric", True),
    ("1 000", "1000", "numeric", True),
    ("1000", "1 000", "math", True),
    ("1 000,5", "1000.5", "numeric", True),
    ("5 m/s", "5", "numeric", True),
    ("5 m/s", "5", "math", True),
    ("25 km^2", "25", "numeric", True),
    ("25 km^2", "25", "math", True),
    ("9.8 m/s^2", "9.8", "numeric", True),
    ("30 m²", "30", "numeric", True),
    ("60 km/h", "60", "math", True),
]
# Near misses of the fixes: they must stay as they are.
BOUNDARIES = [
    ("1,222", "1222", "numeric", True),  # three digits after the comma: thousands, not a decimal comma
    ("1.222", "1,222", "numeric", False),
    ("1,22", "122", "numeric", False),
    ("2 x^2", "2", "math", False),  # x is a variable, not a unit
    ("5 x/y", "5", "math", False),
    ("2 y", "2", "math", False),  # a lone one-letter word may be a variable
    ("1/3", "0.333333", "math", True),  # six decimals agree
    ("0.333", "1/3", "math", False),
    ("3", "2.9999999", "numeric", True),
    ("5.0000001", "5", "numeric", False),  # an integer gold needs an exactly equal number
    ("2+3", "5", "math", True),  # math answers may be expressions
    ("(1, 2)", "(1, 2)", "math", True),
]
# Short pairs in the style of public math-answer equivalence suites.
STYLE_SUITE = [
    ("\\frac{1}{2}", "0.5", "math", True),
    ("\\dfrac{3}{4}", "3/4", "math", True),
    ("\\frac{2}{4}", "\\frac{1}{2}", "math", True),
    ("\\frac{1}{3}", "0.33", "math", False),
    ("\\boxed{12}", "12", "math", True),
    ("$\\boxed{-3}$", "-3", "numeric", True),
    ("\\boxed{\\frac{7}{2}}", "3.5", "numeric", True),
    ("-7", "7", "math", False),
    ("\u22124.5", "-4.5", "numeric", True),
    ("-0.5", "-1/2", "math", True),
    ("25%", "25", "numeric", True),
    ("25\\%", "0.25", "math", True),
    ("25", "0.25", "numeric", False),
    ("40 percent", "0.4", "numeric", True),
    ("$1,234.50", "1234.5", "numeric", True),
    ("\\$18", "18", "math", True),
    ("18.00 dollars", "18", "numeric", True),
    ("€12", "12", "numeric", True),
    ("12 cents", "0.12", "numeric", False),
    ("45 minutes", "45", "numeric", True),
    ("3 hours", "180", "numeric", False),
    ("x = 4", "4", "math", True),
    ("x = 4", "5", "math", False),
    ("The answer is 17.", "17", "numeric", True),
    ("\\sqrt{16}", "4", "math", True),
    ("2\\sqrt{3}", "\\sqrt{12}", "math", True),
    ("\\sqrt{3}", "3", "math", False),
    ("3\\pi", "3", "math", False),
    ("10^3", "1000", "math", True),
    ("1e3", "1000", "numeric", False),
    ("0.1 + 0.2", "0.3", "math", True),
    ("7/2", "3.5", "numeric", True),
    ("7/3", "2.33", "numeric", False),
    ("12", "", "numeric", False),
    ("N/A", "N/A", "numeric", False),
]
MULTIPLE_CHOICE = [
    ("The answer is for sure D, it can't be A or B", "D", True),
    ("The answer is for sure D, it can't be A or B", "A", False),
    ("It can't be A or B; the answer is definitely C.", "C", True),
    ("I choose (E)", "E", True),
    ("The answer is not A", "A", False),
    ("d", "D", True),
]


@pytest.mark.parametrize(
    "predicted, gold, answer_type, expected",
    FORMER_FALSE_POSITIVES + FORMER_FALSE_NEGATIVES + BOUNDARIES + STYLE_SUITE,
)
@pytest.mark.slow
def test_answer_equivalence(predicted: str, gold: str, answer_type: str, expected: bool) -> None:
    assert answers_match(predicted, gold, answer_type) is expected


@pytest.mark.parametrize("predicted, gold, expected", MULTIPLE_CHOICE)
def test_multiple_choice_equivalence(predicted: str, gold: str, expected: bool) -> None:
    assert answers_match(predicted, gold, "multiple_choice") is expected


# Last lines of GSM8K reference solutions (row numbers from the hub's train/test splits) and model-style reasoning.
REASONING = [
    ("$600/month * 12 months/year = $7200/year", "7200"),  # train 211: a rate, not a fraction
    ("$1500/month * 12 months/year = $18,000/year", "18000"),  # test 173
    ("Thus, she should run for 6/3=.5 hour which is 30 minutes.", "30"),  # train 198: a restatement
    ("so 3 + 2 = 5\nIf he wants profit, since $125 > $96, he will buy jewelry, making a profit of $125", "125"),
    ("= 15.36 minutes, which rounds down to 15 minutes", "15"),
    ("$210 / $350 = 0.60 or 60% off on the dress.", "60"),
    ("1340/80 = 16.75 bags of food, meaning the family will need to buy 17 bags.", "17"),
    ("60 / 2 = 30 zombies, which is less than 50, so there were less than 50 zombies 4 days ago.", "4"),
    ("a = 1\nb = 2\nThus, Brad's zip code is 11026.", "11026"),  # the last '=' is on an earlier line
    ("He spends $50 if he buys the cheapest flour because 50 < 52", "50"),
    ("He can skip 4 class because 10 - 4 = 6", "4"),
    ("If 1 can has 3 balls, then 75 cans would have 225 balls", "225"),
    ("37 * 11 gives you 407. Ms. Alice can grade 407 papers in 11 hours.", "407"),
    ("He must average 90 miles per hour to drive the remaining 90 miles in 1 hour", "90"),
    ("Spiders have twice that number, so we multiply 4*2 to find 8 legs in total.", "8"),
    ("Thus, 6:07 AM is 7 minutes after 6:00 AM.", "7"),
    ("So the selling price is $80 000+ $16 000 + $4 000 = $100 000.", "100000"),
    ("16 feet * 2 = 32 feet. This is taller than the window, so it took three days to pass it.", "3"),
    ("180 * 120 = 21600 square inches. Since each tile is 1 square inch, this is the number of tiles.", "21600"),
    ("The 3 people lost a total of 89 pounds.", "89"),
    ("As 80/2=40, and 40+80=120, we get the piles, confirming that 80 is the answer.", "80"),
    ("Subtracting 2b from both sides, we get 10 = b", "10"),
    ("it takes 4 hours, so the latest is 6-4 = 2:00 am", "2"),
    ("First, 12 * 3 = 36. Then 36 + 4 = 40. So the answer is 40.", "40"),
    ("She has 5 apples and buys 3 more, so she has 8 apples.", "8"),
    ("We need 3/4 of 20, which is 15.", "15"),
    # reasoning that really ends elsewhere keeps its own value
    ("Including his bonus, James scored a total of 48 + 16 = 64 points.", "64"),
    ("each load costs 40/160 = $0.25", "0.25"),
    ("12 - 5 = 7 left, and 2 more arrive", "7"),
]


@pytest.mark.parametrize("reasoning, expected", REASONING)
def test_reasoning_final_value_regressions(reasoning: str, expected: str) -> None:
    assert reasoning_final_value(reasoning) == expected


def test_final_value_and_answer_are_consistent_on_a_rate() -> None:
    final = reasoning_final_value("$2000/day * 7 days/week = $14000/week")
    assert answers_match("14000", final, "numeric")
    assert not answers_match("7", final, "numeric")


def test_long_reasoning_is_read_in_linear_time() -> None:
    start = time.monotonic()
    assert reasoning_final_value("1 " * 2000) == "1"
    assert reasoning_final_value("5 " + "so " * 2000) == "5"
    assert time.monotonic() - start < 2.0  # the look-backs once made this quadratic (minutes at 20k numbers)
