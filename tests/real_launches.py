"""Real `accelerate launch` runs of recipes/run.py on CPU processes, shared by the engine tests (multi-node,
DeepSpeed): the shortened demo, the launcher, and the comparisons with one process; and one-process runs that are
killed and resumed (the reliability and invariance tests, and the adversarial suite's forked runs)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUN = str(ROOT / "recipes/run.py")
ONE_EPOCH_EACH = (
    "[{name: sft, loss_on: completion, num_train_epochs: 1}, {name: key, loss_on: key, num_train_epochs: 1}]"
)
# The demo recipe, shortened to 4 optimizer steps a stage (64 rows, global batch 16) and a 40-example evaluation
SHORT_DEMO = [
    "--max_train_samples", "64", "--max_eval_samples", "40", "--max_new_tokens", "40",
    "--per_device_train_batch_size", "4", "--global_batch_size", "16", "--logging_steps", "1",
    "--save_strategy", "no", "--bf16", "false",
    "--stages", ONE_EPOCH_EACH,
]  # fmt: skip
LORA = ("--use_peft", "true", "--lora_dropout", "0")  # dropout draws differ per rank; without it LoRA is exact
# As tests/train/test_ddp.py: float32 all-reduce vs accumulation moves losses by ~1e-7 relative and final weights by
# ~1e-6 of a tensor's largest value; a wrong normaliser or data split moves losses by percents
LOSS_RTOL = 1e-5
WEIGHT_TOL = 1e-4
EVAL_METRICS = ("accuracy", "format_accuracy", "num_examples", "mean_generated_tokens")


def launch_env() -> dict[str, str]:
    # One thread per process: two processes on two cores would otherwise oversubscribe the CPU badly
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def start_run(out: Path, args: list[str]) -> subprocess.Popen:
    """recipes/run.py through this interpreter (the demo recipe unless `args` name another), writing to `out`."""
    command = [sys.executable, RUN, "--output_dir", str(out), *args]
    pipes = {"stdout": subprocess.DEVNULL, "stderr": subprocess.PIPE, "text": True}
    return subprocess.Popen(command, env=launch_env(), cwd=ROOT, **pipes)


def run_to_end(out: Path, args: list[str]) -> str:
    """Run recipes/run.py to its end; it must succeed. Returns its stderr."""
    process = start_run(out, args)
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr[-3000:]
    return stderr


def kill_when(out: Path, ready: Callable[[Path], bool], args: list[str]) -> None:
    """Start recipes/run.py and SIGKILL it as soon as `ready(out)` holds (within 300 s); it must not end first."""
    process = start_run(out, args)
    deadline = time.time() + 300
    while not ready(out):
        assert process.poll() is None, "the run ended before the kill point"
        assert time.time() < deadline
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()


def run_as_program(argv: list[str], output_path: str) -> None:
    """`python recipes/run.py ARGV` in this process, as the program (its `__main__`, which exits), stdout and stderr
    appended to `output_path`, with one CPU thread as `launch_env` gives a launched process. The adversarial
    suite runs it in processes forked from a server that imported the package once (`multiprocessing`'s forkserver,
    preloading this module and `sftkey_trl.run.pipeline`): a launch then costs its run, not an import of torch,
    transformers and TRL (6-9 s on a 2-core machine)."""
    import runpy

    import torch

    output = os.open(output_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(output, 1)
    os.dup2(output, 2)
    sys.stdout, sys.stderr = open(1, "w", buffering=1, closefd=False), open(2, "w", buffering=1, closefd=False)
    os.environ.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    torch.set_num_threads(1)
    sys.argv = [RUN, *argv]
    runpy.run_path(RUN, run_name="__main__")


def accelerate(*args: str, timeout: int = 600, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`accelerate launch ARGS` through this interpreter (never a command found on PATH), with `env` added."""
    command = [sys.executable, "-m", "accelerate.commands.launch", *args]
    environment = {**launch_env(), **(env or {})}
    return subprocess.run(command, capture_output=True, text=True, env=environment, cwd=ROOT, timeout=timeout)


def one_process(output_dir: Path, *args: str) -> subprocess.CompletedProcess:
    """The reference: the same recipe in one CPU process."""
    done = accelerate("--num_processes", "1", "--cpu", RUN, "--output_dir", str(output_dir), *SHORT_DEMO,
                      "--use_cpu", "true", *args)  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def logged_losses(stage_dir: Path) -> list[tuple[int, float]]:
    """(step, training loss) for every logging step of a finished stage."""
    history = json.loads((stage_dir / "log_history.json").read_text())
    return [(entry["step"], entry["loss"]) for entry in history if "loss" in entry]


def stages(run: Path) -> dict:
    return json.loads((run / "results.json").read_text())["stages"]


def assert_trains_like_one_process(run: Path, reference: Path, world_size: int, weights: str) -> None:
    """Both stages: the same per-step losses (`LOSS_RTOL`) and final weights (`WEIGHT_TOL` of each tensor's
    largest value) as the one-process reference; `weights` names the saved file (model or adapter)."""
    from safetensors.torch import load_file

    results, expected = stages(run), stages(reference)
    for stage in ("sft", "key"):
        assert results[stage]["training"]["world_size"] == world_size
        assert results[stage]["training"]["global_batch_size"] == expected[stage]["training"]["global_batch_size"]
        losses, reference_losses = logged_losses(run / stage), logged_losses(reference / stage)
        assert [step for step, _ in losses] == [step for step, _ in reference_losses] == [1, 2, 3, 4]
        for (step, loss), (_, reference_loss) in zip(losses, reference_losses):
            assert loss == pytest.approx(reference_loss, rel=LOSS_RTOL), f"stage {stage}, step {step}"
        saved, reference_saved = load_file(run / stage / weights), load_file(reference / stage / weights)
        assert reference_saved.keys() <= saved.keys()
        for name in saved.keys() - reference_saved.keys():  # ZeRO-2 also writes the tied LM head: the same tensor
            assert name == "lm_head.weight" and (saved[name] == saved["model.embed_tokens.weight"]).all(), name
        for name, weight in reference_saved.items():
            difference = (saved[name] - weight).abs().max().item()
            assert difference <= WEIGHT_TOL * weight.abs().max().item(), f"stage {stage}, {name}"


def assert_evaluated_everything(run: Path, examples: int = 40) -> None:
    """Both stages evaluated on every example once (the ranks' shards gathered), written by one process."""
    results = stages(run)
    for stage in ("sft", "key"):
        assert results[stage]["num_examples"] == examples
        predictions = [json.loads(line) for line in (run / stage / "predictions.jsonl").read_text().splitlines()]
        assert sorted(p["index"] for p in predictions) == list(range(examples))
    assert not list(run.rglob(".*.tmp-*"))  # no half-written files from a second writer


@pytest.fixture(scope="session")
def reference_full(tmp_path_factory) -> Path:
    """The shortened demo, full fine-tuning, in one CPU process (no evaluation): shared by the engine tests."""
    run = tmp_path_factory.mktemp("one_process") / "full"
    one_process(run, "--eval_after_stages", "false")
    return run


@pytest.fixture(scope="session")
def reference_lora(tmp_path_factory) -> Path:
    """The same with LoRA (`lora_dropout: 0`)."""
    run = tmp_path_factory.mktemp("one_process") / "lora"
    one_process(run, *LORA, "--eval_after_stages", "false")
    return run
