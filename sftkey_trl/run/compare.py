"""The comparison's statistics and reports: Student-t 95% intervals per arm, paired differences against the paper's
arm and the baselines, compute per arm, ranked on a named metric (arms: `variants.py`; the loop: `comparison.py`)."""

from __future__ import annotations

import logging
import statistics
from pathlib import Path

from ..evaluation.intervals import example_difference, mean_ci
from ..evaluation.metrics import DEFAULT_METRIC, Metric, metric_named, reported
from ..files import discard, write_json, write_text
from ..recipe.schema import Recipe
from .report import markdown_table
from .variants import MATCHED, PAPER

logger = logging.getLogger(__name__)
PER_SEED_NOTE = (
    "Each cell: that seed's difference, its 95% interval over the test examples (paired Student t) and, for "
    "right/wrong scores, p: the exact McNemar test's p-value (the binomial test at 1/2 of the examples only one of "
    "the two got right)."
)
BASELINES = ("sft_continue", MATCHED)  # every arm is also compared with each of these, seed by seed


def arm_configuration(variant, recipe: Recipe) -> str:
    """A hash of everything but the seed that decides an arm's numbers: the recipe's result keys and the arm's stages
    and format (not its description: rewording one keeps its measured seeds)."""
    from .plan import NON_RESULT_KEYS, config_hash, result_values

    skip = NON_RESULT_KEYS | {"seed", "stages", "description"}
    sections = {"data": recipe.script, "model": recipe.model, "training": recipe.training, "variant": variant}
    return config_hash({name: result_values(obj, skip) for name, obj in sections.items()})


def carried_arms(earlier: dict, running: list[str], seeds: list[int], configurations: dict[str, str]) -> dict:
    """The arms of an earlier `comparison.json` kept beside the `running` ones (arm -> seed -> metrics): those measured
    with today's `configurations` and every one of `seeds`, cut to those seeds; any other is dropped with a warning."""
    carried, recorded = {}, earlier.get("configurations", {})
    for name, runs in earlier.get("per_seed", {}).items():
        if name in running:
            continue
        runs = {int(seed): run for seed, run in runs.items()}
        if name not in configurations or recorded.get(name) != configurations[name]:
            why = "another configuration (or an unrecorded one)"
        elif not set(seeds) <= set(runs):
            why = f"seeds {sorted(runs)}, not {seeds}"
        else:
            carried[name] = {seed: runs[seed] for seed in seeds}
            continue
        again = "add it to --variants to measure it again"
        logger.warning("comparison: the earlier `%s` is left out (measured with %s); %s", name, why, again)
    return carried


def _interval(values: list[float]) -> dict:
    """Mean over the seeds, and the Student-t half-width `ci95` only where 2 or more seeds give one."""
    mean, half = mean_ci(values)
    return {"mean": mean, "values": values} | ({"ci95": half} if half is not None else {})


def paired(per_seed: dict[str, dict[int, dict]], a: str, b: str) -> dict:
    """Per metric: `a - b` over the seeds both variants ran with (same seed, same data order): the mean and 95%
    Student-t interval over the seeds, and under `examples` the interval over the test examples."""
    result = {}
    for metric in (m.name for m in reported()):
        pairs = [(run.get(metric), per_seed[b].get(seed, {}).get(metric)) for seed, run in per_seed[a].items()]
        deltas = [x - y for x, y in pairs if x is not None and y is not None]
        if deltas:
            result[metric] = _interval(deltas)
            if examples := example_difference(per_seed[a], per_seed[b], metric):
                result[metric]["examples"] = examples
    return result


def summarise_variants(per_seed: dict[str, dict[int, dict]], reference: str = PAPER) -> dict:
    """Mean and 95% CI per arm and metric, compute, paired differences (`reference` minus each arm, each arm minus
    the `BASELINES`) and whether the matched baseline took `reference`'s steps in every seed."""
    table, compute = {}, {}
    for variant, runs in per_seed.items():
        values = {m.name: [run[m.name] for run in runs.values() if run.get(m.name) is not None] for m in reported()}
        table[variant] = {metric: _interval(found) for metric, found in values.items() if found}
        totals = {key: [run.get(key, 0) for run in runs.values()] for key in ("optimizer_steps", "train_tokens")}
        compute[variant] = {key: statistics.fmean(found) if found else 0 for key, found in totals.items()}
    others = [v for v in per_seed if v != reference]
    differences = {v: paired(per_seed, reference, v) for v in others} if reference in per_seed else {}
    versus = {b: {v: paired(per_seed, v, b) for v in per_seed if v != b} for b in BASELINES if b in per_seed}
    steps = {
        seed: [run.get("optimizer_steps"), per_seed[reference][seed].get("optimizer_steps")]
        for seed, run in per_seed.get(MATCHED, {}).items()
        if seed in per_seed.get(reference, {})
    }
    matched = {"steps": steps, "ok": bool(steps) and all(a is not None and a == b for a, b in steps.values())}
    return dict(
        reference=reference, variants=table, compute=compute, differences=differences, versus=versus, matched=matched
    )


def seeds_in_words(seeds: list[int]) -> str:
    """`1 seed (0)`, `3 seeds (0, 1, 2)`."""
    return f"{len(seeds)} seed{'s' if len(seeds) != 1 else ''} ({', '.join(map(str, seeds))})"


def _decimals(metric: str) -> int:
    return found.decimals if (found := metric_named(metric)) else Metric.decimals


def _seed_spread(entry: dict) -> float | None:
    """The Student-t half-width over seeds, only where 2 or more seeds gave one (an older comparison.json stored 0
    for a single seed)."""
    return entry.get("ci95") if len(entry.get("values", [])) > 1 else None


def _excludes_zero(low: float, high: float) -> str:
    return "*" if low > 0 or high < 0 else ""


def example_interval_text(examples: dict, metric: str) -> str:
    """`[-0.625, +0.125]` (with `*` when it excludes zero), or why the examples give no interval."""
    d = _decimals(metric)
    if examples.get("identical"):
        mean = examples["mean"]
        return "(no example differs)" if mean == 0 else f"(every example differs by {mean:+.{d}f})"
    low, high = examples["low"], examples["high"]
    return f"[{low:+.{d}f}, {high:+.{d}f}]{_excludes_zero(low, high)}"


def difference_text(entry: dict, metric: str) -> str:
    """A paired difference in a table cell: the mean, its interval over the test examples, and its interval over
    the seeds when there are 2 or more."""
    d = _decimals(metric)
    text = f"{entry['mean']:+.{d}f} "
    text += example_interval_text(entry["examples"], metric) if "examples" in entry else "(no example interval)"
    if _seed_spread(entry) is not None:
        text += " " + seed_interval_text(entry, metric)
    elif "p" in entry.get("examples", {}):
        text += f" p = {entry['examples']['p']:.2f}"
    return text


def seed_interval_text(entry: dict, metric: str) -> str:
    """`± 0.044` (with `*` when the interval over the seeds excludes zero)."""
    half = _seed_spread(entry)
    return f"± {half:.{_decimals(metric)}f}{_excludes_zero(entry['mean'] - half, entry['mean'] + half)}"


def value_text(entry: dict, metric: str) -> str:
    """An arm's mean, ± the 95% Student-t half-width over the seeds when there are 2 or more."""
    d = _decimals(metric)
    half = _seed_spread(entry)
    return f"{entry['mean']:.{d}f}" + (f" ± {half:.{d}f}" if half is not None else "")


def _title(metric: str) -> str:
    return found.title if (found := metric_named(metric)) else metric


def _difference_table(title: str, rows: dict, metrics: list[str]) -> list[str]:
    cells = [
        [other, *(difference_text(row[m], m) if m in row else "-" for m in metrics)] for other, row in rows.items()
    ]
    return ["", title, "", *markdown_table(["variant", *map(_title, metrics)], cells)]


def _baseline_label(summary: dict, baseline: str) -> str:
    if baseline != MATCHED:
        return f"{baseline}, the continuation baseline (same stage 1, the key stage's steps on the whole response)"
    if summary["matched"]["ok"]:
        return f"{baseline}, the compute-matched baseline (same optimizer steps as {summary['reference']})"
    steps = "; ".join(f"seed {seed}: {a} vs {b}" for seed, (a, b) in summary["matched"]["steps"].items())
    return (
        f"{baseline}, NOT compute-matched (optimizer steps differ from {summary['reference']}: {steps or 'unknown'})"
    )


def _examples_count(summary: dict) -> str:
    counts = {
        entry["examples"]["per_seed"][seed]["n"]
        for rows in [summary["differences"], *summary.get("versus", {}).values()]
        for row in rows.values()
        for entry in row.values()
        if "examples" in entry
        for seed in entry["examples"]["per_seed"]
    }
    return f"the {counts.pop()} test examples" if len(counts) == 1 else "the test examples"


def intervals_in_words(summary: dict, seeds: list[int]) -> list[str]:
    """What the paired-difference cells show, in words (the same for the markdown and the terminal)."""
    over = _examples_count(summary)
    if len(seeds) < 2:
        return [
            f"Each cell: the difference on the one seed, then [its 95% interval over {over}] (a paired Student-t "
            "interval over the examples' differences), then for right/wrong scores (accuracy, format accuracy, ...) "
            "p, the exact McNemar test's p-value. There is no interval over seeds: it needs 2 or more seeds "
            "(`--seeds 3`).",
        ]
    return [
        f"Each cell: the mean difference over the {len(seeds)} seeds, then [its 95% interval over {over}] (each "
        "example's difference averaged over the seeds, then a paired Student-t interval over the examples), then ± "
        "the half-width of its 95% Student-t interval over the seeds.",
    ]


def _per_seed_table(title: str, rows: dict, metric: str, seeds: list[int]) -> list[str]:
    """One seed per column: the difference on `metric`, its interval over the examples and the McNemar p-value."""
    cells = []
    for other, row in rows.items():
        per_seed = row.get(metric, {}).get("examples", {}).get("per_seed", {})
        cells.append([other] + [
            "-" if (entry := per_seed.get(seed, per_seed.get(str(seed)))) is None
            else f"{entry['mean']:+.{_decimals(metric)}f} {example_interval_text(entry, metric)}"
            + (f", p = {entry['p']:.2f}" if "p" in entry else "")
            for seed in seeds
        ])  # fmt: skip
    return ["", title, "", *markdown_table(["variant", *(f"seed {seed}" for seed in seeds)], cells)]


def markdown(summary: dict, descriptions: dict[str, str], seeds: list[int], metric: str = DEFAULT_METRIC) -> str:
    """The comparison as Markdown tables: arms ranked by `metric` (mean, ± 95% CI over seeds when there are 2 or
    more; compute), then the paired differences with their intervals over the test examples and over the seeds."""
    metrics = [m.name for m in reported() if any(m.name in row for row in summary["variants"].values())]
    ranked = sorted(summary["variants"], key=lambda v: -summary["variants"][v].get(metric, {}).get("mean", -1))
    rows = []
    for variant in ranked:
        row, compute = summary["variants"][variant], summary["compute"].get(variant, {})
        cells = [value_text(row[m], m) if m in row else "-" for m in metrics]
        cells += [f"{compute.get('optimizer_steps', 0):.0f}", f"{compute.get('train_tokens', 0):,.0f}"]
        rows.append([variant, *cells, descriptions.get(variant, "")])
    several = len(seeds) > 1
    shown = "mean ± 95% Student-t interval over the seeds" if several else "one seed: no interval over seeds"
    lines = [f"## Variants, ranked by {_title(metric)} ({seeds_in_words(seeds)}; {shown})", ""]
    if not several:
        lines += ["An interval over seeds needs 2 or more seeds (`--seeds 3`); the paired differences below give "
                  "each one's interval over the test examples.", ""]  # fmt: skip
    lines += markdown_table(["variant", *map(_title, metrics), "steps", "tokens", "what it is"], rows)
    tables = []
    if summary["differences"]:
        title = f"## Paired difference: {summary['reference']} minus each variant (same seed, same test examples)"
        tables += _difference_table(title, summary["differences"], metrics)
    for baseline, found in summary.get("versus", {}).items():
        title = f"## Paired difference: each variant minus {_baseline_label(summary, baseline)}"
        tables += _difference_table(title, found, metrics)
    if tables:
        lines += ["", *intervals_in_words(summary, seeds), "`*`: that interval excludes zero.", *tables]
    for baseline, found in summary.get("versus", {}).items() if len(seeds) > 1 else ():
        title = f"## Per seed: {_title(metric)} minus {baseline} over the test examples"
        lines += _per_seed_table(title, found, metric, seeds)
        lines += ["", PER_SEED_NOTE]
    return "\n".join(lines) + "\n"


def _baseline_of(summary: dict) -> str | None:
    """The baseline the plot and the terminal table show differences against: the first of `BASELINES` that ran."""
    return next((baseline for baseline in BASELINES if summary.get("versus", {}).get(baseline)), None)


def plot(summary: dict, path: Path, metric: str = DEFAULT_METRIC) -> bool:
    """`comparison.png`: accuracy and format accuracy per variant (with their 95% intervals over the seeds when
    there are 2 or more); below, when a baseline ran, each variant's paired difference on `metric` against it, with
    its 95% intervals over the test examples and over the seeds. Returns False (and says why in the log) when there
    is nothing to draw."""
    scores = [m for m in ("accuracy", "format_accuracy") if any(m in row for row in summary["variants"].values())]
    variants = [v for v in summary["variants"] if any(m in summary["variants"][v] for m in scores)]
    if not variants:
        logger.info("comparison: no plot (%s): no variant was evaluated", path.name)
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    several = len(summary.get("seeds", [])) > 1
    baseline = _baseline_of(summary)
    versus = summary["versus"].get(baseline, {}) if baseline else {}
    others = [v for v in variants if metric in versus.get(v, {})]
    fig, axes = plt.subplots(
        2 if others else 1, 1, figsize=(max(8.0, 0.8 * len(variants) + 5), 4.4 * (2 if others else 1)), squeeze=False,
        layout="constrained",
    )  # fmt: skip
    ax, width = axes[0][0], 0.8 / len(scores)
    for k, name in enumerate(scores):
        entries = [summary["variants"][v].get(name, {}) for v in variants]
        means = [entry.get("mean", float("nan")) for entry in entries]
        halves = [_seed_spread(entry) or 0.0 for entry in entries]
        errors = [[min(h, m) for m, h in zip(means, halves)], [min(h, 1 - m) for m, h in zip(means, halves)]]
        positions = [i + (k - (len(scores) - 1) / 2) * width for i in range(len(variants))]
        bars = ax.bar(positions, means, width, yerr=errors if several else None, capsize=4, label=_title(name))
        ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=2)  # a score of 0 is read, not mistaken for no bar
    ax.set_xticks(range(len(variants)), variants, rotation=30, ha="right")
    ax.set_ylim(0, 1.08)
    seeds = seeds_in_words(summary.get("seeds", []))
    if several:
        shown = f"Scores per variant: mean over {seeds}\nerror bars: 95% interval over the seeds"
    else:
        shown = f"Scores per variant: {seeds}\nno error bars: an interval over seeds needs 2 or more seeds"
    ax.set_title(shown, loc="left", fontsize=10)
    ax.set_ylabel("score (share of test examples)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    if others:
        _plot_differences(axes[1][0], versus, others, metric, baseline, several)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


WHISKER = 0.15  # an interval's offset from its bar's centre, where the bar's value is written


def _plot_differences(ax, versus: dict, others: list[str], metric: str, baseline: str, several: bool) -> None:
    """Each variant's paired difference on `metric` against `baseline`: the interval over the test examples (black)
    and, with 2 or more seeds, the interval over the seeds (blue), side by side."""
    entries = [versus[v][metric] for v in others]
    means = [entry["mean"] for entry in entries]
    intervals = [entry.get("examples") if "low" in entry.get("examples", {}) else None for entry in entries]
    colors = [
        "tab:gray" if found is None else "tab:green" if found["low"] > 0 else "tab:red" if found["high"] < 0
        else "tab:gray"
        for found in intervals
    ]  # fmt: skip
    bars = ax.bar(range(len(others)), means, 0.6, color=colors, alpha=0.6)
    ax.bar_label(bars, fmt="%+.2f", fontsize=7, padding=2)
    ax.axhline(0, color="black", linewidth=0.8)
    for i, entry in enumerate(entries):
        if entry.get("examples", {}).get("identical"):
            ax.annotate("no test example\ndiffers", (i, 0), xytext=(0, 14), textcoords="offset points", ha="center",
                        fontsize=7, color="dimgray")  # fmt: skip
    shown = [i for i, found in enumerate(intervals) if found is not None]
    if shown:
        # the bar is the mean over seeds of each seed's difference; the interval is centred on the examples' mean
        low = [max(0.0, means[i] - intervals[i]["low"]) for i in shown]
        high = [max(0.0, intervals[i]["high"] - means[i]) for i in shown]
        label = "95% interval over the test examples (paired t)"
        offset = -WHISKER if several else WHISKER
        ax.errorbar([i + offset for i in shown], [means[i] for i in shown], yerr=[low, high], fmt="none",
                    ecolor="black", capsize=4, label=label)  # fmt: skip
    spread = [i for i, entry in enumerate(entries) if _seed_spread(entry) is not None]
    if several and spread:
        ax.errorbar([i + WHISKER for i in spread], [means[i] for i in spread],
                    yerr=[_seed_spread(entries[i]) for i in spread], fmt="none", ecolor="tab:blue", capsize=4,
                    label="95% interval over the seeds (Student t)")  # fmt: skip
    ax.set_xticks(range(len(others)), others, rotation=30, ha="right")
    ax.set_ylabel(f"{_title(metric)} minus {baseline}")
    seeds = "" if several else "; one seed: no interval over seeds"
    title = f"{_title(metric).capitalize()} minus {baseline}, paired by seed and test example{seeds}\n"
    title += "red or green: the interval over the test examples excludes zero"
    ax.set_title(title, loc="left", fontsize=10)
    if shown or (several and spread):
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)


def terminal_table(summary: dict, metric: str = DEFAULT_METRIC):
    """The comparison in at most 100 columns: each variant's `metric` and its paired difference against the
    baseline (else the paper's arm minus it), with the interval over the test examples, and the interval over the
    seeds when there are 2 or more (with one seed, the exact McNemar p-value of right/wrong scores instead)."""
    from rich.table import Table

    seeds = summary.get("seeds", [])
    several = len(seeds) > 1
    baseline = _baseline_of(summary)
    if baseline:
        differences, heading = summary["versus"][baseline], f"minus {baseline}"
    else:
        differences, heading = summary.get("differences", {}), f"{summary.get('reference', PAPER)} minus it"
    table = Table(title=f"Comparison, ranked by {_title(metric)}: {seeds_in_words(seeds)}", title_justify="left")
    table.add_column("variant", overflow="fold", max_width=26)
    table.add_column(_title(metric), justify="right", no_wrap=True)
    table.add_column(heading, justify="right", overflow="fold", max_width=22)
    table.add_column("over test examples", justify="right", no_wrap=True)
    table.add_column("over seeds" if several else "McNemar p", justify="right", no_wrap=True)
    ranked = sorted(summary["variants"], key=lambda v: -summary["variants"][v].get(metric, {}).get("mean", -1))
    d = _decimals(metric)
    for variant in ranked:
        own = summary["variants"][variant].get(metric)
        entry = differences.get(variant, {}).get(metric)
        cells = [variant, value_text(own, metric) if own else "-", f"{entry['mean']:+.{d}f}" if entry else "-"]
        cells.append(example_interval_text(entry["examples"], metric) if entry and "examples" in entry else "-")
        if several:
            cells.append(seed_interval_text(entry, metric) if entry and _seed_spread(entry) is not None else "-")
        else:
            cells.append(f"{entry['examples']['p']:.2f}" if entry and "p" in entry.get("examples", {}) else "-")
        table.add_row(*cells)
    return table


def print_comparison(summary: dict, paths: list[Path], console=None) -> None:
    """The terminal's view of the comparison: the table (`terminal_table`), what its intervals are, and the files
    written, the full tables being in comparison.md."""
    from rich.console import Console

    if console is None:  # at most 100 columns; a narrower terminal's own width
        console = Console()
        console = Console(width=min(console.width, 100) if console.is_terminal else 100)
    metric = summary.get("ranked_by", DEFAULT_METRIC)
    console.print(terminal_table(summary, metric))
    seeds = summary.get("seeds", [])
    notes = ["Intervals: 95%, paired by seed and test example; `*`: the interval excludes zero."]
    if len(seeds) < 2:
        notes.insert(0, "One seed: no interval over seeds; it needs 2 or more seeds (`--seeds 3`).")
    for note in notes:
        console.print(note, markup=False, highlight=False)
    console.print("Wrote (every metric and baseline in comparison.md):", markup=False, highlight=False)
    for path in paths:
        console.print(f"  {path}", markup=False, highlight=False, soft_wrap=True)


def write_comparison(
    root: Path,
    per_seed: dict,
    variants: dict,
    seeds: list[int],
    metric: str = DEFAULT_METRIC,
    configurations: dict[str, str] | None = None,
) -> tuple[dict, list[Path]]:
    """Write comparison.json (recording `configurations`, for `carried_arms`), comparison.md and comparison.png (when
    there is something to draw) under `root`; return the summary and the files written."""
    summary = summarise_variants(per_seed)
    summary.update(seeds=seeds, ranked_by=metric)
    summary["configurations"] = {name: (configurations or {}).get(name) for name in per_seed}
    summary["per_seed"] = {v: {str(s): r for s, r in runs.items()} for v, runs in per_seed.items()}
    summary["descriptions"] = {name: variants[name].description for name in per_seed if name in variants}
    write_json(root / "comparison.json", summary)
    write_text(root / "comparison.md", markdown(summary, summary["descriptions"], seeds, metric))
    written = [root / "comparison.md", root / "comparison.json"]
    if plot(summary, root / "comparison.png", metric):
        written.append(root / "comparison.png")
    else:
        discard(root / "comparison.png", kinds=["comparison"])  # an earlier plot would no longer match the tables
    return summary, written
