"""Two machines for real: scripts/multinode.sh started twice on this one machine, as machine ranks 0 and 1 of a
two-machine job (gloo over 127.0.0.1, one CPU process per "machine"), runs the shortened demo through both stages
and the evaluation, and trains and evaluates exactly like one process."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from real_launches import (
    EVAL_METRICS,
    ROOT,
    RUN,
    SHORT_DEMO,
    accelerate,
    assert_evaluated_everything,
    assert_trains_like_one_process,
    free_port,
    launch_env,
)

SCRIPT = ROOT / "scripts" / "multinode.sh"


def two_machines(output_dir, *recipe_flags: str) -> list[subprocess.CompletedProcess]:
    """scripts/multinode.sh as machine 0 and machine 1 (each its own `accelerate launch`), both on 127.0.0.1."""
    port = str(free_port())
    machines = []
    for rank in ("0", "1"):
        env = {**launch_env(), "PYTHON": sys.executable, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
               "MACHINE_RANK": rank, "NUM_MACHINES": "2", "PROCESSES_PER_MACHINE": "1"}  # fmt: skip
        command = ["bash", str(SCRIPT), "--output_dir", str(output_dir), *recipe_flags]
        machines.append(subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                         text=True))  # fmt: skip
    done = []
    for machine in machines:
        stdout, stderr = machine.communicate(timeout=600)
        done.append(subprocess.CompletedProcess(machine.args, machine.returncode, stdout, stderr))
    return done


@pytest.mark.e2e
@pytest.mark.distributed
def test_two_machines_train_and_evaluate_like_one_process(reference_full, tmp_path):
    run = tmp_path / "two_machines"
    machines = two_machines(run, *SHORT_DEMO, "--use_cpu", "true")
    for rank, done in enumerate(machines):
        assert done.returncode == 0, f"machine {rank}: {done.stderr[-4000:]}"
    assert "machine 1/2: main 127.0.0.1" in machines[1].stdout
    # Only the main process (machine 0) reports and writes; machine 1 trained its half of every batch
    assert [done.stdout.count("SFTKey results") for done in machines] == [1, 0]
    assert_evaluated_everything(run)
    assert_trains_like_one_process(run, reference_full, world_size=2, weights="model.safetensors")
    # The sharded, gathered evaluation scores as one process on the same checkpoint
    single = accelerate("--num_processes", "1", "--cpu", RUN, "--output_dir", str(run), *SHORT_DEMO,
                        "--use_cpu", "true", "--eval_only", "--checkpoint", str(run / "key"))  # fmt: skip
    assert single.returncode == 0, single.stderr[-4000:]
    one = json.loads((run / "eval_only" / "key" / "metrics.json").read_text())
    two = json.loads((run / "results.json").read_text())["stages"]["key"]
    for metric in EVAL_METRICS:
        assert one[metric] == two[metric], metric
