"""Two-process DDP on CPU (gloo) under `accelerate launch --multi_gpu`: both stages and the sharded evaluation,
outputs written once, and the same accuracy as one process on the same checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT

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
