"""The measurements of the GPU check: training runs (this project's trainer beside a bare `trl.SFTTrainer` on one
loaded base model), Liger, evaluation generation, and `accelerate launch` runs of recipes/run.py."""

from __future__ import annotations

import gc
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from bench_generate import one_at_a_time
from bench_train import PeakMemory, Timer, build_trainer, tokens_per_second
from peft import PeftModel
from transformers import PrinterCallback
from trl import ModelConfig, SFTConfig

from sftkey_trl.data.synthetic import write_arithmetic_dataset
from sftkey_trl.evaluation.generation import generate, stop_token_ids
from sftkey_trl.train.modeling import load_model, lora_config
from sftkey_trl.train.objectives import Stage

ROOT = Path(__file__).resolve().parents[1]
GIB = 1024**3
STAGES = (Stage(name="sft", loss_on="completion"), Stage(name="key", loss_on="key"))
KINDS = {"completion": ("trl", "sftkey"), "key": ("trl", "sftkey", "sftkey-no-part-losses")}
LORA_R = 16
LAUNCH_CONFIGS = ("single_gpu", "deepspeed_zero2", "deepspeed_zero3", "fsdp")  # single_gpu: the control


@dataclass
class Clock:
    """Seconds left of the check's budget (the device runs one command for at most 10 minutes)."""

    budget_s: float
    start: float = field(default_factory=time.perf_counter)

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.start)


@dataclass
class Measured:
    """One training run: tokens/s over the timed steps and `torch.cuda.max_memory_allocated` (None on CPU);
    `resident_gib`: what was allocated before the trainer was built (the base model, and any leftover)."""

    tokens_per_s: float
    peak_gib: float | None
    resident_gib: float | None = None


def model_args(model_dir: Path, method: str, cuda: bool) -> ModelConfig:
    """The recipe's model arguments for LoRA (bf16 on a GPU) or QLoRA (nf4, double quantisation), LoRA r=16."""
    return ModelConfig(
        model_name_or_path=str(model_dir),
        dtype="bfloat16" if cuda else "float32",
        use_peft=True,
        lora_r=LORA_R,
        lora_alpha=2 * LORA_R,
        load_in_4bit=method == "qlora",
        use_bnb_nested_quant=method == "qlora",
    )


def adapter_config():
    """A fresh LoRA adapter config, as recipes get it from the project's `lora_config`: r=16, all linear layers."""
    return lora_config(ModelConfig(use_peft=True, lora_r=LORA_R, lora_alpha=2 * LORA_R))


def training_values(work: Path, steps: int, batch: int, cuda: bool) -> dict:
    """The training arguments both trainers get: the recipes' settings (bf16, activation checkpointing)."""
    return dict(output_dir=str(work / "trainer"), max_steps=steps, per_device_train_batch_size=batch,
                learning_rate=1e-4, lr_scheduler_type="constant", report_to="none", save_strategy="no",
                logging_steps=10_000, activation_checkpointing=True, max_length=None, use_cpu=not cuda, bf16=cuda,
                disable_tqdm=True, dataloader_num_workers=0, seed=0)  # fmt: skip


def load_base(model_dir: Path, method: str, values: dict):
    """The base model loaded by the project's own `load_model` (4-bit nf4 on this process's device for QLoRA)."""
    cuda = not values["use_cpu"]
    return load_model(model_args(model_dir, method, cuda), SFTConfig(**values), purpose="train")


def release(trainer, embedding_hooks: set):
    """Free a finished trainer and give back its base model as it was: adapter removed (`unload`), TRL's fused
    LM head patch taken off, and the input-gradient hooks gone (`embedding_hooks`: those there before the run)."""
    model = trainer.model
    base = model.unload() if isinstance(model, PeftModel) else model
    base.__dict__.pop("forward", None)  # add_fused_lm_head patches the instance; the class forward is the original
    base.disable_input_require_grads()
    hooks = base.get_input_embeddings()._forward_hooks
    for key in set(hooks) - embedding_hooks:  # enabled twice (TRL, Trainer): disable removes only the last hook
        del hooks[key]
    trainer.model = trainer.model_wrapped = trainer.optimizer = trainer.lr_scheduler = None
    del trainer, model
    if base.device.type == "cuda":  # the next run's peak must not include this one's leftovers
        gc.collect()
        torch.cuda.empty_cache()
    return base


def train_once(kind: str, base, tokenizer, columns, stage: Stage, values: dict, liger: bool = False):
    """One run of `kind` on `base` with a fresh LoRA adapter; returns (Measured, the base ready for the next run)."""
    torch.manual_seed(0)
    timer = Timer()
    resident = torch.cuda.memory_allocated() / GIB if torch.cuda.is_available() else None
    embedding_hooks = set(base.get_input_embeddings()._forward_hooks)
    trainer = build_trainer(kind, base, tokenizer, columns, stage, {**values, "use_liger_kernel": liger}, [timer],
                            peft_config=adapter_config())  # fmt: skip
    trainer.remove_callback(PrinterCallback)  # keeps each run's final metrics out of the printed table
    with PeakMemory() as memory:
        trainer.train()
    peak = memory.bytes / GIB if memory.cuda else None
    measured = Measured(tokens_per_second(trainer, timer, values["max_steps"]), peak, resident)
    return measured, release(trainer, embedding_hooks)


def measure_stages(base, tokenizer, columns, values: dict, rounds: int, clock: Clock, reserve_s: float,
                   warm_up: bool = True):  # fmt: skip
    """Every kind of trainer on both stages, `rounds` times in a rotated order, after a warm-up run (first-run
    allocations and kernel selection). Returns ({loss_on: {kind: [Measured, ...]}}, base, cut) where `cut` says
    the budget stopped the rounds early."""
    if warm_up:
        _, base = train_once("trl", base, tokenizer, columns, STAGES[0], {**values, "max_steps": 3})
    runs: dict[str, dict[str, list]] = {stage.loss_on: {kind: [] for kind in KINDS[stage.loss_on]} for stage in STAGES}
    for repeat in range(rounds):
        for stage in STAGES:
            kinds = KINDS[stage.loss_on]
            for kind in kinds[repeat % len(kinds) :] + kinds[: repeat % len(kinds)]:
                if repeat and clock.left() < reserve_s:  # the first round always completes
                    return runs, base, True
                measured, base = train_once(kind, base, tokenizer, columns, stage, values)
                runs[stage.loss_on][kind].append(measured)
    return runs, base, False


def measure_liger(base, tokenizer, columns, values: dict) -> dict[str, Measured]:
    """This project's trainer with `use_liger_kernel` on each stage. Liger patches the model's modules for good,
    so this runs last on a base model that is dropped afterwards; what it patches module-wide (normalisation and
    MLP classes, the rotary embedding, the model's forward) is put back for the models loaded after it."""
    module, cls = sys.modules[type(base).__module__], type(base)
    saved_module, saved_forward = dict(vars(module)), cls.forward
    results = {}
    try:
        for stage in STAGES:
            results[stage.loss_on], base = train_once("sftkey", base, tokenizer, columns, stage, values, liger=True)
    finally:
        for name in set(vars(module)) - set(saved_module):
            delattr(module, name)
        for name, value in saved_module.items():
            setattr(module, name, value)
        cls.forward = saved_forward
    return results


def measure_generation(model, tokenizer, prompts: list[str], end_of_turn: str, batch: int, max_new_tokens: int,
                       single_prompts: int) -> dict:  # fmt: skip
    """Generated tokens/s of the evaluation's batched path (`generation.generate`) and of one-at-a-time
    `model.generate` (on the first `single_prompts` prompts: the rate does not depend on how many)."""
    stop_ids = stop_token_ids(tokenizer, end_of_turn)
    model.eval()
    generate(model, tokenizer, prompts[:2], stop_ids, 2, 4, show_progress=False)  # warm-up
    with PeakMemory() as memory:
        start = time.perf_counter()
        batched = generate(model, tokenizer, prompts, stop_ids, batch, max_new_tokens, show_progress=False)
        batched_seconds = time.perf_counter() - start
    start = time.perf_counter()
    single = one_at_a_time(model, tokenizer, prompts[:single_prompts], stop_ids, max_new_tokens)
    single_seconds = time.perf_counter() - start
    return {
        "batched_tokens_per_s": sum(length for _, length in batched) / batched_seconds,
        "single_tokens_per_s": single / single_seconds,
        "prompts": len(prompts),
        "batch": batch,
        "max_new_tokens": max_new_tokens,
        "single_prompts": single_prompts,
        "batched_peak_gib": memory.bytes / GIB if memory.cuda else None,
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_recipe(model_dir: Path, data_dir: Path, output_dir: Path, method: str, cuda: bool, steps: int) -> dict:
    """A small recipe for recipes/run.py: both stages (`steps` optimizer steps each) and the evaluation after each."""
    recipe = {
        "model_name_or_path": str(model_dir),
        "dataset_name": str(data_dir / "train.jsonl"),
        "eval_dataset_name": str(data_dir / "test.jsonl"),
        "dataset_format": "generic",
        "max_eval_samples": 8,
        "max_new_tokens": 24,
        "eval_batch_size": 8,
        "output_dir": str(output_dir),
        "overwrite_output_dir": True,
        "stages": [
            {"name": "sft", "loss_on": "completion", "max_steps": steps},
            {"name": "key", "loss_on": "key", "max_steps": steps},
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
    """One `accelerate launch` of recipes/run.py in the background."""

    config: str
    method: str
    output_dir: Path
    process: subprocess.Popen | None = None
    started: float = 0.0
    stderr_path: Path | None = None
    result: dict | None = None


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
    recipe_path = launch.output_dir / "recipe.yaml"
    recipe = launch_recipe(model_dir, data_dir, launch.output_dir / "run", method, cuda, steps)
    if not cuda and config.startswith("deepspeed"):  # DeepSpeed's CPU route (`use_cpu` would make it plain DDP)
        recipe.update(use_cpu=False, ddp_backend="gloo")
    recipe_path.write_text(json.dumps(recipe, indent=1))  # JSON is YAML
    command = [sys.executable, "-m", "accelerate.commands.launch",
               "--config_file", str(ROOT / "accelerate_configs" / f"{config}.yaml"), "--num_processes", "1",
               "--main_process_port", str(free_port()), str(ROOT / "recipes" / "run.py"),
               "--config", str(recipe_path)]  # fmt: skip
    pythonpath = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": pythonpath, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "SFTKEY_CACHE": str(launch.output_dir / "cache")}  # fmt: skip
    if not cuda:
        env["OMP_NUM_THREADS"] = "1"
    launch.stderr_path = launch.output_dir / "stderr.txt"
    with open(launch.output_dir / "stdout.txt", "w") as out, open(launch.stderr_path, "w") as err:
        launch.process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=err, start_new_session=True)
    launch.started = time.perf_counter()
    return launch


def finish_launch(launch: Launch, timeout_s: float, error_line) -> dict:
    """Wait for a launch (killing its process group after `timeout_s`) and say whether it worked: exit status 0
    and both stages trained and evaluated in results.json; otherwise the one line it stopped with."""
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
    if code is None:
        detail = f"timed out after {seconds:.0f} s; last line: {error_line(stderr)}"
        return {"status": "timeout", "detail": detail, "seconds": seconds, "stderr_tail": tail}
    if code != 0:
        return {"status": "error", "detail": error_line(stderr), "seconds": seconds, "exit_status": code,
                "stderr_tail": tail}  # fmt: skip
    results_path = launch.output_dir / "run" / "results.json"
    stages = json.loads(results_path.read_text()).get("stages", {}) if results_path.exists() else {}
    missing = [name for name in ("sft", "key") if "accuracy" not in stages.get(name, {})]
    if missing:
        detail = f"exit status 0 but no evaluation of stage(s) {', '.join(missing)} in results.json"
        return {"status": "error", "detail": detail, "seconds": seconds}
    return {"status": "works", "detail": "both stages trained and evaluated", "seconds": seconds}


def launch_data(directory: Path) -> Path:
    """A small local dataset (train.jsonl, test.jsonl) written by the project's own generator."""
    return write_arithmetic_dataset(directory, num_train=64, num_test=16)
