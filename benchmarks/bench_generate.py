"""Evaluation generation throughput: the batched, length-sorted, left-padded path of `generation.generate`
against one-example-at-a-time `model.generate`, same model, same prompts, same process. Prints the ratio.

    python benchmarks/bench_generate.py [--prompts 64] [--batch 32] [--max_new_tokens 64] [--hidden_size 256]
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from sftkey_trl.data.formatting import Formatter
from sftkey_trl.data.synthetic import make_arithmetic_example
from sftkey_trl.evaluation.generation import generate, stop_token_ids
from sftkey_trl.models.tiny import build_tiny_model, build_tiny_tokenizer
from sftkey_trl.recipe.schema import SFTKeyScriptArguments


def one_at_a_time(model, tokenizer, prompts, stop_ids, max_new_tokens) -> int:
    generated = 0
    for prompt in prompts:
        encoded = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(model.device)
        output = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop_ids,
                                pad_token_id=tokenizer.pad_token_id)  # fmt: skip
        generated += output.shape[1] - encoded["input_ids"].shape[1]
    return generated


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--hidden_size", type=int, default=256)
    parser.add_argument("--model", default=None, help="A saved model folder (default: a random-init tiny Llama).")
    args = parser.parse_args()
    model_dir = args.model or build_tiny_model(Path(tempfile.mkdtemp()) / "m", hidden_size=args.hidden_size)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(model_dir).to(device).eval()
    tokenizer = build_tiny_tokenizer()
    formatter = Formatter(tokenizer, SFTKeyScriptArguments())
    rng = random.Random(0)
    prompts = [formatter.prompt(make_arithmetic_example(rng)["question"]) for _ in range(args.prompts)]
    stop_ids = stop_token_ids(tokenizer, formatter.end_of_turn)

    start = time.perf_counter()
    batched = generate(model, tokenizer, prompts, stop_ids, args.batch, args.max_new_tokens, show_progress=False)
    batched_seconds = time.perf_counter() - start
    batched_tokens = sum(length for _, length in batched)
    start = time.perf_counter()
    single_tokens = one_at_a_time(model, tokenizer, prompts, stop_ids, args.max_new_tokens)
    single_seconds = time.perf_counter() - start

    where = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    print(f"{args.prompts} prompts, up to {args.max_new_tokens} new tokens, batch {args.batch}, {where}")
    batched_rate, single_rate = batched_tokens / batched_seconds, single_tokens / single_seconds
    print(f"batched (sftkey_trl.evaluation.generation.generate): {batched_rate:10,.0f} generated tokens/s")
    print(f"one at a time (model.generate):         {single_rate:10,.0f} generated tokens/s")
    print(f"ratio: {batched_rate / single_rate:.2f}x")


if __name__ == "__main__":
    main()
