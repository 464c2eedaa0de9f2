"""The in-process measurements of the GPU check: training runs (this project's trainer beside a bare
`trl.SFTTrainer` on one loaded base model), Liger and evaluation generation (`accelerate launch` runs of
recipes/run.py: gpu_check_launches.py)."""

from __future__ import annotations

import gc
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

from sftkey_trl.evaluation.generation import generate, stop_token_ids
from sftkey_trl.train.modeling import load_model, lora_config
from sftkey_trl.train.objectives import Stage

GIB = 1024**3
STAGES = (Stage(name="sft", loss_on="completion"), Stage(name="key", loss_on="key"))
KINDS = {"completion": ("trl", "sftkey"), "key": ("trl", "sftkey", "sftkey-no-part-losses")}
LORA_R = 16


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
