"""The results read back in words (`diagnose`, for the terminal, `results.json` and the card): first whether stage 1
worked (learned the format, rose above the untrained model, or was still rising when it stopped), then what each
later stage changed, the failure mode it matches, what keep-best kept, and the guide's next step, each said once."""

from __future__ import annotations

from dataclasses import dataclass

from ..evaluation.metrics import METRICS

# A change smaller than this (or than two standard errors of the difference on n examples) is not read as one
MIN_CHANGE = 0.02
FORMAT_LEARNED = 0.5  # stage 1's format accuracy below this: it has not learned the response format
STAGE_1_REMEDY = (
    "train stage 1 longer (`num_train_epochs`) or at a higher `learning_rate`, check with `--inspect 3` that it "
    "supervises the whole response, and check that `max_new_tokens` leaves room for a whole response"
)
WAIT_FOR_STAGE_1 = "Advice on the later stages waits until stage 1 works: they start from its weights."


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
                "(`key_weight: 5`, docs/results.md: Guide)"),
    FailureMode("reasoning_final_accuracy", "reasoning erosion (the reasoning no longer reaches the gold answer)",
                "lower the learning rate or add `reasoning_weight: 0.1`; or emphasise the answer in stage 1 instead "
                "(`key_weight: 5`, docs/results.md: Guide)"),
    FailureMode("answer_reasoning_consistency", "answers no longer follow the reasoning",
                "the stage trains answers apart from their reasoning: lower its rate, add `reasoning_weight`, or stop "
                "after stage 1"),
]  # fmt: skip
NEXT_WITHOUT_EROSION = {
    "rose": "Next: check the gain against `sft_continue` (the same steps of stage 1's objective) with 3-5 seeds: "
    "`python recipes/compare.py --config <recipe> --seeds 3` (docs/results.md: Guide).",
    "kept_incoming": "emphasise the answer in stage 1 instead (`key_weight: 5` in the completion stage), or run "
    "the key stage with `context: detached` or `reasoning_weight: 0.1` (docs/results.md: Guide).",
    "flat": "Next: compare `key_loss` with `reasoning_loss` at the end of stage 1: a key loss not far above it leaves "
    "a key stage nothing to do (docs/results.md: Guide).",
}
# The reported scores and the failure modes' diagnostics, each once, in METRICS' order
COMPARED = [m for m in METRICS if m.higher_is_better and (m.reported or m.name in {f.metric for f in FAILURE_MODES})]


def _noticeable(change: float, before: float, after: float, examples: int) -> bool:
    spread = 2 * ((before * (1 - before) + after * (1 - after)) / max(examples, 1)) ** 0.5
    return abs(change) >= max(MIN_CHANGE, spread)


def _validation_score(keep_best: dict) -> str:
    """` (validation accuracy 0.550)`: the kept weights' validation score, or nothing when none was recorded."""
    best = {k.removeprefix("best_validation_"): v for k, v in keep_best.items() if k.startswith("best_validation_")}
    scores = [f"{metric} {value:.3f}" for metric, value in best.items() if isinstance(value, float)]
    return f" (validation {scores[0]})" if scores else ""


def _kept(name: str, stage: dict) -> str | None:
    keep_best = (stage.get("training") or {}).get("keep_best")
    if not keep_best:
        return None
    kept = keep_best.get("kept", "step " + str(keep_best.get("best_step")))
    return f"keep-best kept {kept} of `{name}`{_validation_score(keep_best)}."


def _stage_one(name: str, stage: dict, base: dict | None, answer_type: str | None) -> tuple[list[str], bool]:
    """What went wrong in stage 1, with the advice for it: (lines, whether later stages' advice must wait)."""
    examples = int(stage.get("num_examples") or 0)
    formatted, accuracy = stage.get("format_accuracy"), stage.get("accuracy")
    if isinstance(formatted, float | int) and formatted < FORMAT_LEARNED:
        return [
            f"Stage 1 (`{name}`) did not learn the response format: format accuracy {formatted:.3f} (n = {examples}). "
            f"Next: {STAGE_1_REMEDY}. {WAIT_FOR_STAGE_1}"
        ], True
    untrained = (base or {}).get("accuracy")
    if isinstance(accuracy, float | int) and isinstance(untrained, float | int):
        if not (accuracy > untrained and _noticeable(accuracy - untrained, untrained, accuracy, examples)):
            return [
                f"Stage 1 (`{name}`) left accuracy at the untrained model's level: {untrained:.3f} -> {accuracy:.3f} "
                f"(n = {examples}). Next: {STAGE_1_REMEDY}. {WAIT_FOR_STAGE_1}"
            ], True
    elif accuracy == 0 and examples and answer_type != "multiple_choice":
        return [
            f"Stage 1 (`{name}`) answers none of the {examples} test examples correctly, as an untrained model would. "
            f"Next: {STAGE_1_REMEDY} (`eval_base: true` shows the untrained level). {WAIT_FOR_STAGE_1}"
        ], True
    keep_best = (stage.get("training") or {}).get("keep_best") or {}
    history = [score for _, score in keep_best.get("history") or []]
    if len(history) >= 2 and history[-1] > history[-2] and not keep_best.get("stopped_early"):
        metric = keep_best.get("metric", "accuracy")
        return [
            f"Stage 1 (`{name}`) was still improving at its last evaluation (validation {metric} {history[-2]:.3f} -> "
            f"{history[-1]:.3f}). Next: train it longer, or to convergence (`keep_best: true` with `patience`, "
            "docs/results.md: Guide), before reading what a later stage adds."
        ], False
    return [], False


def _pairs(results: dict, stages: list[tuple[str, dict]]) -> list[tuple[str, dict, str, dict]]:
    """(before's name, before, name, stage) for each stage after the first: the stage against the one it started from
    (`started_from`; compare.py's arms share a folder, so `continue` follows `key` there but started from `sft`), or,
    in a record without it, against the stage before it."""
    pairs = []
    for index, (name, stage) in enumerate(stages[1:], start=1):
        origin = stage.get("started_from")
        if origin == "base":
            if "base" in results:
                pairs.append(("base", results["base"], name, stage))
            continue
        before_name = origin if origin in results["stages"] else stages[index - 1][0]
        pairs.append((before_name, results["stages"][before_name], name, stage))
    return pairs


def diagnose(results: dict) -> list[str]:
    """Plain sentences on the measured results: stage 1's own state first (with its advice), then each stage against
    the one before it, with signs; the failure mode a drop matches (or that none did); what keep-best kept; the
    guide's next step (left out while stage 1 has not worked)."""
    stages = list((results.get("stages") or {}).items())
    lines, wait = [], False
    for name, stage in stages[:1]:
        lines, wait = _stage_one(name, stage, results.get("base"), results.get("answer_type"))
        lines += [kept] if (kept := _kept(name, stage)) else []
    for before_name, before, name, after in _pairs(results, stages):
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
            lines.append(f"`{name}` shows {mode.name}." + ("" if wait else f" Next: {mode.remedy}."))
        keep_best = (after.get("training") or {}).get("keep_best") or {}
        if keep_best.get("best_step") == 0:  # the stage's own weights never beat the ones it started from
            score = _validation_score(keep_best)
            lines.append(
                f"`{name}` never beat `{before_name}` on the validation split{score}, so keep-best kept its incoming "
                f"weights: the `{name}` column is `{before_name}`'s model."
            )
            lines += [] if wait else [f"Next: {NEXT_WITHOUT_EROSION['kept_incoming']}"]
            continue
        if not modes:
            verdict = "lowered accuracy" if "accuracy" in dropped else "changed nothing measurable"
            verdict = "improved accuracy" if "accuracy" in rose else verdict
            lines.append(f"`{name}` {verdict}, with no sign of format or reasoning erosion.")
        if kept := _kept(name, after):
            lines.append(kept)
        if not modes and not wait:
            lines.append(NEXT_WITHOUT_EROSION["rose" if "accuracy" in rose else "flat"])
    return lines
