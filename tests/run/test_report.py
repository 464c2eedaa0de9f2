"""The terminal results table fits in 80 columns with every metric and model named in full."""

from __future__ import annotations

import io
from pathlib import Path

from rich.console import Console

from sftkey_trl.run.card import results_section
from sftkey_trl.run.report import metric_rows, print_results, results_markdown

METRICS = {"accuracy": 0.25, "format_accuracy": 1.0, "composite": 0.475, "reasoning_final_accuracy": 0.25,
           "answer_reasoning_consistency": 1.0, "mean_generated_tokens": 135.125, "num_examples": 1319}  # fmt: skip


def render(stage_names: list[str]) -> str:
    stages = {name: dict(METRICS) for name in stage_names}
    console = Console(width=80, file=io.StringIO(), record=True)
    print_results({"base": dict(METRICS), "stages": stages}, Path("outputs/qwen2.5-7b/gsm8k/run"), console)
    return console.export_text()


def test_results_table_fits_80_columns_without_truncating_names():
    text = render(["sft", "key", "key_mix"])
    assert max(len(line) for line in text.splitlines()) <= 80
    for name in ("base", "sft", "key", "key_mix", *metric_rows().values(), "0.475", "135.1", "1319"):
        assert name in text, name


def test_long_stage_names_wrap_instead_of_being_cut():
    text = render(["sft", "key_best_of_three", "another_long_stage", "x"])
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "…" not in text and all(label in text for label in metric_rows().values())


def test_every_table_rounds_a_metric_to_its_own_decimals():
    """The terminal table, results.md and the card read each metric's `decimals` from its one entry."""
    results = {"base": dict(METRICS), "stages": {"sft": dict(METRICS)}}
    for text in (render(["sft"]), results_markdown(results), "\n".join(results_section(results))):
        assert "135.1" in text and "135.125" not in text and "0.475" in text
