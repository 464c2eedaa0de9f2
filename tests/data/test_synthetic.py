"""The offline demo's synthetic tasks: deterministic files, no test question in train, only characters the tiny
tokenizer knows, answers that follow from the question, and the `demo:` names the loader resolves."""

from __future__ import annotations

import json
import operator
import random
import re
from pathlib import Path

import pytest

from sftkey_trl.data.sources import load_source
from sftkey_trl.data.synthetic import (
    REMAINDER_DIVISORS,
    write_arithmetic_dataset,
    write_remainder_dataset,
)
from sftkey_trl.errors import SFTKeyError
from sftkey_trl.models.tiny import ALPHABET

WRITERS = {"arithmetic": write_arithmetic_dataset, "remainder": write_remainder_dataset}
OPS = {"+": operator.add, "-": operator.sub}
# What the README and the module docstring state: about half of the `demo:remainder` rows ask for a remainder,
# whose answer is never the reasoning's last value
REMAINDER_ROWS_SHARE = (0.48, 0.58)


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module", params=list(WRITERS))
def written(request, tmp_path_factory) -> tuple[str, Path]:
    name = request.param
    return name, WRITERS[name](tmp_path_factory.mktemp(name))


def solve(question: str) -> tuple[int, int | None, list[str]]:
    """Recompute a question independently of the generator: (value, divisor or None, expected reasoning lines)."""
    match = re.fullmatch(r"Compute (?:\((?P<inner>[^()]*)\) mod (?P<divisor>\d+)|(?P<plain>[^()]*))\.", question)
    assert match, question
    tokens = (match["inner"] or match["plain"]).split()
    value, lines = int(tokens[0]), []
    for op, operand in zip(tokens[1::2], tokens[2::2]):
        result = OPS[op](value, int(operand))
        lines.append(f"{value} {op} {operand} = {result}")
        value = result
    return value, int(match["divisor"]) if match["divisor"] else None, lines


def test_same_seed_same_files_other_seed_other_files(written, tmp_path):
    name, directory = written
    again = WRITERS[name](tmp_path / "again")
    other = WRITERS[name](tmp_path / "other", seed=1)
    for split in ("train", "test"):
        assert (again / f"{split}.jsonl").read_bytes() == (directory / f"{split}.jsonl").read_bytes()
        assert (other / f"{split}.jsonl").read_bytes() != (directory / f"{split}.jsonl").read_bytes()


def test_no_test_question_in_train(written):
    _, directory = written
    train, test = read(directory / "train.jsonl"), read(directory / "test.jsonl")
    assert len(train) >= 1000 and len(test) == 200
    assert not {row["question"] for row in test} & {row["question"] for row in train}


def test_every_character_is_in_the_tiny_alphabet(written):
    _, directory = written
    rows = read(directory / "train.jsonl") + read(directory / "test.jsonl")
    used = {char for row in rows for field in ("question", "reasoning", "answer") for char in row[field]}
    assert used <= set(ALPHABET), sorted(used - set(ALPHABET))


def test_answers_follow_from_the_question(written):
    name, directory = written
    for row in read(directory / "train.jsonl") + read(directory / "test.jsonl"):
        value, divisor, lines = solve(row["question"])
        assert row["reasoning"] == "\n".join(lines), row
        assert all(0 <= int(line.split()[-1]) <= (9 if name == "arithmetic" else 19) for line in lines), row
        if divisor is None:
            assert row["answer"] == str(value), row
        else:
            assert name == "remainder" and divisor in REMAINDER_DIVISORS, row
            assert row["answer"] == str(value % divisor), row


def test_remainder_share_is_as_stated(tmp_path):
    rows = read(write_remainder_dataset(tmp_path) / "train.jsonl")
    differs = [row for row in rows if row["answer"] != row["reasoning"].split()[-1]]
    asks = [row for row in rows if "mod" in row["question"]]
    assert differs == asks  # a remainder question never has the reasoning's last value as its answer
    low, high = REMAINDER_ROWS_SHARE
    assert low <= len(differs) / len(rows) <= high


def test_arithmetic_answers_copy_the_last_value(tmp_path):
    rows = read(write_arithmetic_dataset(tmp_path) / "train.jsonl")
    assert all(row["answer"] == row["reasoning"].split()[-1] for row in rows)


@pytest.mark.parametrize(
    ("name", "folder"), [("demo:arithmetic", "demo-arithmetic-v2"), ("demo:remainder", "demo-remainder-v1")]
)
def test_loader_resolves_demo_names(name, folder, sftkey_cache):
    test = load_source(name, None, "test")
    assert test.column_names == ["question", "reasoning", "answer"] and len(test) == 200
    assert test[0] == read(sftkey_cache / folder / "test.jsonl")[0]
    assert len(load_source(name, None, "train")) >= 1000


def test_loader_names_the_known_demo_datasets():
    with pytest.raises(SFTKeyError, match="demo:arithmetic, demo:remainder"):
        load_source("demo:remainders", None, "train")
    with pytest.raises(SFTKeyError, match="splits train and test"):
        load_source("demo:remainder", None, "validation")


def test_word_problems_are_deterministic_and_half_ask_one_step_past_the_reasoning(tmp_path):
    from sftkey_trl.data.word_problems import make_word_problem, write_word_problem_dataset

    rows = [make_word_problem(random.Random(0)) for _ in range(2)]
    assert rows[0] == rows[1]
    rng = random.Random(0)
    rows = [make_word_problem(rng) for _ in range(2000)]
    beyond = [r for r in rows if re.findall(r"\d+", r["reasoning"])[-1] != r["answer"]]
    assert 0.4 < len(beyond) / len(rows) < 0.6  # the module docstring says 48%
    assert all(r["answer"].isdigit() and 2 <= len(r["reasoning"].splitlines()) <= 3 for r in rows)
    directory = write_word_problem_dataset(tmp_path, num_train=50, num_test=20)
    questions = [json.loads(line)["question"] for name in ("train", "test")
                 for line in (directory / f"{name}.jsonl").read_text().splitlines()]  # fmt: skip
    assert len(questions) == len(set(questions)) == 70
