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
    text = "\n".join(diagnose(summary))
    assert "`key` never beat `sft` on the validation split, so keep-best kept its incoming weights" in text
    assert "keep-best kept the incoming weights (step 0: never beaten) of `key` (validation accuracy 0.550)." in text
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
