"""The GPU check's `accelerate launch` runs of recipes/run.py, one process each: both stages with `eval_base` and
keep_best on the key stage, then for LoRA an `--eval_only` of stage 1 under the same config. A run works when it
exits 0, its results hold what it was asked for, and every model it generated with was on the training device
(read from the run's log: `evaluation.generation` logs `<what>: generating N answers on <device>`)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from gpu_check_runs import model_args

from sftkey_trl.data.synthetic import write_arithmetic_dataset

ROOT = Path(__file__).resolve().parents[1]
LAUNCH_CONFIGS = ("single_gpu", "deepspeed_zero2", "deepspeed_zero3", "fsdp")  # single_gpu: the control
# The log line, wherever it lands: a progress bar's last redraw often shares its line
GENERATION_LINE = re.compile(r"(?P<what>[\w./-]+): generating \d+ answers on (?P<device>[\w:]+)")
TERMINAL_ESCAPE = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_data(directory: Path) -> Path:
    """A small local dataset (train.jsonl, test.jsonl) written by the project's own generator."""
    return write_arithmetic_dataset(directory, num_train=64, num_test=16)


def launch_recipe(model_dir: Path, data_dir: Path, output_dir: Path, method: str, cuda: bool, steps: int) -> dict:
    """A small recipe for recipes/run.py as users run it: the base model evaluated, both stages (`steps` optimizer
    steps each), keep_best on the key stage (on a 10% validation split), the evaluation after each stage."""
    recipe = {
        "model_name_or_path": str(model_dir),
        "dataset_name": str(data_dir / "train.jsonl"),
        "eval_dataset_name": str(data_dir / "test.jsonl"),
        "eval_fraction": 0.1,
        "dataset_format": "generic",
        "max_eval_samples": 8,
        "max_new_tokens": 24,
        "eval_batch_size": 8,
        "eval_base": True,
        "output_dir": str(output_dir),
        "overwrite_output_dir": True,
        "stages": [
            {"name": "sft", "loss_on": "completion", "max_steps": steps},
            {"name": "key", "loss_on": "key", "max_steps": steps, "keep_best": True},
        ],
        "per_device_train_batch_size": 4,
        "max_length": 512,
        "learning_rate": 1e-4,
        "activation_checkpointing": True,
        "save_strategy": "no",
        "logging_steps": 1,
        "report_to": "none",
        "bf16": cuda,
        "use_cpu": not cuda,
    }
    args = model_args(model_dir, method, cuda)
    for key in ("dtype", "use_peft", "lora_r", "lora_alpha", "load_in_4bit", "use_bnb_nested_quant"):
        recipe[key] = getattr(args, key)
    return recipe


@dataclass
class Launch:
    """One `accelerate launch` of recipes/run.py in the background (`extra`: flags after the recipe)."""

    config: str
    method: str
    output_dir: Path
    extra: list[str] = field(default_factory=list)
    process: subprocess.Popen | None = None
    started: float = 0.0
    stderr_path: Path | None = None
    result: dict | None = None

    @property
    def eval_only(self) -> bool:
        return "--eval_only" in self.extra

    @property
    def name(self) -> str:
        return "eval-only" if self.eval_only else "run"


def start_launch(config: str, method: str, model_dir: Path, data_dir: Path, work: Path, cuda: bool,
                 steps: int) -> Launch:  # fmt: skip
    """Start `python -m accelerate.commands.launch --config_file accelerate_configs/<config>.yaml --num_processes 1
    recipes/run.py --config <small recipe>`; a config whose engine is not installed gets its row at once."""
    import importlib.util

    launch = Launch(config, method, work / f"{config}-{method}")
    if config.startswith("deepspeed") and importlib.util.find_spec("deepspeed") is None:
        launch.result = {"status": "not installed", "detail": "deepspeed is not installed", "seconds": 0.0}
        return launch
    launch.output_dir.mkdir(parents=True, exist_ok=True)
    recipe = launch_recipe(model_dir, data_dir, launch.output_dir / "run", method, cuda, steps)
    if not cuda and config.startswith("deepspeed"):  # DeepSpeed's CPU route (`use_cpu` would make it plain DDP)
        recipe.update(use_cpu=False, ddp_backend="gloo")
    (launch.output_dir / "recipe.yaml").write_text(json.dumps(recipe, indent=1))  # JSON is YAML
    return _start(launch, cuda)


def start_eval_only(run: Launch, cuda: bool) -> Launch:
    """`--eval_only --checkpoint <run>/sft` of a finished run, under the same config and recipe."""
    flags = ["--eval_only", "--checkpoint", str(run.output_dir / "run" / "sft")]
    return _start(Launch(run.config, run.method, run.output_dir, flags), cuda)


def _start(launch: Launch, cuda: bool) -> Launch:
    command = [sys.executable, "-m", "accelerate.commands.launch",
               "--config_file", str(ROOT / "accelerate_configs" / f"{launch.config}.yaml"), "--num_processes", "1",
               "--main_process_port", str(free_port()), str(ROOT / "recipes" / "run.py"),
               "--config", str(launch.output_dir / "recipe.yaml"), *launch.extra]  # fmt: skip
    pythonpath = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": pythonpath, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "SFTKEY_CACHE": str(launch.output_dir / "cache")}  # fmt: skip
    if not cuda:
        env["OMP_NUM_THREADS"] = "1"
    launch.stderr_path = launch.output_dir / f"{launch.name}.stderr.txt"
    with open(launch.output_dir / f"{launch.name}.stdout.txt", "w") as out, open(launch.stderr_path, "w") as err:
        launch.process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=err, start_new_session=True)
    launch.started = time.perf_counter()
    return launch


def generation_devices(log: str) -> list[list[str]]:
    """[what, device] for every generation a run logged, in order (base, keep_best, a stage, eval_only/<stage>)."""
    return [[m["what"], m["device"]] for m in GENERATION_LINE.finditer(TERMINAL_ESCAPE.sub("\n", log))]


def misplaced(devices: list[list[str]], cuda: bool) -> list[str]:
    """What generated off the training device (the GPU; on a CPU-only check, the CPU)."""
    return [what for what, device in devices if device.split(":")[0] != ("cuda" if cuda else "cpu")]


def summary(devices: list[list[str]]) -> str:
    """`cuda:0: base, sft, keep_best x2, key`: where each evaluation generated, repeats counted."""
    by_device: dict[str, list[str]] = {}
    for what, device in devices:
        by_device.setdefault(device, []).append(what)
    parts = []
    for device, names in by_device.items():
        counted = [f"{n} x{names.count(n)}" if names.count(n) > 1 else n for n in dict.fromkeys(names)]
        parts.append(f"{device}: {', '.join(counted)}")
    return "; ".join(parts) or "no generation logged"


def missing_results(launch: Launch) -> list[str]:
    """What a run that exited 0 should have written and did not."""
    run = launch.output_dir / "run"
    if launch.eval_only:
        metrics = run / "eval_only" / "sft" / "metrics.json"
        return [] if metrics.exists() and "accuracy" in json.loads(metrics.read_text()) else ["eval_only/sft metrics"]
    results = json.loads((run / "results.json").read_text()) if (run / "results.json").exists() else {}
    stages = results.get("stages", {})
    missing = [name for name in ("sft", "key") if "accuracy" not in stages.get(name, {})]
    missing += [] if "accuracy" in results.get("base", {}) else ["base"]
    missing += [] if "keep_best" in stages.get("key", {}).get("training", {}) else ["key's keep_best"]
    return missing


def finish_launch(launch: Launch, timeout_s: float, error_line, cuda: bool) -> dict:
    """Wait for a launch (killing its process group after `timeout_s`) and say whether it worked: exit status 0,
    everything asked for in its results, and every generation on the training device; otherwise what went wrong."""
    if launch.result is not None:
        return launch.result
    try:
        code = launch.process.wait(timeout=max(timeout_s - (time.perf_counter() - launch.started), 1))
    except subprocess.TimeoutExpired:
        os.killpg(launch.process.pid, signal.SIGKILL)
        launch.process.wait()
        code = None
    seconds = time.perf_counter() - launch.started
    stderr = launch.stderr_path.read_text(errors="replace")
    tail = stderr.splitlines()[-40:]  # for the JSON file: the work folder stays on the device
    devices = generation_devices(stderr)
    result = {"seconds": seconds, "devices": devices}
    if code is None:
        detail = f"timed out after {seconds:.0f} s; last line: {error_line(stderr)}"
        return {**result, "status": "timeout", "detail": detail, "stderr_tail": tail}
    if code != 0:
        return {**result, "status": "error", "detail": error_line(stderr), "exit_status": code, "stderr_tail": tail}
    missing = missing_results(launch)
    if missing:
        return {**result, "status": "error", "detail": f"exit status 0 but no {', '.join(missing)} in its results"}
    off = misplaced(devices, cuda)
    if off:
        detail = f"generated off the training device: {', '.join(off)} ({summary(devices)})"
        return {**result, "status": "error", "detail": detail}
    if not devices:
        return {**result, "status": "error", "detail": "exit status 0 but no generation logged"}
    done = "stage 1 evaluated alone" if launch.eval_only else "base, both stages (keep_best on key) evaluated"
    return {**result, "status": "works", "detail": f"{done}; generated on {summary(devices)}"}
