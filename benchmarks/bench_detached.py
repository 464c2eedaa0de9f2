"""The key stage with `context: detached` against the ordinary key stage: training tokens/s (every token of every
sequence counts) and peak memory, same process, same data, rounds in rotated order. Prints the ratios.

    python benchmarks/bench_detached.py [--steps 20] [--repeats 3] [--batch 16] [--reasoning_steps 16]
                                        [--hidden_size 256] [--layers 4] [--device cpu|cuda] [--json out.json]

The default is CPU-sized: the demo's tiny Llama and arithmetic problems with long worked reasoning (about 350
characters-tokens per row) and a short answer, so that the prefix dominates as it does in chain-of-thought data.
Peak memory is `torch.cuda.max_memory_allocated` on a GPU and the process RSS above its starting value on CPU (see
`bench_train.PeakMemory`); on Linux the CPU run first makes glibc return freed tensors to the system at once, so
that one run's RSS does not include what an earlier run left in the allocator.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import random
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM
from transformers.trainer_callback import PrinterCallback

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import PeakMemory, Timer  # noqa: E402

from sftkey_trl.data.adapters import Triple  # noqa: E402
from sftkey_trl.data.formatting import Formatter  # noqa: E402
from sftkey_trl.data.masks import tokenize_rendered  # noqa: E402
from sftkey_trl.data.synthetic import make_arithmetic_example  # noqa: E402
from sftkey_trl.models.tiny import build_tiny_model, build_tiny_tokenizer  # noqa: E402
from sftkey_trl.recipe.schema import SFTKeyConfig, SFTKeyScriptArguments  # noqa: E402
from sftkey_trl.train.objectives import Stage  # noqa: E402
from sftkey_trl.train.trainer import SFTKeyTrainer  # noqa: E402

# name -> (stage context, log_part_losses); the first is the baseline the ratios divide by
KINDS = {
    "ordinary": ("full", True),  # the default key stage (the fused head also scores the reasoning, for logging)
    "ordinary-no-part-losses": ("full", False),  # its cheapest form: the head scores the key tokens only
    "detached": ("detached", True),
}
M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def release_freed_memory_at_once() -> None:
    """Serve every allocation above 64 KiB with mmap, so freeing a tensor lowers the RSS (Linux, glibc)."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 64 * 1024)
    except (OSError, AttributeError):
        pass


def tokenised(tokenizer, count: int, reasoning_steps: int) -> dict:
    """Long worked sums (`reasoning_steps` lines) with a one- or two-digit answer."""
    rng = random.Random(0)
    formatter = Formatter(tokenizer, SFTKeyScriptArguments())
    steps = (reasoning_steps, reasoning_steps)
    triples = [Triple(**make_arithmetic_example(rng, steps=steps, max_value=99)) for _ in range(count)]
    return tokenize_rendered(tokenizer, [formatter.render(t) for t in triples])


def run(kind: str, model_dir, tokenizer, columns, args, out: str) -> tuple[float, int]:
    """Train one stage of `kind` for `args.steps` steps; return (tokens/s after the first step, peak bytes)."""
    context, part_losses = KINDS[kind]
    cuda = args.device == "cuda"
    gc.collect()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = SFTKeyConfig(output_dir=out, max_steps=args.steps, per_device_train_batch_size=args.batch,
                          report_to="none", save_strategy="no", logging_steps=10_000, activation_checkpointing=False,
                          max_length=None, use_cpu=not cuda, bf16=cuda, disable_tqdm=True, dataloader_num_workers=0,
                          seed=0)  # fmt: skip
    timer = Timer()
    trainer = SFTKeyTrainer(model=model, args=config, train_dataset=Dataset.from_dict(columns),
                            processing_class=tokenizer, stage=Stage(name="key", loss_on="key", context=context),
                            log_part_losses=part_losses, callbacks=[timer])  # fmt: skip
    trainer.remove_callback(PrinterCallback)  # keep the output to the table
    with PeakMemory() as memory:
        trainer.train()
    tokens = trainer._total_train_tokens * (args.steps - 1) / args.steps
    del trainer, model
    gc.collect()
    return tokens / (timer.end - timer.start), memory.bytes


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--reasoning_steps", type=int, default=16, help="worked lines per row (the prefix length)")
    parser.add_argument("--hidden_size", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--no_warmup", action="store_true", help="skip the unmeasured first run of each kind")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no GPU is visible")
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # PeakMemory measures the GPU whenever one is visible
        release_freed_memory_at_once()
    tmp = tempfile.mkdtemp()
    model_dir = build_tiny_model(Path(tmp) / "model", hidden_size=args.hidden_size, num_layers=args.layers)
    tokenizer = build_tiny_tokenizer()
    columns = tokenised(tokenizer, args.steps * args.batch, args.reasoning_steps)
    lengths = [len(ids) for ids in columns["input_ids"]]
    keys = [sum(mask) for mask in columns["key_mask"]]
    kinds = list(KINDS)
    results: dict[str, list] = {kind: [] for kind in kinds}
    for kind in [] if args.no_warmup else kinds:  # warm-up: first-run allocations and lazy imports, not measured
        run(kind, model_dir, tokenizer, columns, argparse.Namespace(**{**vars(args), "steps": 2}), tmp)
    for repeat in range(args.repeats):
        for kind in kinds[repeat % len(kinds) :] + kinds[: repeat % len(kinds)]:  # rotate the order each round
            results[kind].append(run(kind, model_dir, tokenizer, columns, args, tmp))

    device = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    memory_kind = "GPU max allocated" if args.device == "cuda" else "RSS above start"
    print(f"\nkey stage, {args.steps} steps x batch {args.batch}, {args.repeats} rounds, hidden {args.hidden_size} x "
          f"{args.layers} layers, {device}")  # fmt: skip
    print(f"tokens per row: mean {statistics.mean(lengths):.0f} (max {max(lengths)}), key tokens mean "
          f"{statistics.mean(keys):.1f}")  # fmt: skip
    summary = {
        "device": device,
        "rounds": args.repeats,
        "tokens_per_row": statistics.mean(lengths),
        "key_tokens_per_row": statistics.mean(keys),
    }
    base_speed = statistics.median(r[0] for r in results[kinds[0]])
    base_memory = max(r[1] for r in results[kinds[0]])
    print(f"{'key stage':<26}{'tokens/s (median)':>18}{'ratio':>8}{f'peak MiB ({memory_kind})':>30}{'ratio':>8}")
    for kind in kinds:
        speed = statistics.median(r[0] for r in results[kind])
        memory = max(r[1] for r in results[kind])
        summary[kind] = {
            "tokens_per_second": speed,
            "peak_bytes": memory,
            "speed_ratio": speed / base_speed,
            "memory_ratio": memory / max(base_memory, 1),
            "runs": [list(r) for r in results[kind]],
        }
        print(f"{kind:<26}{speed:>18,.0f}{speed / base_speed:>8.2f}{memory / 2**20:>30.1f}"
              f"{memory / max(base_memory, 1):>8.2f}")  # fmt: skip
    detached = summary["detached"]
    print(f"detached / ordinary: {detached['speed_ratio']:.2f}x tokens/s, {detached['memory_ratio']:.2f}x peak memory")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
