"""Results tables for the terminal and for `results.md`."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

COLUMNS = [
    ("accuracy", "accuracy"),
    ("format_accuracy", "format"),
    ("composite", "0.7acc+0.3fmt"),
    ("reasoning_final_accuracy", "reasoning final"),
    ("answer_reasoning_consistency", "consistency"),
    ("mean_generated_tokens", "gen tokens"),
    ("num_examples", "n"),
]


def result_rows(results: dict) -> list[tuple[str, dict]]:
    """(name, metrics) for the base model (if evaluated) and each stage, in order."""
    rows = [("base", results["base"])] if "base" in results else []
    return rows + list(results.get("stages", {}).items())


def _cell(value) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def print_results(results: dict, output_dir: Path) -> None:
    """Print one row per evaluated model with the main metrics."""
    table = Table(title=f"SFTKey results ({output_dir / 'results.json'})")
    table.add_column("stage")
    for _, title in COLUMNS:
        table.add_column(title, justify="right")
    for name, metrics in result_rows(results):
        table.add_row(name, *(_cell(metrics.get(key)) for key, _ in COLUMNS))
    Console().print(table)
