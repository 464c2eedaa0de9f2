"""Results tables for the terminal and for `results.md`."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from ..evaluation.metrics import METRICS, Metric, reported
from .diagnosis import diagnose

DECIMALS = {metric.name: metric.decimals for metric in METRICS}


def result_rows(results: dict) -> list[tuple[str, dict]]:
    """(name, metrics) for the base model (if evaluated) and each stage, in order."""
    rows = [("base", results["base"])] if "base" in results else []
    return rows + list(results.get("stages", {}).items())


def cell(value, key: str = "") -> str:
    """A table cell: `-` for a missing value; a float to metric `key`'s decimals (the default for anything else)."""
    if value is None:
        return "-"
    return f"{value:.{DECIMALS.get(key, Metric.decimals)}f}" if isinstance(value, float) else str(value)


def markdown_table(header: list[str], rows: list[list]) -> list[str]:
    """A Markdown table's lines: the header, the `---` rule, then one line per row of cells."""
    return ["| " + " | ".join(map(str, cells)) + " |" for cells in [header, ["---"] * len(header), *rows]]


def metric_rows() -> dict[str, str]:
    """Row labels of the terminal table and the card: one row per reported metric (one column per model, to fit 80
    columns)."""
    return {metric.name: metric.title or metric.name for metric in reported()} | {"num_examples": "examples"}


def results_table(results: dict, output_dir: Path) -> Table:
    """The metrics as rows and the evaluated models (base, then each stage) as columns. Labels and numbers are
    never cut; a model name too long for the width wraps onto a second header line."""
    rows, labels = result_rows(results), metric_rows()
    cells = {name: [cell(metrics.get(key), key) for key in labels] for name, metrics in rows}
    table = Table(title="SFTKey results", caption=str(output_dir / "results.json"), expand=False)
    table.add_column("metric", no_wrap=True, min_width=max(map(len, labels.values())))
    for name, _ in rows:
        table.add_column(name, justify="right", overflow="fold", min_width=max(map(len, cells[name])))
    for index, label in enumerate(labels.values()):
        table.add_row(label, *(cells[name][index] for name, _ in rows))
    return table


def print_results(results: dict, output_dir: Path, console: Console | None = None) -> None:
    """Print the results table: 80 columns hold the base model and three stages with names of up to 7 characters."""
    console = console or Console()
    console.print(results_table(results, output_dir))
    for line in diagnose(results):
        console.print(line, markup=False, highlight=False)


def results_markdown(results: dict) -> str:
    """`results.md`: the metrics table plus each stage's training summary."""
    columns = [(metric.name, metric.label) for metric in reported()] + [("num_examples", "n")]
    lines = ["# SFTKey results", ""]
    if results.get("selected_on_test"):
        lines += ["**keep_best selected checkpoints on the evaluation set (`select_on_test: true`): optimistic.**", ""]
    rows = [[name] + [cell(metrics.get(key), key) for key, _ in columns] for name, metrics in result_rows(results)]
    lines += markdown_table(["stage"] + [title for _, title in columns], rows)
    rows = []
    for name, entry in results.get("stages", {}).items():
        training = entry.get("training", {})
        keys = ("train_loss", "train_seconds", "tokens_per_second", "global_batch_size")
        kept = training.get("keep_best", {}).get("kept", "final weights")
        rows.append([name, entry.get("loss_on", "-"), *(cell(training.get(key)) for key in keys), kept])
    header = ["stage", "loss on", "train loss", "seconds", "tokens/s", "global batch", "kept"]
    lines += ["", *markdown_table(header, rows)]
    if summary := diagnose(results):
        lines += ["", "## What the numbers say", "", *(f"- {line}" for line in summary)]
    return "\n".join(lines) + "\n"


def plot_results(results: dict, output_dir: Path) -> None:
    """`stages.png`: the reported scores per stage; `training_curves.png`: the reasoning and key losses over the
    stages' steps."""
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result_rows(results)
    metrics = [metric for metric in reported() if metric.higher_is_better]  # the scores, all rates in [0, 1]
    fig, ax = plt.subplots(figsize=(2 + 1.5 * max(1, len(rows)), 3.6))
    width = 0.8 / len(metrics)
    for k, metric in enumerate(metrics):
        values = [m.get(metric.name) or 0.0 for _, m in rows]
        ax.bar([i + (k - (len(metrics) - 1) / 2) * width for i in range(len(rows))], values, width, label=metric.title)
    ax.set_xticks(range(len(rows)), [name for name, _ in rows])
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(output_dir / "stages.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 3.6))
    offset = 0
    for name, _ in rows:
        history = output_dir / name / "log_history.json"
        if name == "base" or not history.exists():
            continue
        logs = [entry for entry in json.loads(history.read_text()) if "reasoning_loss" in entry or "key_loss" in entry]
        for part, style in (("reasoning_loss", "-"), ("key_loss", "--")):
            points = [(offset + e["step"], e[part]) for e in logs if part in e and "train_loss" not in e]
            if points:
                ax.plot(*zip(*points), style, label=f"{name}: {part}")
        offset += max((e["step"] for e in logs), default=0)
    ax.set_xlabel("optimizer step (stages one after another)")
    ax.set_ylabel("mean loss per token")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(output_dir / "training_curves.png", dpi=120)
    plt.close(fig)
