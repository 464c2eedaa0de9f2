"""Uncertainty of measured scores from both of its sources, from the per-example values `metrics.summarise` keeps:
the seeds (a Student-t interval over per-seed results, given 2 or more seeds) and the test set (a paired Student-t
interval over the test examples' differences, and the exact McNemar test for right/wrong outcomes).

Over the examples, the paired t interval rather than a percentile bootstrap: on the few dozen examples a user's own
test set may hold, the percentile bootstrap runs narrow (8 examples, 3 of them lost: the bootstrap excludes zero,
the exact McNemar test gives p = 0.25); on a thousand they agree.
"""

from __future__ import annotations

import math
import statistics


def mean_ci(values: list[float]) -> tuple[float, float | None]:
    """Mean and half-width of the two-sided 95% Student-t confidence interval over `values`; the half-width is None
    for a single value: one seed gives no interval, not a zero-width one."""
    average = statistics.fmean(values)
    if len(values) < 2:
        return average, None
    from scipy.stats import t

    n = len(values)
    return average, float(t.ppf(0.975, n - 1)) * statistics.stdev(values) / math.sqrt(n)


def is_right_wrong(values: list[float]) -> bool:
    """Whether `values` are right/wrong outcomes (1.0 or 0.0 each)."""
    return set(values) <= {0.0, 1.0}


def mcnemar_p(first: list[float], second: list[float]) -> float:
    """The exact two-sided McNemar test of paired right/wrong outcomes: the binomial test at 1/2 of how many of the
    examples only one of the two got right were the first's (1.0 when no example differs)."""
    only_first = sum(a > b for a, b in zip(first, second))
    discordant = only_first + sum(b > a for a, b in zip(first, second))
    if discordant == 0:
        return 1.0
    from scipy.stats import binomtest

    return float(binomtest(only_first, discordant, 0.5).pvalue)


def paired_interval(deltas: list[float], rates: bool = False) -> dict:
    """The mean of paired differences `deltas`, n, and their 95% Student-t interval (`low`, `high`; cut to [-1, 1]
    for differences of `rates`), or, when every example differs by the same amount, `identical` and no interval (the
    data have no spread to give one)."""
    mean, half = mean_ci(deltas)
    entry = {"mean": mean, "n": len(deltas)}
    if half is None or len(set(deltas)) == 1:
        return entry | {"identical": True}
    low, high = mean - half, mean + half
    return entry | ({"low": max(low, -1.0), "high": min(high, 1.0)} if rates else {"low": low, "high": high})


def is_rate(values: list[float]) -> bool:
    """Whether every value lies in [0, 1] (so differences lie in [-1, 1])."""
    return all(0.0 <= value <= 1.0 for value in values)


def difference_interval(first: list[float], second: list[float]) -> dict:
    """`first - second` over paired examples (`paired_interval`), and for right/wrong outcomes that differ somewhere
    the exact McNemar p-value `p`."""
    entry = paired_interval([a - b for a, b in zip(first, second)], is_rate(first) and is_rate(second))
    if "identical" not in entry and is_right_wrong(first) and is_right_wrong(second):
        entry["p"] = mcnemar_p(first, second)
    return entry


def _example_values(run: dict, metric: str) -> dict | None:
    """Test example index -> `metric`'s value for one arm and seed (None: no per-example values were kept)."""
    per_example = run.get("per_example") or {}
    if metric not in per_example:
        return None
    return {index: value for index, value in zip(per_example["index"], per_example[metric]) if value is not None}


def example_difference(first: dict, second: dict, metric: str) -> dict | None:
    """`first - second` on `metric` (each: seed -> a run's results with `per_example`) over the test examples both
    judged, paired by example: per seed (`difference_interval`) and pooled over the seeds (one seed: that seed's;
    several: each example's difference averaged over the seeds, `paired_interval` over the examples). None when an
    arm kept no per-example values (measured before they were kept)."""
    per_seed, by_example, rates = {}, {}, True
    for seed, run in first.items():
        a, b = _example_values(run, metric), _example_values(second.get(seed, {}), metric)
        if a is None or b is None:
            return None
        common = sorted(index for index in a if index in b)
        if common:
            ours, theirs = [a[i] for i in common], [b[i] for i in common]
            per_seed[seed] = difference_interval(ours, theirs)
            rates = rates and is_rate(ours) and is_rate(theirs)
            for index in common:
                by_example.setdefault(index, []).append(a[index] - b[index])
    if len(per_seed) < 2:
        return next(({**entry, "per_seed": per_seed} for entry in per_seed.values()), None)
    pooled = [statistics.fmean(by_example[index]) for index in sorted(by_example)]
    return {**paired_interval(pooled, rates), "per_seed": per_seed}
