"""Process set-up of the entry points: CPU threads under `accelerate launch`, bitsandbytes only when quantising,
and a recipe parse that raises no warning of its own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
from conftest import ROOT

from sftkey_trl.run.process import usable_cores

DEMO = ROOT / "recipes/demo/sftkey_tiny.yaml"
QLORA = ROOT / "recipes/qwen2.5-1.5b/gsm8k/sftkey_qlora_24gb.yaml"


def run_python(tmp_path, code: str, *, launcher: list[str] | None = None, **env: str) -> subprocess.CompletedProcess:
    """Run `code` as a script in a fresh CPU-only process (directly, or under `launcher`)."""
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": "", **env}
    for key in ("OMP_NUM_THREADS", "WORLD_SIZE"):
        if key not in env:
            environment.pop(key, None)
    script = tmp_path / "script.py"
    script.write_text(code)
    command = [sys.executable, *(launcher or []), str(script)]
    return subprocess.run(command, capture_output=True, text=True, env=environment, cwd=ROOT, timeout=300)


DRY_RUN = """
import sys
sys.argv = ["run.py", *{args!r}, "--dry_run"]
from sftkey_trl.run.cli import main
main()
print("BITSANDBYTES", type(sys.modules.get("bitsandbytes")).__name__)
"""


@pytest.mark.slow
@pytest.mark.parametrize("args", [[], ["--config", str(QLORA)]])
def test_bitsandbytes_is_never_hidden_and_its_cpu_noise_is_silenced(args, tmp_path):
    """Whether the recipe quantises or not, bitsandbytes is imported as installed (peft imports it), and its CPU
    backend's warning about the optional `kernels` package is silenced at its logger."""
    done = run_python(tmp_path, DRY_RUN.format(args=args))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "BITSANDBYTES module" in done.stdout
    assert "bitsandbytes" not in done.stderr and "kernels" not in done.stderr


SMALL_RUN = ["--max_train_samples", "16", "--max_eval_samples", "8", "--num_train_epochs", "1",
             "--max_new_tokens", "8"]  # fmt: skip


@pytest.mark.e2e
# rank 64 gives the tests' 64-wide model LoRA matrices of 4096 values, the least bitsandbytes keeps in 8 bits
@pytest.mark.parametrize("method", [["--use_peft", "true", "--lora_r", "64"], []], ids=["lora", "full"])
def test_an_8bit_optimizer_trains_the_demo(method, tmp_path):
    """`optim: adamw_bnb_8bit`, a common memory saver on consumer GPUs, through `recipes/run.py` on the CPU
    (bitsandbytes' 8-bit Adam steps there too), with LoRA and with full fine-tuning: both stages train and are
    evaluated."""
    out = tmp_path / "run"
    command = [sys.executable, str(ROOT / "recipes/run.py"), "--config", str(DEMO), "--output_dir", str(out),
               *method, "--optim", "adamw_bnb_8bit", *SMALL_RUN]  # fmt: skip
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(command, capture_output=True, text=True, env=environment, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    for stage in ("sft", "key"):
        assert results["stages"][stage]["num_examples"] == 8
        assert results["stages"][stage]["training"]["optimizer_steps"] >= 1
    # bitsandbytes' optimizer stepped: the checkpoint holds its state (torch's AdamW would hold exp_avg, exp_avg_sq),
    # 8-bit (uint8 moments) for every tensor of at least 4096 values
    (checkpoint,) = (out / "sft" / "checkpoints").glob("checkpoint-*")
    state = torch.load(checkpoint / "optimizer.pt", weights_only=False)["state"]
    quantised = [values["__bnb_optimizer_quant_state__"] for values in state.values()]
    assert quantised and any(values["state1"].dtype == torch.uint8 for values in quantised)


THREADS = """
from sftkey_trl.run.process import use_available_cores
import torch
print("THREADS", use_available_cores(), torch.get_num_threads())
"""
LAUNCH = ["-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
          "--mixed_precision", "no", "--dynamo_backend", "no"]  # fmt: skip


@pytest.mark.slow
def test_accelerate_launch_default_threads_become_the_available_cores(tmp_path):
    done = run_python(tmp_path, THREADS, launcher=LAUNCH)
    assert done.returncode == 0, done.stderr[-2000:]
    cores = usable_cores()
    assert f"THREADS {cores} {cores}" in done.stdout


@pytest.mark.slow
@pytest.mark.parametrize("how", ["environment", "flag"])
def test_a_users_thread_count_is_respected(how, tmp_path):
    launcher = LAUNCH + (["--num_cpu_threads_per_process", "1"] if how == "flag" else [])
    env = {"OMP_NUM_THREADS": "1"} if how == "environment" else {}
    done = run_python(tmp_path, THREADS, launcher=launcher, **env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "THREADS None 1" in done.stdout


@pytest.mark.slow
def test_plain_python_is_left_alone(tmp_path):
    done = run_python(tmp_path, THREADS, OMP_NUM_THREADS="1")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "THREADS None 1" in done.stdout


def test_recipe_defaults_raise_no_warning_and_do_not_pin_memory_without_a_gpu():
    import torch

    from sftkey_trl.recipe.parsing import parse_config

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", UserWarning)
        args = parse_config(["--config", str(DEMO)]).training
        default = parse_config(["--config", str(DEMO), "--stages", "[{name: a, loss_on: completion}]"]).training
    assert not args.activation_checkpointing and default.dataloader_pin_memory == torch.accelerator.is_available()
    explicit = parse_config(["--config", str(DEMO), "--dataloader_pin_memory", "true"]).training
    assert explicit.dataloader_pin_memory is True


def test_trl_checkpointing_default_is_kept_without_the_deprecated_key():
    from sftkey_trl.recipe.schema import SFTKeyConfig

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        args = SFTKeyConfig(output_dir="unused")
    assert args.activation_checkpointing is True  # TRL's default
    with pytest.warns(FutureWarning, match="gradient_checkpointing"):  # the user's own deprecated key still works
        assert SFTKeyConfig(output_dir="unused", gradient_checkpointing=False).activation_checkpointing is False


CLOSE = """
import atexit, sys
import torch.distributed as dist

atexit.register(lambda: print("GROUP_LEFT_AT_EXIT", dist.is_initialized()))  # registered first, so it runs last
from sftkey_trl.run.process import start_entry_point
start_entry_point(as_program=True)
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
{end}
"""


@pytest.mark.slow
@pytest.mark.parametrize("end", ["pass", "sys.exit(2)"])
def test_the_entry_point_closes_its_process_group_at_exit(end, tmp_path):
    """A gloo group left to the interpreter's teardown can abort a rank that finished (SIGABRT), failing the launch;
    the entry point destroys it at exit, after a normal end and after an error line's exit alike."""
    done = run_python(tmp_path, CLOSE.format(demo=str(DEMO), end=end))
    assert done.returncode == (0 if end == "pass" else 2), done.stderr[-2000:]
    assert "GROUP_LEFT_AT_EXIT False" in done.stdout, done.stdout


HELD = """
import atexit, os
from types import SimpleNamespace
import torch
import torch.distributed as dist
from torch.distributed.fsdp import FullyShardedDataParallel

atexit.register(lambda: print("THREADS_LEFT", len(os.listdir("/proc/self/task")) - before))  # first, so runs last
from sftkey_trl.run.process import start_entry_point

start_entry_point(as_program=True)
torch.ones(64).sum()  # the CPU's own threads start before the count
before = len(os.listdir("/proc/self/task"))
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
trainer = SimpleNamespace(model_wrapped=FullyShardedDataParallel(torch.nn.Linear(4, 4), device_id=torch.device("cpu")))
with torch.no_grad():  # an evaluation's forward (one with autograd's hooks keeps the wrapper alive to the end)
    trainer.model_wrapped(torch.ones(2, 4))  # its all-gathers ran in the group
trainer.callbacks = [SimpleNamespace(trainer=trainer)]  # a trainer and its callbacks refer to each other
print("GLOO_THREADS", len(os.listdir("/proc/self/task")) - before)
del trainer
{end}
"""


@pytest.mark.slow
@pytest.mark.parametrize("end", ["pass", "sys.exit(2)"])
def test_the_process_group_is_freed_before_the_interpreters_teardown(end, tmp_path):
    """Models and trainers hold the group in reference cycles, so destroying it left its gloo threads running into
    the interpreter's teardown, where one dropping its last collective's tensors cannot take the GIL and aborts a
    finished rank (SIGABRT: the abort this caught was 7 in 93 two-process launches of test_engines' keep_best
    script). Closed at exit, the group is freed and its threads joined while the interpreter still runs."""
    done = run_python(tmp_path, HELD.replace("{end}", "import sys; " + end))
    assert done.returncode == (0 if end == "pass" else 2), done.stderr[-2000:]
    started = int(done.stdout.split("GLOO_THREADS ")[1].split()[0])
    assert started >= 1, done.stdout  # the group runs threads of its own: the count can see them
    assert "THREADS_LEFT 0" in done.stdout, done.stdout
