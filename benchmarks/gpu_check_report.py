"""The GPU check's results: rows of one table (and of the JSON file), judged against the targets: this project's
trainer at least 95% of a bare `trl.SFTTrainer`'s tokens/s with no more peak memory, and the memory estimate
against the measured peak. Pure functions, tested without running anything."""

from __future__ import annotations

import re
import statistics
from dataclasses import dataclass, field

SPEED_TARGET = 0.95  # this project's trainer: at least 95% of the bare trainer's tokens/s
MEMORY_TOLERANCE_GIB = 0.01  # "no higher" up to the allocator's granularity
KIND_NAMES = {"trl": "bare trl.SFTTrainer", "sftkey": "sftkey", "sftkey-no-part-losses": "sftkey, log_part_losses off"}
WRAPPER_ERRORS = ("ChildFailedError", "CalledProcessError", "torch.distributed.elastic")


@dataclass
class Row:
    """One line of the table (and of the JSON file's `rows`); `data` keeps the numbers."""

    section: str
    setup: str
    result: str
    comparison: str = ""
    memory: str = ""
    verdict: str = ""
    data: dict = field(default_factory=dict)


def ratio(value: float | None, baseline: float | None) -> float | None:
    """value / baseline, or None when either is missing or the baseline is zero."""
    if value is None or baseline is None or baseline == 0:
        return None
    return value / baseline


def verdict(speed_ratio: float | None, memory: float | None, baseline_memory: float | None) -> str:
    """The target of the check: at least SPEED_TARGET of the bare trainer's tokens/s, and no more memory."""
    if speed_ratio is None:
        return "n/a"
    problems = [] if speed_ratio >= SPEED_TARGET else [f"slower than {SPEED_TARGET:.2f}x"]
    if memory is not None and baseline_memory is not None and memory > baseline_memory + MEMORY_TOLERANCE_GIB:
        problems.append("more memory")
    if problems:
        return "MISSES target: " + ", ".join(problems)
    return "meets target" if memory is not None else "meets speed target (memory not measured on CPU)"


def gib(value: float | None, baseline: float | None = None) -> str:
    """A memory figure in GiB (MiB below 0.1 GiB, for the tiny models), with its ratio to `baseline` if given."""
    if value is None:
        return "n/a (CPU)"
    share = ratio(value, baseline)
    text = f"{value:.2f} GiB" if value >= 0.1 else f"{value * 1024:.1f} MiB"
    return text + (f" ({share:.2f}x)" if share is not None else "")


def training_rows(
    label: str, loss_on: str, by_kind: dict[str, list], cut: bool, reference: str = "", judge: bool = True
) -> list[Row]:
    """One row per trainer kind: median tokens/s and largest peak over the rounds, each against the bare trainer
    (whose row carries `reference`: an earlier measurement of the same setup, for orientation). `judge` False:
    no verdict (a tiny CPU run checks the logic; one step of a tiny model says nothing about speed)."""
    summary = {}
    for kind, measured in by_kind.items():
        if measured:
            peaks = [m.peak_gib for m in measured]
            peak = None if None in peaks else max(peaks)
            summary[kind] = (statistics.median(m.tokens_per_s for m in measured), peak, measured)
    base_speed, base_memory, _ = summary.get("trl", (None, None, []))
    rows = []
    for kind, (speed, peak, measured) in summary.items():
        speed_ratio = ratio(speed, base_speed)
        baseline = kind == "trl"
        rows.append(
            Row(
                "training",
                f"{label}, {loss_on} stage, {KIND_NAMES[kind]}",
                f"{speed:,.0f} tokens/s",
                "baseline" if baseline else f"{speed_ratio:.3f}x" if speed_ratio else "n/a",
                gib(peak, None if baseline else base_memory),
                reference if baseline else verdict(speed_ratio, peak, base_memory) if judge else "not judged",
                {"group": label, "loss_on": loss_on, "kind": kind, "tokens_per_s": speed, "peak_gib": peak,
                 "runs": len(measured), "speed_ratio": None if baseline else speed_ratio,
                 "memory_ratio": None if baseline else ratio(peak, base_memory), "rounds_cut_by_budget": cut,
                 "each_run": [vars(m) for m in measured]},
            )
        )  # fmt: skip
    return rows


def memory_rows(label: str, method: str, estimate_gib: float, peaks: dict[str, float | None], shape: str) -> list[Row]:
    """The memory estimate (train/memory.py, the dry run's figure) against this project's measured peak per stage."""
    rows = []
    for loss_on, peak in peaks.items():
        error = None if peak is None else ratio(peak, estimate_gib) - 1
        comparison = "measured: n/a (CPU)" if error is None else f"measured {error:+.0%} vs estimate"
        note = "" if error is None else "estimate within 10%" if abs(error) <= 0.10 else "estimate off by over 10%"
        rows.append(
            Row(
                "memory",
                f"{label}, {loss_on} stage ({shape})",
                f"estimated {gib(estimate_gib)}",
                comparison,
                gib(peak),
                note,
                {"group": label, "method": method, "loss_on": loss_on, "estimated_gib": estimate_gib,
                 "measured_gib": peak, "measured_over_estimate": None if error is None else error + 1},
            )
        )  # fmt: skip
    return rows


def last_error_line(text: str, limit: int = 300) -> str:
    """The one line a failed run stopped with: the project's `error: ...` line, else the last exception line that
    is not the launcher's own wrapper error, else the last line."""
    lines = [re.sub(r"^\[rank\d+\]:\s*", "", line).strip() for line in text.splitlines()]
    lines = [line for line in lines if line]
    for line in reversed(lines):
        if line.startswith("error: "):
            return line[:limit]
    for line in reversed(lines):
        exception = re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)\b", line)
        if exception and not any(wrapper in line for wrapper in WRAPPER_ERRORS):
            return line[:limit]
    return lines[-1][:limit] if lines else "(no output)"


def format_table(rows: list[Row]) -> str:
    """A Markdown table of every row."""
    head = ["check", "setup", "result", "vs baseline", "peak memory", "verdict / note"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for row in rows:
        cells = [row.section, row.setup, row.result, row.comparison, row.memory, row.verdict]
        lines.append("| " + " | ".join(cell.replace("|", "/") for cell in cells) + " |")
    return "\n".join(lines)
