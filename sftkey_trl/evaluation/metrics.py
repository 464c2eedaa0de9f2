"""Scoring: each generation judged against its gold answer, and the metrics every report reads, in one list.

A new metric is one `Metric` entry in `METRICS`: the results table, `results.md`, the comparison and keep-best
(which selects on a named metric) all read this list.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from statistics import mean

from .answers import answers_match, composite_score, extract_answer, gold_is_parseable
from .reasoning import reasoning_final_value


@dataclass(frozen=True)
class Metric:
    """One number computed from a list of prediction records (None when it does not apply)."""

    name: str
    label: str  # short column header
    description: str
    compute: Callable[[list[dict], str], float | None]
    reported: bool = False  # a column of the results tables and of the comparison
    higher_is_better: bool = True


def _rate(key: str, rows: list[dict]) -> float:
    return sum(bool(row[key]) for row in rows) / len(rows) if rows else 0.0


def _numeric_only(key: str) -> Callable[[list[dict], str], float | None]:
    """The rate of `key` over the rows that judge it (None: not judged), for numeric and math answers only."""

    def rate(rows: list[dict], answer_type: str) -> float | None:
        judged = [row for row in rows if row.get(key) is not None]
        return _rate(key, judged) if judged and answer_type in ("numeric", "math") else None

    return rate


METRICS: list[Metric] = [
    Metric("accuracy", "acc", "the answer in the answer slot (tags or answer line) matches the gold answer",
           lambda r, t: _rate("correct", r), reported=True),
    Metric("lenient_accuracy", "lenient", "accuracy counting the last number of a generation without an answer slot",
           lambda r, t: _rate("lenient_correct", r)),
    Metric("format_accuracy", "fmt", "generation has the trained response format",
           lambda r, t: _rate("format_ok", r), reported=True),
    Metric("composite", "0.7a+0.3f", "the paper's composite: 0.7 accuracy + 0.3 format accuracy",
           lambda r, t: composite_score(_rate("correct", r), _rate("format_ok", r)), reported=True),
    Metric("accuracy_given_format", "acc|fmt", "accuracy among well-formatted generations",
           lambda r, t: _rate("correct", [p for p in r if p["format_ok"]])),
    Metric("strict_accuracy", "strict", "correct and well formatted",
           lambda r, t: sum(p["correct"] and p["format_ok"] for p in r) / len(r)),
    Metric("last_number_fallback_rate", "fallback", "answers taken from the last number (no answer slot)",
           lambda r, t: sum(p["extraction_method"] == "last_number" for p in r) / len(r), higher_is_better=False),
    Metric("reasoning_final_accuracy", "reas", "the reasoning's final value matches the gold answer",
           _numeric_only("reasoning_final_correct"), reported=True),
    Metric("answer_reasoning_consistency", "consist", "the answer equals the reasoning's final value",
           _numeric_only("consistent"), reported=True),
    Metric("reasoning_reference_accuracy", "reas=ref",
           "the reasoning's final value matches the reference reasoning's (rows whose reference states one): "
           "whether the reasoning is right even where the answer transforms it",
           _numeric_only("reasoning_matches_reference"), reported=True),
    Metric("mean_generated_tokens", "tokens", "mean generated tokens per example",
           lambda r, t: mean(p["generated_tokens"] for p in r), reported=True, higher_is_better=False),
    Metric("mean_reasoning_length", "reas len", "mean reasoning length in characters",
           lambda r, t: mean(p["reasoning_length"] for p in r)),
]  # fmt: skip
METRIC_NAMES = [metric.name for metric in METRICS]
BY_NAME = {metric.name: metric for metric in METRICS}
DEFAULT_METRIC = "accuracy"
NO_ANSWER_SLOT = ("last_number", "none")  # extraction methods that found no answer tag / answer line
REPORTED = [metric for metric in METRICS if metric.reported]


def summarise(predictions: list[dict], answer_type: str) -> dict:
    """Aggregate prediction records into the metrics written to results.json."""
    if not predictions:
        return {"num_examples": 0}
    metrics: dict = {"num_examples": len(predictions)}
    for metric in METRICS:
        value = metric.compute(predictions, answer_type)
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
        from_slot = extraction.method not in NO_ANSWER_SLOT
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
                "correct": matches and from_slot,
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
