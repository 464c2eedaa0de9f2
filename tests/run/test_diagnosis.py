"""The summary read back after the results table names each failure mode from the measured numbers."""

from __future__ import annotations

from sftkey_trl.run.diagnosis import diagnose

BASE = {"num_examples": 200, "accuracy": 0.60, "format_accuracy": 1.0, "composite": 0.72,
        "reasoning_final_accuracy": 0.60, "answer_reasoning_consistency": 0.98,
        "reasoning_reference_accuracy": 0.60}  # fmt: skip


def results(**key_stage) -> dict:
    return {"stages": {"sft": dict(BASE), "key": {**BASE, **key_stage}}}


def text(**key_stage) -> str:
    return "\n".join(diagnose(results(**key_stage)))


def test_format_erosion() -> None:
    summary = text(format_accuracy=0.66, accuracy=0.40)
    assert "`key` against `sft`: accuracy -0.200, format accuracy -0.340" in summary
    assert "`key` shows format erosion" in summary and "keep_best: true" in summary
    assert "reasoning erosion" not in summary and "no longer follow" not in summary


def test_reasoning_erosion_is_named_once() -> None:
    summary = text(reasoning_reference_accuracy=0.45, reasoning_final_accuracy=0.45, accuracy=0.50)
    assert summary.count("reasoning erosion") == 1 and "reasoning_weight: 0.1" in summary
    assert "format erosion" not in summary


def test_answers_no_longer_following_the_reasoning() -> None:
    summary = text(answer_reasoning_consistency=0.70, accuracy=0.45)
    assert "`key` shows answers no longer follow the reasoning" in summary
    assert "erosion" not in summary


def test_improvement_asks_for_the_continuation_baseline() -> None:
    summary = text(accuracy=0.70, composite=0.79)
    assert "`key` improved accuracy, with no sign of format or reasoning erosion" in summary
    assert "sft_continue" in summary and "--seeds 3" in summary


def test_a_change_within_noise_is_not_read_as_one() -> None:
    summary = text(accuracy=0.61, format_accuracy=0.99)
    assert "accuracy +0.010" in summary and "changed nothing measurable" in summary and "key_loss" in summary


def test_keep_best_says_what_it_kept() -> None:
    kept = {"best_step": 0, "best_validation_accuracy": 0.55, "kept": "the incoming weights (step 0: never beaten)"}
    summary = results()
    summary["stages"]["key"]["training"] = {"keep_best": kept}
    lines = diagnose(summary)
    text = "\n".join(lines)
    assert (
        "`key` never beat `sft` on the validation split (validation accuracy 0.550), so keep-best kept its incoming "
        "weights: the `key` column is `sft`'s model." in lines
    )
    assert text.count("kept") == 1 and text.count("0.550") == 1  # said once, not twice in other words
    assert "key_weight: 5" in text and "changed nothing" not in text


def test_keep_best_that_kept_a_later_step_is_reported_with_the_change() -> None:
    summary = results(format_accuracy=0.80)
    summary["stages"]["key"]["training"] = {"keep_best": {"best_step": 40, "kept": "step 40"}}
    text = "\n".join(diagnose(summary))
    assert "format erosion" in text and "keep-best kept step 40 of `key`." in text


def test_one_stage_or_no_metrics_says_nothing_false() -> None:
    assert diagnose({"stages": {"sft": dict(BASE)}}) == []
    assert diagnose({"stages": {}}) == []
    assert diagnose({"stages": {"sft": {"training": {}}, "key": {"training": {}}}}) == []


def stage_one(**changes) -> dict:
    """A two-stage run whose stage 1 ended with `changes`, and whose key stage kept its incoming weights."""
    summary = results(**changes)
    summary["stages"]["sft"].update(changes)
    summary["stages"]["key"]["training"] = {"keep_best": {"best_step": 0, "kept": "the incoming weights"}}
    return summary


def advice_order(lines: list[str]) -> tuple[int, int]:
    """(the first line about stage 1, the first key-stage advice)."""
    first = next(i for i, line in enumerate(lines) if line.startswith("Stage 1 (`sft`)"))
    later = [i for i, line in enumerate(lines) if "`key`" in line or "key_weight: 5" in line]
    return first, min(later)


def test_a_stage_1_that_learned_no_format_is_named_first_and_key_stage_advice_waits() -> None:
    lines = diagnose(stage_one(format_accuracy=0.0, accuracy=0.0, composite=0.0))
    first, later = advice_order(lines)
    assert first == 0 < later
    assert lines[0].startswith("Stage 1 (`sft`) did not learn the response format: format accuracy 0.000 (n = 200).")
    assert "--inspect 3" in lines[0] and "max_new_tokens" in lines[0]
    text = "\n".join(lines)
    assert "key_weight: 5" not in text and "context: detached" not in text and "Next:" not in text.split("\n", 1)[1]


def test_a_stage_1_at_the_untrained_models_accuracy_is_named_first() -> None:
    summary = stage_one(accuracy=0.12)
    summary["base"] = {**BASE, "accuracy": 0.11, "format_accuracy": 0.0}
    lines = diagnose(summary)
    assert lines[0].startswith("Stage 1 (`sft`) left accuracy at the untrained model's level: 0.110 -> 0.120")
    assert "key_weight: 5" not in "\n".join(lines)
    summary["base"]["accuracy"] = 0.05  # 0.05 -> 0.12 on 200 examples: above the untrained level
    assert not diagnose(summary)[0].startswith("Stage 1")


def test_a_stage_1_with_no_right_answer_and_no_base_evaluation_is_at_the_untrained_level() -> None:
    lines = diagnose(stage_one(accuracy=0.0))
    assert lines[0].startswith("Stage 1 (`sft`) answers none of the 200 test examples correctly")
    summary = stage_one(accuracy=0.0)
    summary["answer_type"] = "multiple_choice"  # chance is not zero there: no claim without the base model's score
    assert not diagnose(summary)[0].startswith("Stage 1")


def test_a_stage_1_still_rising_at_its_last_evaluation_is_told_to_train_longer_before_the_key_stage_advice() -> None:
    summary = stage_one()
    history = [[0, 0.1], [10, 0.3], [20, 0.5]]
    summary["stages"]["sft"]["training"] = {"keep_best": {"best_step": 20, "kept": "the final weights (step 20)",
                                                          "metric": "accuracy", "history": history}}  # fmt: skip
    lines = diagnose(summary)
    first, later = advice_order(lines)
    assert (
        first == 0 < later
        and "still improving at its last evaluation (validation accuracy 0.300 -> 0.500)" in lines[0]
    )
    assert "key_weight: 5" in "\n".join(lines)  # stage 1 works: the key stage's advice follows
    summary["stages"]["sft"]["training"]["keep_best"]["history"] = [[0, 0.1], [10, 0.5], [20, 0.5]]
    assert not diagnose(summary)[0].startswith("Stage 1")  # level at the end: converged


def test_a_healthy_stage_1_gets_no_stage_1_line() -> None:
    assert not any(line.startswith("Stage 1") for line in diagnose(stage_one()))


def test_each_stage_is_read_against_the_stage_it_started_from() -> None:
    """compare.py's arms share a folder: `continue` is recorded after `key` but started from `sft`, so it is read
    against `sft` (a record without `started_from` keeps the order)."""
    stages = {
        "sft": dict(BASE),
        "key": {**BASE, "started_from": "sft", "format_accuracy": 0.5},
        "continue": {**BASE, "started_from": "sft", "accuracy": 0.70},
    }
    summary = "\n".join(diagnose({"stages": stages}))
    assert "`continue` against `sft`: accuracy +0.100, format accuracy +0.000" in summary
    assert "`continue` against `key`" not in summary
    assert "`key` against `sft`" in summary
