"""Two CPU processes (gloo, 127.0.0.1) with rank 0's weight writes slowed down, as a multi-GB model's are: the other
rank must wait for the stage folder before it reads it (here: the next stage's start, with `eval_after_stages:
false`), instead of finding it half written."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT

# Put on PYTHONPATH of the launched processes: Python imports it at start-up, before transformers and peft bind
# `safetensors.torch.save_file`, so rank 0's every weight file is written SLOW_SAVE seconds late
SLOW_SAVE_SITECUSTOMIZE = """
import os
import time

if os.environ.get("RANK") == "0" and os.environ.get("SLOW_SAVE"):
    import safetensors.torch

    _save_file = safetensors.torch.save_file

    def save_file(tensors, filename, metadata=None):
        time.sleep(float(os.environ["SLOW_SAVE"]))
        return _save_file(tensors, filename, metadata)

    safetensors.torch.save_file = save_file
"""


@pytest.mark.e2e
def test_the_next_stage_waits_for_rank_0_to_write_the_previous_one(tmp_path):
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(SLOW_SAVE_SITECUSTOMIZE)
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": f"{hooks}{os.pathsep}{ROOT}", "OMP_NUM_THREADS": "1", "SLOW_SAVE": "6"}
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file",
        str(ROOT / "accelerate_configs/multi_gpu.yaml"), "--num_processes", "2", "--main_process_ip", "127.0.0.1",
        "--main_process_port", "0", str(ROOT / "recipes/run.py"), "--output_dir", str(out), "--use_cpu", "true",
        "--max_train_samples", "32", "--per_device_train_batch_size", "8", "--global_batch_size", "16",
        "--eval_after_stages", "false", "--save_strategy", "no",
        "--stages", "[{name: sft, loss_on: completion, num_train_epochs: 1}, {name: key, loss_on: key}]",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert [results["stages"][stage]["training"]["world_size"] for stage in ("sft", "key")] == [2, 2]
    manifest = json.loads((out / "manifest.json").read_text())
    assert [manifest["stages"][stage]["status"] for stage in ("sft", "key")] == ["done", "done"]
