"""Synthetic reasoning tasks for the offline demo, written deterministically to local files.

- `arithmetic`: `Compute 7 + 2 - 4.`, worked left to right in [0, 9]; a converged tiny model solves it completely.
- `remainder`: `Compute (13 - 9 + 6 + 4) mod 6.`, worked in [0, 19]. In about half of the rows (53% of the default
  training file) the answer is a remainder the reasoning never writes down, so the answer tokens carry a computation
  of their own; a converged tiny model learns the reasoning but only some of the remainders.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

from ..files import write_jsonl

REMAINDER_DIVISORS = tuple(range(3, 10))
REMAINDER_SHARE = 2 / 3  # rows that draw a remainder question; it is kept when a divisor below the value exists


def make_arithmetic_example(rng: random.Random, steps: tuple[int, int] = (2, 3), max_value: int = 9) -> dict[str, str]:
    """One multi-step problem such as `Compute 7 + 2 - 4.`, worked left to right, staying in [0, max_value]."""
    value = rng.randint(1, max_value - 1)
    expression, lines, value = _chain(rng, value, steps, max_value, max_value)
    return {"question": f"Compute {expression}.", "reasoning": "\n".join(lines), "answer": str(value)}


def make_remainder_example(
    rng: random.Random, steps: tuple[int, int] = (3, 5), max_value: int = 19, max_operand: int = 9
) -> dict[str, str]:
    """One problem such as `Compute (13 - 9 + 6 + 4) mod 6.` (or `Compute 13 - 9 + 6.`): the reasoning stops at the
    chain's value; divisors are drawn below it, so a remainder never equals the value."""
    start = rng.randint(1, max_value - 1)
    expression, lines, value = _chain(rng, start, steps, max_value, max_operand)
    divisors = [divisor for divisor in REMAINDER_DIVISORS if divisor < value]
    if divisors and rng.random() < REMAINDER_SHARE:
        divisor = rng.choice(divisors)
        question, answer = f"Compute ({expression}) mod {divisor}.", value % divisor
    else:
        question, answer = f"Compute {expression}.", value
    return {"question": question, "reasoning": "\n".join(lines), "answer": str(answer)}


def _chain(
    rng: random.Random, value: int, steps: tuple[int, int], max_value: int, max_operand: int
) -> tuple[str, list[str], int]:
    """Add or subtract operands in [1, max_operand] from `value`, staying in [0, max_value]; one line per step."""
    expression = str(value)
    lines = []
    for _ in range(rng.randint(*steps)):
        if value == max_value or (value > 0 and rng.random() < 0.5):
            operand = rng.randint(1, min(value, max_operand))
            result, op = value - operand, "-"
        else:
            operand = rng.randint(1, min(max_value - value, max_operand))
            result, op = value + operand, "+"
        expression += f" {op} {operand}"
        lines.append(f"{value} {op} {operand} = {result}")
        value = result
    return expression, lines, value


def write_dataset(
    directory: str | Path,
    make_example: Callable[[random.Random], dict[str, str]],
    num_train: int,
    num_test: int,
    seed: int = 0,
) -> Path:
    """Write `train.jsonl` and `test.jsonl` (question/reasoning/answer) deterministically, questions unique across
    both files; return the folder."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    seen: set[str] = set()
    for split, count in {"train": num_train, "test": num_test}.items():
        rows = []
        while len(rows) < count:
            example = make_example(rng)
            if example["question"] in seen:
                continue
            seen.add(example["question"])
            rows.append(example)
        write_jsonl(directory / f"{split}.jsonl", rows)  # several ranks may build it at once
    return directory


def write_arithmetic_dataset(
    directory: str | Path, num_train: int = 2000, num_test: int = 200, seed: int = 0, max_value: int = 9
) -> Path:
    """The `demo:arithmetic` files: 2,000 training and 200 test problems in [0, max_value]."""
    return write_dataset(
        directory, lambda rng: make_arithmetic_example(rng, max_value=max_value), num_train, num_test, seed
    )


def write_remainder_dataset(directory: str | Path, num_train: int = 1000, num_test: int = 200, seed: int = 0) -> Path:
    """The `demo:remainder` files: 1,000 training and 200 test problems (sized for a converged run on a CPU)."""
    return write_dataset(directory, make_remainder_example, num_train, num_test, seed)
