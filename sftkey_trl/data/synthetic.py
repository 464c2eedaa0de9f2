"""Synthetic reasoning tasks for the offline demo, written deterministically to local files."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path


def make_arithmetic_example(rng: random.Random, steps: tuple[int, int] = (2, 3), max_value: int = 9) -> dict[str, str]:
    """One multi-step problem such as `Compute 7 + 2 - 4.`, worked left to right, staying in [0, max_value]."""
    value = rng.randint(1, max_value - 1)
    expression = str(value)
    lines = []
    for _ in range(rng.randint(*steps)):
        if value == max_value or (value > 0 and rng.random() < 0.5):
            operand = rng.randint(1, value)
            result, op = value - operand, "-"
        else:
            operand = rng.randint(1, max_value - value)
            result, op = value + operand, "+"
        expression += f" {op} {operand}"
        lines.append(f"{value} {op} {operand} = {result}")
        value = result
    return {"question": f"Compute {expression}.", "reasoning": "\n".join(lines), "answer": str(value)}


def write_arithmetic_dataset(
    directory: str | Path, num_train: int = 2000, num_test: int = 200, seed: int = 0, max_value: int = 9
) -> Path:
    """Write `train.jsonl` and `test.jsonl` (columns question/reasoning/answer) deterministically; return the dir."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    seen: set[str] = set()
    splits = {"train": num_train, "test": num_test}
    for split, count in splits.items():
        rows = []
        while len(rows) < count:
            example = make_arithmetic_example(rng, max_value=max_value)
            if example["question"] in seen:  # keep test questions out of train
                continue
            seen.add(example["question"])
            rows.append(example)
        tmp = directory / f".{split}.jsonl.tmp-{os.getpid()}"  # several ranks may build it at once
        tmp.write_text("".join(json.dumps(row) + "\n" for row in rows))
        tmp.replace(directory / f"{split}.jsonl")
    return directory
