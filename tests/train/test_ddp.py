"""Two-process DDP on CPU (gloo) under `accelerate launch --multi_gpu`: both stages and the sharded evaluation,
outputs written once, the same accuracy as one process on the same checkpoint, and the same training (per-step
losses, final weights) as one process with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import DIVERGING_RATE, ROOT

SMALL = [
    "--max_train_samples", "128", "--max_eval_samples", "40", "--max_new_tokens", "40", "--use_cpu", "true",
    "--per_device_train_batch_size", "8", "--global_batch_size", "16",
    "--stages", "[{name: sft, loss_on: completion, num_train_epochs: 2}, {name: key, loss_on: key}]",
]  # fmt: skip


def accelerate(*args: str) -> subprocess.CompletedProcess:
    # One thread per process: two processes on two cores would otherwise oversubscribe the CPU badly
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "accelerate.commands.launch", *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)


@pytest.mark.e2e
def test_two_process_ddp_matches_one_process(tmp_path):
    out = tmp_path / "ddp"
    done = accelerate(
        "--config_file", str(ROOT / "accelerate_configs/multi_gpu.yaml"), "--num_processes", "2",
        str(ROOT / "recipes/run.py"), "--output_dir", str(out), *SMALL,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    results = json.loads((out / "results.json").read_text())
    for stage in ("sft", "key"):
        training = results["stages"][stage]["training"]
        assert training["world_size"] == 2
        assert training["global_batch_size"] == 16  # 8 per device x 2 processes x 1 accumulation step
    assert done.stdout.count("SFTKey results") == 1  # only the main process reports
    assert not list(out.rglob(".*.tmp-*"))  # no half-written files from a second writer
    predictions = [json.loads(line) for line in (out / "key" / "predictions.jsonl").read_text().splitlines()]
    assert sorted(p["index"] for p in predictions) == sorted({p["index"] for p in predictions})
    assert len(predictions) == results["stages"]["key"]["num_examples"] == 40  # both ranks' shards gathered

    single = accelerate(
        "--num_processes", "1", "--cpu", str(ROOT / "recipes/run.py"), "--output_dir", str(out),
        *SMALL, "--eval_only", "--checkpoint", str(out / "key"),
    )  # fmt: skip
    assert single.returncode == 0, single.stderr[-4000:]
    one_process = json.loads((out / "eval_only" / "key" / "metrics.json").read_text())
    two_process = results["stages"]["key"]
    for metric in ("accuracy", "format_accuracy", "num_examples", "mean_generated_tokens"):
        assert one_process[metric] == two_process[metric], metric


def logged_losses(stage_dir) -> list[tuple[int, float]]:
    """(step, training loss) for every logging step of a finished stage."""
    history = json.loads((stage_dir / "log_history.json").read_text())
    return [(entry["step"], entry["loss"]) for entry in history if "loss" in entry]


# Measured on CPU: per-step losses agree to 1.5e-7 relative, final weights to 2.2e-6 of each tensor's largest value
# (float32 rounding, grown by Adam over 8 steps). A wrong normaliser or data split moves losses by percents.
LOSS_RTOL = 1e-5
WEIGHT_TOL = 1e-4
ONE_EPOCH_EACH = (
    "[{name: sft, loss_on: completion, num_train_epochs: 1}, {name: key, loss_on: key, num_train_epochs: 1}]"
)


@pytest.mark.e2e
def test_two_process_training_matches_one_process(tmp_path):
    """Two processes (gloo) with `global_batch_size: 16` train like one process accumulating the same 16 examples.

    Accelerate shards each global batch by handing consecutive per-device batches of one seeded order to the ranks,
    so every optimizer step sees the same examples in both runs, only summed in another order (all-reduce vs
    accumulation). So the logged loss of every step must agree within `LOSS_RTOL` (relative, 1e-5) and every final
    weight within `WEIGHT_TOL` (1e-4) of its tensor's largest value: about 50x the measured float32 differences
    (1.5e-7 and 2.2e-6), far below what a normalisation or sharding bug changes.
    """
    from safetensors.torch import load_file

    args = ["--max_train_samples", "64", "--use_cpu", "true", "--eval_after_stages", "false",
            "--per_device_train_batch_size", "4", "--global_batch_size", "16", "--logging_steps", "1",
            "--save_strategy", "no", "--stages", ONE_EPOCH_EACH]  # fmt: skip
    two, one = tmp_path / "two", tmp_path / "one"
    done = accelerate("--config_file", str(ROOT / "accelerate_configs/multi_gpu.yaml"), "--num_processes", "2",
                      str(ROOT / "recipes/run.py"), "--output_dir", str(two), *args)  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    done = accelerate("--num_processes", "1", "--cpu", str(ROOT / "recipes/run.py"), "--output_dir", str(one), *args)
    assert done.returncode == 0, done.stderr[-4000:]
    results = [json.loads((run / "results.json").read_text())["stages"] for run in (two, one)]
    for stage in ("sft", "key"):
        training = [stages[stage]["training"] for stages in results]
        assert [t["world_size"] for t in training] == [2, 1]
        assert [t["global_batch_size"] for t in training] == [16, 16]
        assert training[0]["train_loss"] == pytest.approx(training[1]["train_loss"], rel=LOSS_RTOL)
        assert training[0]["train_tokens"] == training[1]["train_tokens"]
        two_losses, one_losses = logged_losses(two / stage), logged_losses(one / stage)
        assert [step for step, _ in two_losses] == [step for step, _ in one_losses] == [1, 2, 3, 4]
        for (step, loss_two), (_, loss_one) in zip(two_losses, one_losses):
            assert loss_two == pytest.approx(loss_one, rel=LOSS_RTOL), f"stage {stage}, step {step}"
        weights_two = load_file(two / stage / "model.safetensors")
        weights_one = load_file(one / stage / "model.safetensors")
        assert weights_two.keys() == weights_one.keys()
        for name, weight in weights_one.items():
            difference = (weights_two[name] - weight).abs().max().item()
            assert difference <= WEIGHT_TOL * weight.abs().max().item(), f"stage {stage}, {name}"


@pytest.mark.e2e
def test_a_stage_diverging_under_two_processes_stops_every_rank_at_the_same_step(tmp_path):
    """The verdict is one all-reduce per step, so every rank stops at the same step and none is left waiting in a
    collective (a hang would end in the launcher's timeout)."""
    args = ["--max_train_samples", "64", "--use_cpu", "true", "--eval_after_stages", "false",
            "--per_device_train_batch_size", "8", "--global_batch_size", "16", "--logging_steps", "1",
            "--save_strategy", "no", "--learning_rate", DIVERGING_RATE,
            "--stages", "[{name: sft, loss_on: completion, num_train_epochs: 2}]"]  # fmt: skip
    done = accelerate("--config_file", str(ROOT / "accelerate_configs/multi_gpu.yaml"), "--num_processes", "2",
                      str(ROOT / "recipes/run.py"), "--output_dir", str(tmp_path / "run"), *args)  # fmt: skip
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    # Each rank decides the same step; the launcher may end the second rank before it writes its line
    assert 1 <= len(lines) <= 2 and len(set(lines)) == 1, done.stderr[-4000:]
    assert lines[0].startswith("error: stage `sft` diverged at step ") and "--restart_from sft" in lines[0]
    assert not (tmp_path / "run" / "sft" / "model.safetensors").exists()
