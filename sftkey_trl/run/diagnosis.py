"""The results read back in words (`diagnose`, for the terminal, `results.json` and the card): what each later stage
changed, the failure mode it matches, what keep-best kept, and the guide's next step."""

from __future__ import annotations

from dataclasses import dataclass

from ..evaluation.metrics import METRICS

# A change smaller than this (or than two standard errors of the difference on n examples) is not read as one
MIN_CHANGE = 0.02


@dataclass(frozen=True)
class FailureMode:
    """A diagnostic metric whose drop names a known way for a later stage to go wrong, and the guide's remedy."""

    metric: str
    name: str
    remedy: str


FAILURE_MODES = [
    FailureMode("format_accuracy", "format erosion (the Key-Tag failure mode: the trained format is being lost)",
                "lower the stage's learning_rate or epochs and keep `keep_best: true` on a validation split"),
    FailureMode("reasoning_reference_accuracy", "reasoning erosion (the reasoning misses the reference's value)",
                "lower the learning rate or add `reasoning_weight: 0.1`; or emphasise the answer in stage 1 instead "
                "(`key_weight: 5`, README: Guide)"),
    FailureMode("reasoning_final_accuracy", "reasoning erosion (the reasoning no longer reaches the gold answer)",
                "lower the learning rate or add `reasoning_weight: 0.1`; or emphasise the answer in stage 1 instead "
                "(`key_weight: 5`, README: Guide)"),
    FailureMode("answer_reasoning_consistency", "answers no longer follow the reasoning",
                "the stage trains answers apart from their reasoning: lower its rate, add `reasoning_weight`, or stop "
                "after stage 1"),
]  # fmt: skip
NEXT_WITHOUT_EROSION = {
    "rose": "Next: check the gain against `sft_continue` (the same steps of stage 1's objective) with 3-5 seeds: "
    "`python recipes/compare.py --config <recipe> --seeds 3` (README: Guide).",
    "kept_incoming": "emphasise the answer in stage 1 instead (`key_weight: 5` in the completion stage), or run "
    "the key stage with `context: detached` or `reasoning_weight: 0.1` (README: Guide).",
    "flat": "Next: compare `key_loss` with `reasoning_loss` at the end of stage 1: a key loss not far above it leaves "
    "a key stage nothing to do (README: Guide).",
}
# The reported scores and the failure modes' diagnostics, each once, in METRICS' order
COMPARED = [m for m in METRICS if m.higher_is_better and (m.reported or m.name in {f.metric for f in FAILURE_MODES})]


def _noticeable(change: float, before: float, after: float, examples: int) -> bool:
    spread = 2 * ((before * (1 - before) + after * (1 - after)) / max(examples, 1)) ** 0.5
    return abs(change) >= max(MIN_CHANGE, spread)


def _kept(name: str, stage: dict) -> str | None:
    keep_best = (stage.get("training") or {}).get("keep_best")
    if not keep_best:
        return None
    best = {k.removeprefix("best_validation_"): v for k, v in keep_best.items() if k.startswith("best_validation_")}
    scores = [f"{metric} {value:.3f}" for metric, value in best.items() if isinstance(value, float)]
    score = f" (validation {scores[0]})" if scores else ""
    return f"keep-best kept {keep_best.get('kept', 'step ' + str(keep_best.get('best_step')))} of `{name}`{score}."


def diagnose(results: dict) -> list[str]:
    """Plain sentences on the measured results: each stage against the one before it, with signs; the failure mode a
    drop matches (or that none did); what keep-best kept; the guide's next step."""
    stages = list((results.get("stages") or {}).items())
    lines = [kept for name, stage in stages[:1] if (kept := _kept(name, stage))]
    for (before_name, before), (name, after) in zip(stages, stages[1:]):
        examples = int(after.get("num_examples") or 0)
        changes, dropped, rose = [], [], []
        for metric in COMPARED:
            old, new = before.get(metric.name), after.get(metric.name)
            if not isinstance(old, float | int) or not isinstance(new, float | int):
                continue
            change = new - old
            changes.append(f"{metric.name.replace('_', ' ')} {change:+.3f}")
            if _noticeable(change, old, new, examples):
                (rose if change > 0 else dropped).append(metric.name)
        if not changes:
            continue
        lines.append(f"`{name}` against `{before_name}`: " + ", ".join(changes) + f" (n = {examples}).")
        modes = list({mode.remedy: mode for mode in reversed(FAILURE_MODES) if mode.metric in dropped}.values())[::-1]
        for mode in modes:
            lines.append(f"`{name}` shows {mode.name}. Next: {mode.remedy}.")
        keep_best = (after.get("training") or {}).get("keep_best") or {}
        if keep_best.get("best_step") == 0:  # the stage's own weights never beat the ones it started from
            column = f"the `{name}` column is `{before_name}`'s model"
            beat = f"`{name}` never beat `{before_name}` on the validation split"
            lines.append(f"{beat}, so keep-best kept its incoming weights: {column}. {_kept(name, after)}")
            lines.append(f"Next: {NEXT_WITHOUT_EROSION['kept_incoming']}")
            continue
        if not modes:
            verdict = "lowered accuracy" if "accuracy" in dropped else "changed nothing measurable"
            verdict = "improved accuracy" if "accuracy" in rose else verdict
            lines.append(f"`{name}` {verdict}, with no sign of format or reasoning erosion.")
        if kept := _kept(name, after):
            lines.append(kept)
        if not modes:
            lines.append(NEXT_WITHOUT_EROSION["rose" if "accuracy" in rose else "flat"])
    return lines
