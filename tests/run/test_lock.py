"""One run per output folder (issue 38): two runs started together into one folder, one runs and the other is
refused in one line; a run, `--eval_only` and `--merge` into a busy folder are refused before they write; a crashed
run's lock is taken over; a launch's other ranks follow its main process, and are never refused by their own lock."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

from sftkey_trl.run.cli import main

LOCK = ".sftkey.lock"
STAGES = "[{name: sft, loss_on: completion, num_train_epochs: 1}, {name: key, loss_on: key, num_train_epochs: 1}]"
TINY = [
    "--max_train_samples", "16", "--max_eval_samples", "2", "--max_new_tokens", "4", "--eval_fraction", "0",
    "--eval_after_stages", "false", "--save_strategy", "no", "--per_device_train_batch_size", "8", "--stages", STAGES,
]  # fmt: skip
BUSY = r"error: {out} is in use by another run \(process {pid} on {host}, since [^)]*\): {fix}"


def hold(folder: Path, pid: int | None = None, host: str | None = None, kernel_lock: bool = True):
    """Hold `folder`'s lock as another run does: the file, its record and (`kernel_lock`) the flock on it."""
    folder.mkdir(parents=True, exist_ok=True)
    handle = open(folder / LOCK, "a+")
    if kernel_lock:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    record = {"kind": "lock", "pid": pid or os.getpid(), "host": host or socket.gethostname(), "started": "then"}
    handle.truncate(0)
    handle.write(json.dumps(record))
    handle.flush()
    return handle


def status(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exit_:
        return exit_.code


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


@pytest.mark.e2e
def test_two_runs_started_together_one_runs_and_the_other_is_refused_in_one_line(tmp_path):
    """Before the fix both exited 0, the second resuming from the first's checkpoint while it still trained."""
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(ROOT / "recipes/run.py"), "--output_dir", str(out), *TINY]
    started = [subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env,
                                cwd=ROOT) for _ in range(2)]  # fmt: skip
    done = [(process.wait(timeout=600), process.stderr.read()) for process in started]
    assert sorted(code for code, _ in done) == [0, 2], [err[-2000:] for _, err in done]
    refused = next(err for code, err in done if code == 2)
    errors = [line for line in refused.splitlines() if line.startswith("error: ")]
    holder = started[[code for code, _ in done].index(0)].pid
    fix = "wait for it to end, or use another output_dir"
    assert len(errors) == 1 and re.fullmatch(BUSY.format(out=out, pid=holder, host=socket.gethostname(), fix=fix),
                                             errors[0]), refused[-2000:]  # fmt: skip
    assert "Traceback" not in refused
    manifest = json.loads((out / "manifest.json").read_text())
    assert [manifest["stages"][stage]["status"] for stage in ("sft", "key")] == ["done", "done"]
    assert not (out / LOCK).exists()  # released at exit


def fake_stage(folder: Path) -> None:
    """A saved LoRA stage, as far as `--merge`'s checks read it."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text("{}")
    save_file({"x": torch.zeros(1)}, str(folder / "adapter_model.safetensors"))


@pytest.mark.parametrize("operation", ["run", "eval_only", "merge"])
def test_a_busy_folder_refuses_a_run_an_evaluation_and_a_merge_before_they_write(operation, tmp_path, capsys):
    """`--eval_only` writes predictions into the output folder and `--merge` reads stage folders a run may replace:
    both wait for the folder as a run does."""
    out = tmp_path / "run"
    handle = hold(out, pid=4242, host="elsewhere")
    extra = {"run": [], "eval_only": ["--eval_only"], "merge": ["--merge", "sft", "--merge_dir", str(tmp_path / "m")]}
    if operation == "merge":
        fake_stage(out / "sft")
    before = sorted(str(p) for p in out.rglob("*"))
    try:
        assert status(["--output_dir", str(out), *TINY, "--use_peft", "true", *extra[operation]]) == 2
    finally:
        handle.close()
    fix = {
        "run": "wait for it to end, or use another output_dir",
        "eval_only": r"wait for it to end, or pass another --output_dir \(the --checkpoint folder can stay where .*\)",
        "merge": "wait for the run to end, then merge",
    }[operation]
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.fullmatch(BUSY.format(out=out, pid=4242, host="elsewhere", fix=fix), error), error
    assert sorted(str(p) for p in out.rglob("*")) == before and not (tmp_path / "m").exists()


@pytest.mark.e2e
def test_the_lock_of_a_run_that_died_is_taken_over_with_a_line(tmp_path, caplog):
    out, pid = tmp_path / "run", dead_pid()
    hold(out, pid=pid, kernel_lock=False).close()  # a run killed with its lock file in place
    assert status(["--output_dir", str(out), *TINY, "--eval_only", "--max_eval_samples", "2"]) == 0
    said = [r.getMessage() for r in caplog.records if "taking over" in r.getMessage()]
    assert said == [f"{out}: taking over the lock of process {pid} on {socket.gethostname()}, which ended without it"]
    assert not (out / LOCK).exists()


def test_without_flock_the_holders_record_decides(tmp_path, monkeypatch):
    """On a filesystem without `flock` (faked: it fails with ENOLCK), a live holder on this host or any holder on
    another host keeps the folder; a dead one on this host is stale."""
    from sftkey_trl.errors import SFTKeyError
    from sftkey_trl.run.lock import FolderLock

    def no_flock(*args):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        for pid, host, hint in [(live.pid, None, ""), (4242, "elsewhere", "; if that run has ended, delete ")]:
            hold(tmp_path / "a", pid=pid, host=host, kernel_lock=False).close()
            with pytest.raises(SFTKeyError, match=f"is in use by another run \\(process {pid} .*{hint}"):
                FolderLock(tmp_path / "a").acquire()
    finally:
        live.kill()
        live.wait()
    hold(tmp_path / "b", pid=dead_pid(), kernel_lock=False).close()
    lock = FolderLock(tmp_path / "b").acquire()
    assert json.loads((tmp_path / "b" / LOCK).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / "b" / LOCK).exists()


def test_a_lock_is_one_holder_at_a_time_and_released_leaves_nothing(tmp_path):
    from sftkey_trl.errors import SFTKeyError
    from sftkey_trl.run.lock import FolderLock

    first = FolderLock(tmp_path).acquire()
    with pytest.raises(SFTKeyError, match=f"is in use by another run \\(process {os.getpid()} "):
        FolderLock(tmp_path).acquire()  # another open file: the kernel's lock refuses it, even in this process
    first.release()
    assert list(tmp_path.iterdir()) == []
    FolderLock(tmp_path).acquire().release()


@pytest.mark.e2e
def test_every_rank_of_a_launch_into_a_busy_folder_ends_with_the_one_line(tmp_path):
    """Only the main process takes the lock and the other ranks learn its outcome: none hangs in a collective, and
    none is refused by its own launch's lock (tests/run/test_save_race.py runs two ranks into a free folder)."""
    out = tmp_path / "run"
    handle = hold(out, pid=4242, host="elsewhere")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file",
        str(ROOT / "accelerate_configs/multi_gpu.yaml"), "--num_processes", "2", "--main_process_ip", "127.0.0.1",
        "--main_process_port", "0", str(ROOT / "recipes/run.py"), "--output_dir", str(out), "--use_cpu", "true",
        *TINY,
    ]  # fmt: skip
    try:
        done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    finally:
        handle.close()
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    fix = "wait for it to end, or use another output_dir"
    assert done.returncode != 0 and len(errors) == 2, done.stderr[-3000:]
    assert all(re.fullmatch(BUSY.format(out=out, pid=4242, host="elsewhere", fix=fix), e) for e in errors), errors
    ranks = done.stderr.split("torch/distributed/elastic")[0]  # the launcher then reports the failure its own way
    assert "Traceback" not in ranks and sorted(p.name for p in out.iterdir()) == [LOCK]
