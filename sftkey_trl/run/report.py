"""Results tables for the terminal and for `results.md`."""

from __future__ import annotations

import logging
from pathlib import Path

from rich.console import Console
from rich.table import Table

from ..evaluation.metrics import Metric, metric_named, reported
from ..files import discard, read_json
from .diagnosis import diagnose

logger = logging.getLogger(__name__)


def result_rows(results: dict) -> list[tuple[str, dict]]:
    """(name, metrics) for the base model (if evaluated) and each stage, in order."""
    rows = [("base", results["base"])] if "base" in results else []
    return rows + list(results.get("stages", {}).items())


def cell(value, key: str = "") -> str:
    """A table cell: `-` for a missing value; a float to metric `key`'s decimals (the default for anything else)."""
    if value is None:
        return "-"
    decimals = found.decimals if (found := metric_named(key)) else Metric.decimals
    return f"{value:.{decimals}f}" if isinstance(value, float) else str(value)


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
    columns = list(metric_rows().items())
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


def plot_results(results: dict, output_dir: Path) -> list[Path]:
    """`stages.png`: the reported scores per evaluated model; `training_curves.png`: the reasoning and key losses over
    the stages' steps. A plot with nothing to draw is not written (and an earlier one removed), and the log says so.
    Returns the plots written."""
    import matplotlib

    matplotlib.use("Agg")
    written = []
    for name, draw in (("stages.png", _plot_stages), ("training_curves.png", _plot_curves)):
        path = output_dir / name
        if draw(results, output_dir, path):
            written.append(path)
        else:
            discard(path, kinds=["run"])  # an earlier plot would no longer match the results
    return written


def _plot_stages(results: dict, output_dir: Path, path: Path) -> bool:
    import matplotlib.pyplot as plt

    rows = result_rows(results)
    # the scores, all shares of the test examples in [0, 1]; a score no model has (not defined here) takes no slot
    metrics = [m for m in reported() if m.higher_is_better and any(m.name in metrics for _, metrics in rows)]
    if not metrics:
        logger.info("no %s: no stage was evaluated (eval_after_stages: false, or no evaluation data)", path.name)
        return False
    fig, ax = plt.subplots(figsize=(4.5 + 1.2 * len(rows), 4), layout="constrained")
    width = 0.8 / len(metrics)
    for k, metric in enumerate(metrics):
        values = [m.get(metric.name, float("nan")) for _, m in rows]
        positions = [i + (k - (len(metrics) - 1) / 2) * width for i in range(len(rows))]
        bars = ax.bar(positions, values, width, label=metric.title)
        ax.bar_label(bars, fmt="%.2f", fontsize=6, padding=1)  # a score of 0 is read, not mistaken for no bar
    ax.set_xticks(range(len(rows)), [name for name, _ in rows])
    ax.set_ylim(0, 1.05)
    ax.set_xlabel(f"evaluated model: {'the base, then each stage' if 'base' in results else 'each stage'}")
    ax.set_ylabel("score (share of test examples)")
    examples = {m.get("num_examples") for _, m in rows} - {None}
    on = f" on {examples.pop()} test examples" if len(examples) == 1 else ""
    ax.set_title(f"Scores after each stage{on}", loc="left", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))  # beside the bars, never over them
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _plot_curves(results: dict, output_dir: Path, path: Path) -> bool:
    import matplotlib.pyplot as plt

    curves, offset, boundaries = [], 0, []
    for name in results.get("stages", {}):
        history = read_json(output_dir / name / "log_history.json", without=f"{path.name} plots the other stages")
        if not isinstance(history, list):
            continue
        logs = [e for e in history if isinstance(e, dict) and ("reasoning_loss" in e or "key_loss" in e)]
        for part, style in (("reasoning_loss", "-"), ("key_loss", "--")):
            points = [(offset + e["step"], e[part]) for e in logs if part in e and "train_loss" not in e]
            if points:
                curves.append((points, style, f"{name}: {part.replace('_', ' ')}"))
        offset += max((e["step"] for e in logs), default=0)
        boundaries.append(offset)
    if not curves:
        why = "fewer steps than `logging_steps`, or `log_part_losses: false`"
        logger.info("no %s: no stage logged its reasoning and key losses (%s)", path.name, why)
        return False
    fig, ax = plt.subplots(figsize=(8, 3.8), layout="constrained")
    for points, style, label in curves:
        ax.plot(*zip(*points), style, label=label)
    for boundary in boundaries[:-1]:
        ax.axvline(boundary, color="gray", linewidth=0.6, linestyle=":")
    several = len(boundaries) > 1
    ax.set_xlabel(
        "optimizer step" + (" (the stages one after another; dotted: where a stage ends)" if several else "")
    )
    ax.set_ylabel("mean loss per token")
    losses = [y for points, _, _ in curves for _, y in points]
    if min(losses) > 0 and max(losses) / min(losses) > 20:  # a log axis only where the losses span decades
        ax.set_yscale("log")
    ax.set_title("Training loss on the reasoning and on the answer (key) tokens", loc="left", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
