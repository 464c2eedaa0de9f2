"""Reruns on the real pipeline (tiny demo model, one CPU process): a rerun that now asks for evaluation evaluates the
finished stages; a keep_best stage with `save_total_limit: 1` killed between Trainer's deletion of the older
checkpoint and the callbacks' `on_save` resumes from the newer one, on the stage's own keep-best keys."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from safetensors.torch import load_file

TINY = [
    "--max_train_samples", "32", "--max_eval_samples", "8", "--max_new_tokens", "16", "--save_strategy", "no",
    "--stages", "[{name: sft, loss_on: completion, num_train_epochs: 1}, {name: key, loss_on: key}]",
]  # fmt: skip


def run(out: Path, args: list[str], kill_in_on_save_at: int | None = None) -> subprocess.CompletedProcess:
    """recipes/run.py's main in a fresh process; `kill_in_on_save_at`: die as keep_best's on_save of that step
    starts (Trainer has written the checkpoint and deleted the ones beyond `save_total_limit`)."""
    code = (
        "import os, sys\n"
        "from sftkey_trl.train import keep_best\n"
        "from sftkey_trl.run.cli import main\n"
        "original = keep_best.KeepBestCallback.on_save\n"
        "def on_save(self, args, state, control, **kwargs):\n"
        f"    if state.global_step == {kill_in_on_save_at}:\n"
        "        os._exit(9)\n"
        "    return original(self, args, state, control, **kwargs)\n"
        "keep_best.KeepBestCallback.on_save = on_save\n"
        "sys.argv = ['recipes/run.py', *sys.argv[1:]]\n"
        "sys.exit(main())\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-c", code, "--output_dir", str(out), *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)


@pytest.mark.e2e
def test_a_rerun_that_asks_for_evaluation_evaluates_the_finished_stages(tmp_path):
    out = tmp_path / "run"
    done = run(out, [*TINY, "--eval_after_stages", "false"])
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert not any("num_examples" in results["stages"][stage] for stage in ("sft", "key"))
    trained = {stage: (out / stage / "model.safetensors").stat().st_mtime_ns for stage in ("sft", "key")}
    done = run(out, [*TINY, "--eval_after_stages", "true"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count("is done but was not evaluated: evaluating it") == 2
    results = json.loads((out / "results.json").read_text())
    for stage in ("sft", "key"):
        assert results["stages"][stage]["num_examples"] == 8 and "accuracy" in results["stages"][stage]
        assert results["stages"][stage]["training"]["optimizer_steps"] > 0  # the training record stays
        assert len((out / stage / "predictions.jsonl").read_text().splitlines()) == 8
        assert (out / stage / "model.safetensors").stat().st_mtime_ns == trained[stage]  # not retrained


KEEP_BEST = [
    "--max_train_samples", "64", "--max_new_tokens", "16", "--eval_after_stages", "false", "--save_strategy", "steps",
    "--save_steps", "2", "--save_total_limit", "1", "--logging_steps", "2",
    "--stages", "[{name: sft, loss_on: completion, num_train_epochs: 2, keep_best: true, "
    "metric_for_best_model: format_accuracy, eval_steps: 0.25}]",
]  # fmt: skip


def keep_best_outcome(out: Path) -> tuple[dict, dict]:
    training = json.loads((out / "results.json").read_text())["stages"]["sft"]["training"]
    return training, load_file(out / "sft" / "model.safetensors")


@pytest.mark.e2e
def test_a_keep_best_stage_killed_after_checkpoint_rotation_resumes_to_the_uninterrupted_result(tmp_path):
    reference = tmp_path / "reference"
    done = run(reference, KEEP_BEST)
    assert done.returncode == 0, done.stderr[-3000:]
    expected, expected_weights = keep_best_outcome(reference)
    report = expected["keep_best"]
    # the stage's own keys: its metric, and eval_steps 0.25 of its steps (rounded up, as Trainer reads it)
    every = -(-expected["optimizer_steps"] // 4)
    assert report["metric"] == "format_accuracy" and "best_validation_format_accuracy" in report
    assert [step for step, _ in report["history"]] == sorted({*range(0, expected["optimizer_steps"], every),
                                                              expected["optimizer_steps"]})  # fmt: skip
    out = tmp_path / "killed"
    done = run(out, KEEP_BEST, kill_in_on_save_at=4)
    assert done.returncode == 9
    assert [p.name for p in (out / "sft" / "checkpoints").glob("checkpoint-*")] == ["checkpoint-4"]  # 2 deleted
    done = run(out, KEEP_BEST)
    assert done.returncode == 0, done.stderr[-3000:]
    training, weights = keep_best_outcome(out)
    assert training["resumed_from"] == str(out / "sft" / "checkpoints" / "checkpoint-4")
    assert training["keep_best"] == report
    for name, tensor in expected_weights.items():
        torch.testing.assert_close(weights[name], tensor, rtol=1e-5, atol=1e-6)
