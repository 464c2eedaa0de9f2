"""The paper's comparison done right: variants x seeds from one recipe, a compute-matched baseline, confidence
intervals and paired differences. Used by `recipes/compare.py`."""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from ..errors import SFTKeyError
from ..evaluation.metrics import REPORTED
from ..files import write_json, write_text
from ..train.objectives import Stage

logger = logging.getLogger(__name__)

METRICS = [metric.name for metric in REPORTED]
# Two-sided 95% Student-t critical values by degrees of freedom (beyond 30 the normal value is close enough)
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         12: 2.179, 15: 2.131, 20: 2.086, 25: 2.060, 30: 2.042}  # fmt: skip


@dataclass(frozen=True)
class Variant:
    """One arm of the comparison: a run folder, a response format, and the stages to run in it.

    Variants that share a folder share their first stage (the manifest skips it when it is already done), so
    `sft_tag`, `sftkey_tag` and its stage-2 options train stage 1 once per seed.
    """

    name: str
    folder: str
    response_format: str
    stages: tuple[Stage, ...]
    description: str


def build_variants(stages: list[Stage]) -> dict[str, Variant]:
    """Derive every variant from the recipe's first completion stage (stage 1) and first key stage (stage 2)."""
    first = next((s for s in stages if s.loss_on == "completion"), None)
    second = next((s for s in stages if s.loss_on == "key"), None)
    if first is None or second is None:
        raise SFTKeyError("compare.py needs a recipe with a `loss_on: completion` stage and a `loss_on: key` stage")
    epochs_1 = float(first.overrides.get("num_train_epochs", 3))
    epochs_2 = float(second.overrides.get("num_train_epochs", 3))
    sft = Stage(name="sft", loss_on="completion", overrides=dict(first.overrides))
    key = dataclasses.replace(second, name="key", overrides=dict(second.overrides))
    matched = Stage(name="sft", loss_on="completion",
                    overrides={**first.overrides, "num_train_epochs": epochs_1 + epochs_2})  # fmt: skip
    key_from_base = Stage(name="key", loss_on="key", overrides={**first.overrides, "num_train_epochs": epochs_2})
    norm = dataclasses.replace(key, name="key_norm", loss_normalization="completion_tokens", reasoning_weight=0.0)
    mix = dataclasses.replace(key, name="key_mix", loss_normalization="supervised_tokens", reasoning_weight=0.1)
    best = dataclasses.replace(key, name="key_best", keep_best=True)
    same_lr = {**second.overrides, "learning_rate": first.overrides.get("learning_rate", "inherit")}
    if same_lr["learning_rate"] == "inherit":  # stage 1 uses the recipe's rate: so does this key stage
        same_lr.pop("learning_rate")
    paper_lr = dataclasses.replace(key, name="key_stage1_lr", keep_best=False, overrides=same_lr)
    variants = [
        Variant("sft", "plain", "plain", (sft,), "plain format, whole response, stage 1 only"),
        Variant("sft_tag", "tags", "tags", (sft,), "tags, whole response, stage 1 only"),
        Variant("key_tag", "key_only", "tags", (key_from_base,), "tags, key loss only, from the base model"),
        Variant("sftkey_tag", "tags", "tags", (sft, key), "tags, stage 1 then the key stage (the paper)"),
        Variant("sft_tag_matched", "matched", "tags", (matched,),
                f"tags, whole response for {epochs_1 + epochs_2:g} epochs (compute-matched to sftkey_tag)"),
        Variant("sftkey_tag_norm", "tags", "tags", (sft, norm), "sftkey_tag, loss_normalization: completion_tokens"),
        Variant("sftkey_tag_mix", "tags", "tags", (sft, mix), "sftkey_tag with reasoning_weight: 0.1"),
        Variant("sftkey_tag_best", "tags", "tags", (sft, best), "sftkey_tag keeping the best checkpoint (keep_best)"),
        Variant("sftkey_tag_stage1_lr", "tags", "tags", (sft, paper_lr),
                "sftkey_tag with stage 1's learning rate in stage 2 (the paper's setting)"),
    ]  # fmt: skip
    return {variant.name: variant for variant in variants}


DEFAULT_VARIANTS = ["sft", "sft_tag", "key_tag", "sftkey_tag", "sft_tag_matched"]


def run_variant(variant: Variant, seed: int, script_args, training_args, model_args, root: Path) -> dict:
    """Train and evaluate one variant with one seed; return the metrics of its last stage."""
    from .pipeline import Pipeline

    script_args = copy.deepcopy(script_args)
    training_args = copy.deepcopy(training_args)
    script_args.response_format = variant.response_format
    training_args.seed = seed
    training_args.output_dir = str(root / f"seed{seed}" / variant.folder)
    training_args.restart_from = None
    stages = [copy.deepcopy(stage) for stage in variant.stages]
    results = Pipeline(script_args, training_args, model_args, stages).run()
    return results["stages"][stages[-1].name]


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and half-width of the two-sided 95% Student-t confidence interval (0 for a single value)."""
    n = len(values)
    average = statistics.fmean(values)
    if n < 2:
        return average, 0.0
    df = n - 1
    t = T_975[max(k for k in T_975 if k <= df)] if df <= 30 else 1.960  # a smaller df is the conservative side
    return average, t * statistics.stdev(values) / math.sqrt(n)


def paired(per_seed: dict[str, dict[int, dict]], a: str, b: str) -> dict:
    """Per metric: mean and 95% CI of `a - b` over the seeds both variants ran with (same seed, same data order)."""
    result = {}
    for metric in METRICS:
        seeds = [s for s in per_seed[a] if s in per_seed[b]
                 and per_seed[a][s].get(metric) is not None and per_seed[b][s].get(metric) is not None]  # fmt: skip
        if seeds:
            deltas = [per_seed[a][s][metric] - per_seed[b][s][metric] for s in seeds]
            mean, half = mean_ci(deltas)
            result[metric] = {"mean": mean, "ci95": half, "values": deltas}
    return result


def summarise_variants(per_seed: dict[str, dict[int, dict]], reference: str = "sftkey_tag",
              baseline: str = "sft_tag_matched") -> dict:  # fmt: skip
    """Mean and 95% CI per variant and metric; paired differences of `reference` minus every other variant, and
    of every variant minus the compute-matched `baseline` (does any form of the key stage beat it?)."""
    table = {}
    for variant, runs in per_seed.items():
        table[variant] = {}
        for metric in METRICS:
            values = [run[metric] for run in runs.values() if run.get(metric) is not None]
            if values:
                mean, half = mean_ci(values)
                table[variant][metric] = {"mean": mean, "ci95": half, "values": values}
    others = [v for v in per_seed if v != reference]
    differences = {v: paired(per_seed, reference, v) for v in others} if reference in per_seed else {}
    against = [v for v in per_seed if v != baseline]
    versus_baseline = {v: paired(per_seed, v, baseline) for v in against} if baseline in per_seed else {}
    return {"reference": reference, "baseline": baseline, "variants": table, "differences": differences,
            "versus_baseline": versus_baseline}  # fmt: skip


def _difference_table(title: str, rows: dict, metrics: list[str], several_seeds: bool) -> list[str]:
    lines = ["", title, "", "| variant | " + " | ".join(metrics) + " |", "| --- " * (len(metrics) + 1) + "|"]
    for other, row in rows.items():
        cells = []
        for m in metrics:
            if m not in row:
                cells.append("-")
                continue
            mean, half = row[m]["mean"], row[m]["ci95"]
            cells.append(f"{mean:+.3f} ± {half:.3f}{' *' if abs(mean) > half and several_seeds else ''}")
        lines.append(f"| {other} | " + " | ".join(cells) + " |")
    return lines


def markdown(summary: dict, descriptions: dict[str, str], seeds: list[int]) -> str:
    """The comparison as Markdown tables: mean ± 95% CI per variant, then the paired differences."""
    metrics = [m for m in METRICS if any(m in row for row in summary["variants"].values())]
    lines = [f"## Variants ({len(seeds)} seeds: {', '.join(map(str, seeds))}; mean ± 95% CI)", ""]
    lines.append("| variant | " + " | ".join(metrics) + " | what it is |")
    lines.append("| --- " * (len(metrics) + 2) + "|")
    for variant, row in summary["variants"].items():
        cells = [f"{row[m]['mean']:.3f} ± {row[m]['ci95']:.3f}" if m in row else "-" for m in metrics]
        lines.append(f"| {variant} | " + " | ".join(cells) + f" | {descriptions.get(variant, '')} |")
    several = len(seeds) > 1
    if summary["differences"]:
        title = f"## Paired difference: {summary['reference']} minus each variant (same seed; 95% CI)"
        lines += _difference_table(title, summary["differences"], metrics, several)
    if summary.get("versus_baseline"):
        title = f"## Paired difference: each variant minus {summary['baseline']}, the compute-matched baseline"
        lines += _difference_table(title, summary["versus_baseline"], metrics, several)
    if summary["differences"] or summary.get("versus_baseline"):
        lines += ["", "`*`: the interval excludes zero."]
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: Path) -> None:
    """Bar chart of accuracy and format accuracy per variant with 95% CI error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = list(summary["variants"])
    fig, ax = plt.subplots(figsize=(1.6 * len(variants) + 2, 4))
    width = 0.38
    for offset, metric in ((-width / 2, "accuracy"), (width / 2, "format_accuracy")):
        means = [summary["variants"][v].get(metric, {}).get("mean", 0) for v in variants]
        errors = [summary["variants"][v].get(metric, {}).get("ci95", 0) for v in variants]
        clipped = [[min(e, m) for m, e in zip(means, errors)], [min(e, 1 - m) for m, e in zip(means, errors)]]
        ax.bar([i + offset for i in range(len(variants))], means, width, yerr=clipped, capsize=4, label=metric)
    ax.set_xticks(range(len(variants)), variants, rotation=20, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("mean over seeds (95% CI, clipped to [0, 1])")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_comparison(root: Path, per_seed: dict, variants: dict[str, Variant], seeds: list[int]) -> dict:
    """Write comparison.json, comparison.md and comparison.png under `root`; return the summary."""
    summary = summarise_variants(per_seed)
    summary["seeds"] = seeds
    summary["per_seed"] = {v: {str(s): r for s, r in runs.items()} for v, runs in per_seed.items()}
    write_json(root / "comparison.json", summary)
    descriptions = {name: variant.description for name, variant in variants.items()}
    write_text(root / "comparison.md", markdown(summary, descriptions, seeds))
    plot(summary, root / "comparison.png")
    return summary
