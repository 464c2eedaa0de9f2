"""The comparison's statistics and reports: Student-t 95% intervals per arm, paired differences against the paper's
arm and the baselines, compute per arm, ranked on a named metric (arms: `variants.py`; the loop: `comparison.py`)."""

from __future__ import annotations

import logging
import math
import statistics
from pathlib import Path

from ..evaluation.metrics import DEFAULT_METRIC, reported
from ..files import write_json, write_text
from ..recipe.schema import Recipe
from .report import markdown_table
from .variants import MATCHED, PAPER

logger = logging.getLogger(__name__)
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


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and half-width of the two-sided 95% Student-t confidence interval (0 for a single value)."""
    n = len(values)
    average = statistics.fmean(values)
    if n < 2:
        return average, 0.0
    from scipy.stats import t

    return average, float(t.ppf(0.975, n - 1)) * statistics.stdev(values) / math.sqrt(n)


def _interval(values: list[float]) -> dict:
    mean, half = mean_ci(values)
    return {"mean": mean, "ci95": half, "values": values}


def paired(per_seed: dict[str, dict[int, dict]], a: str, b: str) -> dict:
    """Per metric: mean and 95% CI of `a - b` over the seeds both variants ran with (same seed, same data order)."""
    result = {}
    for metric in (m.name for m in reported()):
        pairs = [(run.get(metric), per_seed[b].get(seed, {}).get(metric)) for seed, run in per_seed[a].items()]
        deltas = [x - y for x, y in pairs if x is not None and y is not None]
        if deltas:
            result[metric] = _interval(deltas)
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


def _difference(row: dict, metric: str, several_seeds: bool) -> str:
    if metric not in row:
        return "-"
    mean, half = row[metric]["mean"], row[metric]["ci95"]
    return f"{mean:+.3f} ± {half:.3f}{' *' if abs(mean) > half and several_seeds else ''}"


def _difference_table(title: str, rows: dict, metrics: list[str], several_seeds: bool) -> list[str]:
    cells = [[other, *(_difference(row, m, several_seeds) for m in metrics)] for other, row in rows.items()]
    return ["", title, "", *markdown_table(["variant", *metrics], cells)]


def _baseline_label(summary: dict, baseline: str) -> str:
    if baseline != MATCHED:
        return f"{baseline}, the continuation baseline (same stage 1, the key stage's steps on the whole response)"
    if summary["matched"]["ok"]:
        return f"{baseline}, the compute-matched baseline (same optimizer steps as {summary['reference']})"
    steps = "; ".join(f"seed {seed}: {a} vs {b}" for seed, (a, b) in summary["matched"]["steps"].items())
    return (
        f"{baseline}, NOT compute-matched (optimizer steps differ from {summary['reference']}: {steps or 'unknown'})"
    )


def markdown(summary: dict, descriptions: dict[str, str], seeds: list[int], metric: str = DEFAULT_METRIC) -> str:
    """The comparison as Markdown tables: arms ranked by `metric` (mean ± 95% CI, compute), then the paired
    differences."""
    metrics = [m.name for m in reported() if any(m.name in row for row in summary["variants"].values())]
    ranked = sorted(summary["variants"], key=lambda v: -summary["variants"][v].get(metric, {}).get("mean", -1))
    rows = []
    for variant in ranked:
        row, compute = summary["variants"][variant], summary["compute"].get(variant, {})
        cells = [f"{row[m]['mean']:.3f} ± {row[m]['ci95']:.3f}" if m in row else "-" for m in metrics]
        cells += [f"{compute.get('optimizer_steps', 0):.0f}", f"{compute.get('train_tokens', 0):,.0f}"]
        rows.append([variant, *cells, descriptions.get(variant, "")])
    lines = [f"## Variants, ranked by {metric} ({len(seeds)} seeds: {', '.join(map(str, seeds))}; mean ± 95% CI)", ""]
    lines += markdown_table(["variant", *metrics, "steps", "tokens", "what it is"], rows)
    several = len(seeds) > 1
    if summary["differences"]:
        title = f"## Paired difference: {summary['reference']} minus each variant (same seed; 95% CI)"
        lines += _difference_table(title, summary["differences"], metrics, several)
    for baseline, rows in summary.get("versus", {}).items():
        title = f"## Paired difference: each variant minus {_baseline_label(summary, baseline)}"
        lines += _difference_table(title, rows, metrics, several)
    if summary["differences"] or summary.get("versus"):
        lines += ["", "`*`: the interval excludes zero."]
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: Path, baseline: str = "sft_continue") -> None:
    """Accuracy and format accuracy per variant (95% CI); below, when `baseline` ran, each one's paired accuracy
    difference against it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = list(summary["variants"])
    versus = summary.get("versus", {}).get(baseline, {})
    panels = 2 if versus else 1
    fig, axes = plt.subplots(panels, 1, figsize=(0.9 * len(variants) + 2.5, 4.6 * panels), squeeze=False)
    ax = axes[0][0]
    width = 0.38
    for offset, metric in ((-width / 2, "accuracy"), (width / 2, "format_accuracy")):
        means = [summary["variants"][v].get(metric, {}).get("mean", 0) for v in variants]
        errors = [summary["variants"][v].get(metric, {}).get("ci95", 0) for v in variants]
        clipped = [[min(e, m) for m, e in zip(means, errors)], [min(e, 1 - m) for m, e in zip(means, errors)]]
        label = next(m.title for m in reported() if m.name == metric)
        ax.bar([i + offset for i in range(len(variants))], means, width, yerr=clipped, capsize=4, label=label)
    ax.set_xticks(range(len(variants)), variants, rotation=30, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("mean over seeds (95% CI, clipped to [0, 1])")
    ax.legend()
    if versus:
        ax = axes[1][0]
        others = [v for v in variants if "accuracy" in versus.get(v, {})]
        means = [versus[v]["accuracy"]["mean"] for v in others]
        errors = [versus[v]["accuracy"]["ci95"] for v in others]
        colors = ["tab:green" if m - e > 0 else "tab:red" if m + e < 0 else "tab:gray" for m, e in zip(means, errors)]
        ax.bar(range(len(others)), means, 0.6, yerr=errors, capsize=4, color=colors)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(others)), others, rotation=30, ha="right")
        ax.set_ylabel(f"accuracy minus {baseline} (paired, 95% CI)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_comparison(
    root: Path,
    per_seed: dict,
    variants: dict,
    seeds: list[int],
    metric: str = DEFAULT_METRIC,
    configurations: dict[str, str] | None = None,
) -> dict:
    """Write comparison.json (recording `configurations`, for `carried_arms`), comparison.md and comparison.png under
    `root`; return the summary."""
    summary = summarise_variants(per_seed)
    summary.update(seeds=seeds, ranked_by=metric)
    summary["configurations"] = {name: (configurations or {}).get(name) for name in per_seed}
    summary["per_seed"] = {v: {str(s): r for s, r in runs.items()} for v, runs in per_seed.items()}
    summary["descriptions"] = {name: variants[name].description for name in per_seed if name in variants}
    write_json(root / "comparison.json", summary)
    write_text(root / "comparison.md", markdown(summary, summary["descriptions"], seeds, metric))
    plot(summary, root / "comparison.png")
    return summary
