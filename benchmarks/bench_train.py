"""Training throughput and peak memory: a stage through sftkey_trl against a bare `trl.SFTTrainer` given the same
tokenised data and the same labels, in one process, alternating runs. Prints tokens/s, peak memory and ratios.

    python benchmarks/bench_train.py [--steps 40] [--repeats 3] [--hidden_size 256] [--stage completion|key]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, TrainerCallback
from trl import SFTConfig, SFTTrainer

from sftkey_trl.data.adapters import Triple
from sftkey_trl.data.formatting import Formatter
from sftkey_trl.data.masks import tokenize_rendered
from sftkey_trl.data.synthetic import make_arithmetic_example
from sftkey_trl.models.tiny import build_tiny_model, build_tiny_tokenizer
from sftkey_trl.recipe.schema import SFTKeyConfig, SFTKeyScriptArguments
from sftkey_trl.train.objectives import Stage
from sftkey_trl.train.trainer import SFTKeyTrainer


class PeakMemory:
    """Peak GPU memory (CUDA) or peak process RSS above the starting RSS (CPU), sampled every 5 ms.

    On CPU the RSS figure is indicative only: the allocator keeps freed memory, so a run can reuse what an earlier
    one grew (the benchmark warms up first and rotates the order of the trainers each round).
    """

    def __enter__(self):
        self.cuda = torch.cuda.is_available()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            return self
        self.process, self.peak, self.stop = psutil.Process(), 0, threading.Event()
        self.start = self.process.memory_info().rss
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while not self.stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss - self.start)
            time.sleep(0.005)

    def __exit__(self, *exc):
        if self.cuda:
            self.bytes = torch.cuda.max_memory_allocated()
        else:
            self.stop.set()
            self.thread.join()
            self.bytes = self.peak


class Timer(TrainerCallback):
    """Time the optimisation steps after a warm-up step (excludes trainer setup and the first step)."""

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the step's kernels may still be queued: time finished work
        if state.global_step == 1:
            self.start = time.perf_counter()
        self.end = time.perf_counter()


def tokenised(tokenizer, count: int) -> dict:
    import random

    rng = random.Random(0)
    formatter = Formatter(tokenizer, SFTKeyScriptArguments())
    triples = [Triple(**make_arithmetic_example(rng)) for _ in range(count)]
    return tokenize_rendered(tokenizer, [formatter.render(t) for t in triples])


def build_trainer(kind: str, model, tokenizer, columns, stage: Stage, common: dict, callbacks: list, peft_config=None):
    """`kind` "trl": a bare `trl.SFTTrainer` given `input_ids` and the stage's labels (-100 outside its mask);
    "sftkey" / "sftkey-no-part-losses": this project's trainer on the same tokenised columns."""
    if kind == "trl":
        weights = [stage.loss_weights(torch.tensor(c), torch.tensor(k)).tolist()
                   for c, k in zip(columns["completion_mask"], columns["key_mask"])]  # fmt: skip
        labels = [[t if w > 0 else -100 for t, w in zip(ids, ws)] for ids, ws in zip(columns["input_ids"], weights)]
        data = Dataset.from_dict({"input_ids": columns["input_ids"], "labels": labels})
        return SFTTrainer(model=model, args=SFTConfig(**common), train_dataset=data, processing_class=tokenizer,
                          callbacks=callbacks, peft_config=peft_config)  # fmt: skip
    data = Dataset.from_dict(columns)
    return SFTKeyTrainer(model=model, args=SFTKeyConfig(**common), train_dataset=data, processing_class=tokenizer,
                         stage=stage, log_part_losses=(kind == "sftkey"), callbacks=callbacks,
                         peft_config=peft_config)  # fmt: skip


def tokens_per_second(trainer, timer: Timer, steps: int) -> float:
    """Tokens per second over the timed steps (all but the first), assuming equally long steps."""
    tokens = trainer._total_train_tokens * (steps - 1) / steps
    return tokens / (timer.end - timer.start)


def run(kind: str, model_dir, tokenizer, columns, stage: Stage, steps: int, batch: int, out: str) -> tuple[float, int]:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    common = dict(output_dir=out, max_steps=steps, per_device_train_batch_size=batch, report_to="none",
                  save_strategy="no", logging_steps=10_000, activation_checkpointing=False, max_length=None,
                  use_cpu=not torch.cuda.is_available(), bf16=torch.cuda.is_available(), disable_tqdm=True,
                  dataloader_num_workers=0, seed=0)  # fmt: skip
    timer = Timer()
    trainer = build_trainer(kind, model, tokenizer, columns, stage, common, [timer])
    with PeakMemory() as memory:
        trainer.train()
    return tokens_per_second(trainer, timer, steps), memory.bytes


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--hidden_size", type=int, default=256)
    parser.add_argument("--stage", choices=["completion", "key"], default="completion")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    tmp = tempfile.mkdtemp()
    model_dir = build_tiny_model(Path(tmp) / "model", hidden_size=args.hidden_size, num_layers=4)
    tokenizer = build_tiny_tokenizer()
    columns = tokenised(tokenizer, args.steps * args.batch)
    stage = Stage(name=args.stage, loss_on=args.stage)
    kinds = ["trl", "sftkey", "sftkey-no-part-losses"]
    results: dict[str, list] = {kind: [] for kind in kinds}
    run("trl", model_dir, tokenizer, columns, stage, 4, args.batch, tmp)  # warm-up: first-run allocations
    for repeat in range(args.repeats):
        for kind in kinds[repeat % len(kinds) :] + kinds[: repeat % len(kinds)]:  # rotate the order each round
            results[kind].append(run(kind, model_dir, tokenizer, columns, stage, args.steps, args.batch, tmp))
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    print(f"\n{args.stage} stage, {args.steps} steps x batch {args.batch}, hidden {args.hidden_size}, {device}")
    base_speed = statistics.median(r[0] for r in results["trl"])
    base_memory = max(r[1] for r in results["trl"])
    print(f"{'trainer':<24}{'tokens/s (median)':>20}{'ratio':>8}{'peak MiB':>10}{'ratio':>8}")
    for kind in kinds:
        speed = statistics.median(r[0] for r in results[kind])
        memory = max(r[1] for r in results[kind])
        print(f"{kind:<24}{speed:>20,.0f}{speed / base_speed:>8.3f}{memory / 2**20:>10.1f}"
              f"{memory / max(base_memory, 1):>8.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
