"""Scoring: each generation judged against its gold answer, and the metrics every report reads, in one list.

A new metric is one `Metric` entry in `METRICS`: every table, plot, card, comparison and keep-best reads this list.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from statistics import mean

from ..errors import closest
from .answers import ANSWER_TYPES, answers_match, composite_score, extract_answer, gold_is_parseable
from .reasoning import reasoning_final_value

NUMERIC = ("numeric", "math")  # answer types whose reasoning arrives at a value that can be compared


@dataclass(frozen=True)
class Metric:
    """One number computed from a list of prediction records (None when it does not apply)."""

    name: str
    label: str  # short column header
    description: str
    compute: Callable[[list[dict], str], float | None]
    reported: bool = False  # a column of the results tables and of the comparison
    higher_is_better: bool | None = True  # None: no direction (it describes generations, it does not score them)
    answer_types: tuple[str, ...] = ANSWER_TYPES  # the answer types it is defined for (None for the others)
    title: str = ""  # a reported metric's row label in the terminal table and the card
    decimals: int = 3  # digits after the point in the results tables


def _rate(key: str, rows: list[dict]) -> float:
    return sum(bool(row[key]) for row in rows) / len(rows) if rows else 0.0


def _judged_rate(key: str) -> Callable[[list[dict], str], float | None]:
    """The rate of `key` over the rows that judge it (None: no row does)."""

    def rate(rows: list[dict], answer_type: str) -> float | None:
        judged = [row for row in rows if row.get(key) is not None]
        return _rate(key, judged) if judged else None

    return rate


METRICS: list[Metric] = [
    Metric("accuracy", "acc", "the answer in the answer slot (tags or answer line) matches the gold answer",
           lambda r, t: _rate("correct", r), reported=True, title="accuracy"),
    Metric("lenient_accuracy", "lenient", "accuracy counting the last number of a generation without an answer slot",
           lambda r, t: _rate("lenient_correct", r)),
    Metric("format_accuracy", "fmt", "generation has the trained response format",
           lambda r, t: _rate("format_ok", r), reported=True, title="format accuracy"),
    Metric("composite", "0.7a+0.3f", "the paper's composite: 0.7 accuracy + 0.3 format accuracy",
           lambda r, t: composite_score(_rate("correct", r), _rate("format_ok", r)), reported=True,
           title="composite (0.7 acc + 0.3 fmt)"),
    Metric("accuracy_given_format", "acc|fmt", "accuracy among well-formatted generations",
           lambda r, t: _rate("correct", [p for p in r if p["format_ok"]])),
    Metric("strict_accuracy", "strict", "correct and well formatted",
           lambda r, t: sum(p["correct"] and p["format_ok"] for p in r) / len(r)),
    Metric("last_number_fallback_rate", "fallback", "answers taken from the last number (no answer slot)",
           lambda r, t: sum(p["extraction_method"] == "last_number" for p in r) / len(r), higher_is_better=False),
    Metric("reasoning_final_accuracy", "reas", "the reasoning's final value matches the gold answer",
           _judged_rate("reasoning_final_correct"), reported=True, answer_types=NUMERIC,
           title="reasoning reaches gold answer"),
    Metric("answer_reasoning_consistency", "consist", "the answer equals the reasoning's final value",
           _judged_rate("consistent"), reported=True, answer_types=NUMERIC, title="answer follows reasoning"),
    Metric("reasoning_reference_accuracy", "reas=ref",
           "the reasoning's final value matches the reference reasoning's (rows whose reference states one): "
           "whether the reasoning is right even where the answer transforms it",
           _judged_rate("reasoning_matches_reference"), reported=True, answer_types=NUMERIC,
           title="reasoning reaches reference"),
    Metric("mean_generated_tokens", "tokens", "mean generated tokens per example",
           lambda r, t: mean(p["generated_tokens"] for p in r), reported=True, higher_is_better=False,
           title="generated tokens (mean)", decimals=1),
    Metric("mean_reasoning_length", "reas len", "mean reasoning length in characters",
           lambda r, t: mean(p["reasoning_length"] for p in r), higher_is_better=None),
]  # fmt: skip
METRIC_NAMES = [metric.name for metric in METRICS]
DEFAULT_METRIC = "accuracy"
NO_ANSWER_SLOT = ("last_number", "none")  # extraction methods that found no answer tag / answer line


def reported() -> list[Metric]:
    """The metrics shown in every results table, the card and the comparison, in `METRICS`' order."""
    return [metric for metric in METRICS if metric.reported]


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
    """Aggregate prediction records into the metrics written to results.json."""
    metrics: dict = {"num_examples": len(predictions)}
    if not predictions:
        return metrics
    for metric in METRICS:
        value = metric.compute(predictions, answer_type) if answer_type in metric.answer_types else None
        if value is not None:
            metrics[metric.name] = value
    metrics["unparseable_gold"] = sum(not p["gold_parseable"] for p in predictions)
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
