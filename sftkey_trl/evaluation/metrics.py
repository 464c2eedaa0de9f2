"""Scoring: each generation judged against its gold answer, and the metrics every report reads, in one list.

A new metric is one `Metric` entry in `METRICS`: every table, plot, card, comparison and keep-best reads this list.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from statistics import fmean

from ..errors import closest
from .answers import ANSWER_TYPES, answers_match, composite_score, extract_answer, gold_is_parseable
from .reasoning import reasoning_final_value

NUMERIC = ("numeric", "math")  # answer types whose reasoning arrives at a value that can be compared


@dataclass(frozen=True)
class Metric:
    """One number computed from a list of prediction records: the mean of `value` over the records it judges
    (`value` None: the record does not count), None when it judges none. Each record's value is kept beside the
    metric (`summarise`'s `per_example`), so the comparison can resample examples."""

    name: str
    title: str  # words: the metric's column or row label in every table, the card and the plots
    description: str
    value: Callable[[dict], float | None]  # one prediction record's contribution
    reported: bool = False  # a column of the results tables and of the comparison
    higher_is_better: bool | None = True  # None: no direction (it describes generations, it does not score them)
    answer_types: tuple[str, ...] = ANSWER_TYPES  # the answer types it is defined for (None for the others)
    decimals: int = 3  # digits after the point in the results tables

    def compute(self, rows: list[dict]) -> float | None:
        """The metric over prediction records `rows`."""
        values = [value for value in map(self.value, rows) if value is not None]
        return fmean(values) if values else None


def _flag(key: str) -> Callable[[dict], float | None]:
    """A record's `key` as 1.0/0.0 (None where the record does not judge it)."""
    return lambda row: None if row.get(key) is None else float(bool(row[key]))


METRICS: list[Metric] = [
    Metric("accuracy", "accuracy", "the answer in the answer slot (tags or answer line) matches the gold answer",
           _flag("correct"), reported=True),
    Metric("lenient_accuracy", "lenient accuracy",
           "accuracy counting the last number of a generation without an answer slot", _flag("lenient_correct")),
    Metric("format_accuracy", "format accuracy", "generation has the trained response format", _flag("format_ok"),
           reported=True),
    Metric("composite", "composite (0.7 acc + 0.3 fmt)", "the paper's composite: 0.7 accuracy + 0.3 format accuracy",
           lambda p: composite_score(float(bool(p["correct"])), float(bool(p["format_ok"]))), reported=True),
    Metric("accuracy_given_format", "accuracy when formatted", "accuracy among well-formatted generations",
           lambda p: float(bool(p["correct"])) if p["format_ok"] else None),
    Metric("strict_accuracy", "strict accuracy", "correct and well formatted",
           lambda p: float(bool(p["correct"] and p["format_ok"]))),
    Metric("last_number_fallback_rate", "last-number fallback", "answers taken from the last number (no answer slot)",
           lambda p: float(p["extraction_method"] == "last_number"), higher_is_better=False),
    Metric("reasoning_final_accuracy", "reasoning reaches gold answer",
           "the reasoning's final value matches the gold answer", _flag("reasoning_final_correct"), reported=True,
           answer_types=NUMERIC),
    Metric("answer_reasoning_consistency", "answer follows reasoning", "the answer equals the reasoning's final value",
           _flag("consistent"), reported=True, answer_types=NUMERIC),
    Metric("reasoning_reference_accuracy", "reasoning reaches reference",
           "the reasoning's final value matches the reference reasoning's (rows whose reference states one): "
           "whether the reasoning is right even where the answer transforms it",
           _flag("reasoning_matches_reference"), reported=True, answer_types=NUMERIC),
    Metric("mean_generated_tokens", "generated tokens (mean)", "mean generated tokens per example",
           lambda p: float(p["generated_tokens"]), reported=True, higher_is_better=False, decimals=1),
    Metric("mean_reasoning_length", "reasoning length (characters)", "mean reasoning length in characters",
           lambda p: float(p["reasoning_length"]), higher_is_better=None),
]  # fmt: skip
METRIC_NAMES = [metric.name for metric in METRICS]
DEFAULT_METRIC = "accuracy"
NO_ANSWER_SLOT = ("last_number", "none")  # extraction methods that found no answer tag / answer line


def reported() -> list[Metric]:
    """The metrics shown in every results table, the card and the comparison, in `METRICS`' order."""
    return [metric for metric in METRICS if metric.reported]


def metric_named(name: str) -> Metric | None:
    """The `METRICS` entry called `name` (None: no such metric)."""
    return next((metric for metric in METRICS if metric.name == name), None)


def selectable(answer_type: str) -> list[str]:
    """The metrics keep_best can select on for `answer_type` answers: higher is better, and defined for them."""
    return [m.name for m in METRICS if m.higher_is_better is True and answer_type in m.answer_types]


def selection_problem(name: str, answer_type: str) -> str | None:
    """Why keep_best (which keeps the highest score) cannot select on metric `name` for `answer_type` answers, as
    the end of a sentence about `metric_for_best_model: <name>`; None when it can."""
    metric, valid = next((m for m in METRICS if m.name == name), None), selectable(answer_type)
    use = f"use one of {', '.join(valid)}"
    if metric is None:
        return f"is not an evaluation metric keep_best can select on{closest(name, valid)}; {use}"
    if metric.higher_is_better is None:
        return f"has no direction ({metric.description}), so no score is better than another; {use}"
    if not metric.higher_is_better:
        return f"is better lower, and keep_best keeps the highest score; {use}"
    if answer_type not in metric.answer_types:
        only = ", ".join(metric.answer_types)
        return f"is not defined for `answer_type: {answer_type}` (only {only}): every evaluation would tie; {use}"
    return None


def summarise(predictions: list[dict], answer_type: str) -> dict:
    """Aggregate prediction records into the metrics written to results.json, with `per_example`: each record's
    index and its value of every reported metric (None where it does not count), so intervals over the test
    examples can be drawn later from results.json alone."""
    metrics: dict = {"num_examples": len(predictions)}
    if not predictions:
        return metrics
    for metric in METRICS:
        value = metric.compute(predictions) if answer_type in metric.answer_types else None
        if value is not None:
            metrics[metric.name] = value
    metrics["unparseable_gold"] = sum(not p["gold_parseable"] for p in predictions)
    per_example: dict[str, list] = {"index": [p["index"] for p in predictions]}
    for metric in reported():
        if metric.name in metrics:
            per_example[metric.name] = [metric.value(p) for p in predictions]
    metrics["per_example"] = per_example
    return metrics


def score(
    examples: list[dict], generations: list[tuple[str, int]], answer_type: str, script_args, tags
) -> tuple[dict, list[dict]]:
    """Score generations against gold answers; return (metrics, one prediction record per example)."""
    predictions = []
    for example, (text, length) in zip(examples, generations):
        extraction = extract_answer(text, script_args.response_format, tags, script_args.answer_template)
        matches = answers_match(extraction.answer, example["gold"], answer_type)
        final = reasoning_final_value(extraction.reasoning)
        reference = reasoning_final_value(example["reasoning"]) if example.get("reasoning") else None
        predictions.append(
            {
                "index": example["index"],
                "prompt": example["prompt"],
                "generation": text,
                "extracted_answer": extraction.answer,
                "extraction_method": extraction.method,
                "gold": example["gold"],
                "correct": matches and extraction.method not in NO_ANSWER_SLOT,
                "lenient_correct": matches,
                "format_ok": extraction.format_ok,
                "gold_parseable": gold_is_parseable(example["gold"], answer_type),
                "generated_tokens": length,
                "reasoning_final": final,
                "reasoning_final_correct": answers_match(final, example["gold"], answer_type),
                "consistent": final is not None and answers_match(extraction.answer, final, answer_type),
                "reasoning_matches_reference": None
                if reference is None
                else final is not None and answers_match(final, reference, answer_type),
                "reasoning_length": len(extraction.reasoning or ""),
            }
        )
    return summarise(predictions, answer_type), predictions
