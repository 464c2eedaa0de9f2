"""Intervals over seeds and over test examples, checked on constructed per-example results against scipy's own
functions: `t` for the seeds, `ttest_rel`/`ttest_1samp` for the paired examples, `binomtest` for McNemar."""

from __future__ import annotations

import random

import pytest
from scipy import stats

from sftkey_trl.evaluation.intervals import example_difference, mcnemar_p, mean_ci, paired_interval


def outcomes(rng: random.Random, n: int, rate: float) -> list[float]:
    return [float(rng.random() < rate) for _ in range(n)]


def run(values: dict[str, list[float]], index: list[int] | None = None) -> dict:
    """One arm's results for one seed as results.json keeps them: the aggregate and the per-example values."""
    index = index if index is not None else list(range(len(next(iter(values.values())))))
    judged = {name: [value for value in found if value is not None] for name, found in values.items()}
    aggregate = {name: sum(found) / len(found) for name, found in judged.items()}
    return {**aggregate, "per_example": {"index": index, **values}}


@pytest.mark.parametrize("n", [2, 3, 5, 13])
def test_the_seed_interval_is_scipys_student_t(n):
    values = [0.1 * k + 0.013 * k * k for k in range(n)]
    mean, half = mean_ci(values)
    low, high = stats.t.interval(0.95, n - 1, loc=mean, scale=stats.sem(values))
    assert (mean - half, mean + half) == pytest.approx((low, high), rel=1e-12)


def test_one_seed_gives_no_interval_not_a_zero_width_one():
    assert mean_ci([0.4]) == (0.4, None)


@pytest.mark.parametrize("n, rates", [(8, (0.3, 0.6)), (40, (0.5, 0.55)), (1319, (0.62, 0.66))])
def test_the_interval_over_examples_is_scipys_paired_t_and_the_test_is_mcnemars(n, rates):
    rng = random.Random(n)
    first, second = outcomes(rng, n, rates[0]), outcomes(rng, n, rates[1])
    found = example_difference({0: run({"accuracy": first})}, {0: run({"accuracy": second})}, "accuracy")
    expected = stats.ttest_rel(first, second).confidence_interval(0.95)
    assert found["n"] == n and found["mean"] == pytest.approx(sum(first) / n - sum(second) / n)
    assert (found["low"], found["high"]) == pytest.approx((max(expected.low, -1), min(expected.high, 1)))
    only_first = sum(a > b for a, b in zip(first, second))
    only_second = sum(b > a for a, b in zip(first, second))
    assert found["p"] == pytest.approx(stats.binomtest(only_first, only_first + only_second, 0.5).pvalue)


def test_eight_examples_three_lost_are_not_called_a_difference():
    """The case a user met with one seed: 2 of 8 examples apart was printed as `-0.250 ± 0.000`."""
    first = [0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    second = [1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    assert mcnemar_p(first, second) == pytest.approx(0.25)
    found = paired_interval([a - b for a, b in zip(first, second)], rates=True)
    assert found["low"] < 0 < found["high"]


def test_examples_are_paired_by_index_and_unjudged_ones_left_out():
    first = run({"reasoning_reference_accuracy": [1.0, None, 0.0, 1.0, 1.0]}, index=[4, 3, 2, 1, 0])
    second = run({"reasoning_reference_accuracy": [0.0, 1.0, 0.0, None, 0.0]}, index=[0, 1, 2, 3, 4])
    found = example_difference({0: first}, {0: second}, "reasoning_reference_accuracy")
    # by index: 0: 1 - 0, 1: 1 - 1, 2: 0 - 0, 4: 1 - 0; index 3 is judged by neither
    expected = stats.ttest_1samp([1.0, 0.0, 0.0, 1.0], 0.0).confidence_interval(0.95)
    assert found["n"] == 4 and found["mean"] == pytest.approx(0.5)
    assert (found["low"], found["high"]) == pytest.approx((expected.low, min(expected.high, 1.0)))


def test_several_seeds_pool_each_examples_difference_over_the_seeds():
    rng = random.Random(7)
    first = {seed: run({"composite": [0.7 * x + 0.3 for x in outcomes(rng, 30, 0.6)]}) for seed in range(3)}
    second = {seed: run({"composite": [0.7 * x + 0.3 for x in outcomes(rng, 30, 0.4)]}) for seed in range(3)}
    found = example_difference(first, second, "composite")
    averaged = [
        sum(first[s]["per_example"]["composite"][i] - second[s]["per_example"]["composite"][i] for s in range(3)) / 3
        for i in range(30)
    ]
    expected = stats.ttest_1samp(averaged, 0.0).confidence_interval(0.95)
    assert (found["low"], found["high"]) == pytest.approx((expected.low, expected.high))
    assert set(found["per_seed"]) == {0, 1, 2} and "p" not in found  # composites are not right/wrong
    for seed in range(3):
        a, b = first[seed]["per_example"]["composite"], second[seed]["per_example"]["composite"]
        per_seed = stats.ttest_rel(a, b).confidence_interval(0.95)
        assert (found["per_seed"][seed]["low"], found["per_seed"][seed]["high"]) == pytest.approx(tuple(per_seed))


def test_no_interval_where_the_examples_have_no_spread_and_none_without_per_example_values():
    same = run({"format_accuracy": [1.0] * 8})
    found = example_difference({0: same}, {0: same}, "format_accuracy")
    assert found["identical"] and "low" not in found and found["mean"] == 0.0
    assert example_difference({0: {"format_accuracy": 1.0}}, {0: same}, "format_accuracy") is None


def test_a_difference_of_rates_stays_within_minus_one_and_one():
    found = paired_interval([-1.0, -1.0, 0.0], rates=True)
    assert found["low"] == -1.0 and found["high"] > 0
    assert paired_interval([-1.0, -1.0, 0.0])["low"] < -1.0  # token counts are not cut
