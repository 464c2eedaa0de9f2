"""Results tables for the terminal and for `results.md`."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from ..evaluation.metrics import REPORTED
from .diagnosis import diagnose

COLUMNS = [(metric.name, metric.label) for metric in REPORTED] + [("num_examples", "n")]


def result_rows(results: dict) -> list[tuple[str, dict]]:
    """(name, metrics) for the base model (if evaluated) and each stage, in order."""
    rows = [("base", results["base"])] if "base" in results else []
    return rows + list(results.get("stages", {}).items())


def _cell(value) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


# Row labels of the terminal table: one row per metric, one column per evaluated model, so it fits in 80 columns
METRIC_LABELS = {
    "accuracy": "accuracy",
    "format_accuracy": "format accuracy",
    "composite": "composite (0.7 acc + 0.3 fmt)",
    "reasoning_final_accuracy": "reasoning reaches gold answer",
    "answer_reasoning_consistency": "answer follows reasoning",
    "reasoning_reference_accuracy": "reasoning reaches reference",
    "mean_generated_tokens": "generated tokens (mean)",
    "num_examples": "examples",
}


def _short(key: str, value) -> str:
    return f"{value:.1f}" if key == "mean_generated_tokens" and isinstance(value, float) else _cell(value)


def results_table(results: dict, output_dir: Path) -> Table:
    """The metrics as rows and the evaluated models (base, then each stage) as columns. Labels and numbers are
    never cut; a model name too long for the width wraps onto a second header line."""
    rows = result_rows(results)
    cells = {name: [_short(key, metrics.get(key)) for key in METRIC_LABELS] for name, metrics in rows}
    table = Table(title="SFTKey results", caption=str(output_dir / "results.json"), expand=False)
    table.add_column("metric", no_wrap=True, min_width=max(map(len, METRIC_LABELS.values())))
    for name, _ in rows:
        table.add_column(name, justify="right", overflow="fold", min_width=max(map(len, cells[name])))
    for index, label in enumerate(METRIC_LABELS.values()):
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
    header = "| stage | " + " | ".join(title for _, title in COLUMNS) + " |"
    lines = ["# SFTKey results", ""]
    if results.get("selected_on_test"):
        lines += ["**keep_best selected checkpoints on the evaluation set (`select_on_test: true`): optimistic.**", ""]
    lines += [header, "| --- " * (len(COLUMNS) + 1) + "|"]
    for name, metrics in result_rows(results):
        lines.append(f"| {name} | " + " | ".join(_cell(metrics.get(key)) for key, _ in COLUMNS) + " |")
    lines += ["", "| stage | loss on | train loss | seconds | tokens/s | global batch | kept |", "| --- " * 7 + "|"]
    for name, entry in results.get("stages", {}).items():
        training = entry.get("training", {})
        kept = training.get("keep_best", {}).get("kept", "final weights")
        lines.append(
            f"| {name} | {entry.get('loss_on', '-')} | {_cell(training.get('train_loss'))} | "
            f"{_cell(training.get('train_seconds'))} | {_cell(training.get('tokens_per_second'))} | "
            f"{_cell(training.get('global_batch_size'))} | {kept} |"
        )
    if summary := diagnose(results):
        lines += ["", "## What the numbers say", "", *(f"- {line}" for line in summary)]
    return "\n".join(lines) + "\n"


def plot_results(results: dict, output_dir: Path) -> None:
    """`stages.png`: accuracy, format accuracy and reasoning diagnostics per stage; `training_curves.png`: the
    reasoning-token and key-token losses over each stage's steps."""
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result_rows(results)
    metrics = ["accuracy", "format_accuracy", "reasoning_final_accuracy", "answer_reasoning_consistency"]
    fig, ax = plt.subplots(figsize=(2 + 1.5 * max(1, len(rows)), 3.6))
    width = 0.8 / len(metrics)
    for k, metric in enumerate(metrics):
        values = [m.get(metric) or 0.0 for _, m in rows]
        ax.bar([i + (k - 1.5) * width for i in range(len(rows))], values, width, label=metric)
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
