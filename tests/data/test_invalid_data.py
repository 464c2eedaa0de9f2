"""Training data that leaves nothing to train on ends in one line naming the problem and the fix (exit 2), never a
traceback, and writes nothing: every row invalid (with `on_invalid: error` the invalid-row report, with `skip` the
same report saying nothing is left), an empty file, and a hold-out that takes the only row."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from sftkey_trl.run.cli import main

GOOD = {"question": "Compute 1 + 1.", "reasoning": "1 + 1 = 2", "answer": "2"}
TAGGED = [  # data that already carries the response tags
    {**GOOD, "reasoning": "<Thinking>1 + 1 = 2</Thinking>"},
    {**GOOD, "answer": "<Answer>2</Answer>"},
    {**GOOD, "reasoning": "1 + 1 = 2</Thinking>\n<Answer>2"},
]
NO_ANSWER = [{**GOOD, "answer": ""}, {**GOOD, "answer": None}, {"question": "q", "reasoning": "r", "answer": "  "}]


@pytest.fixture(autouse=True)
def quiet_progress_bars(tiny_model_dir):
    """The test reads stderr for the one error line alone: the demo model is built beforehand (the fixture builds it
    where the demo looks), and `datasets` draws no progress bars there."""
    import datasets

    was_enabled = not datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    yield
    if was_enabled:
        datasets.enable_progress_bars()


def write(path: Path, rows: list[dict] | None = None, text: str | None = None) -> str:
    path.write_text(text if text is not None else "".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def run(tmp_path: Path, capsys, *args: str) -> str:
    """Run `recipes/run.py`'s main in-process; return its one stderr line after checking exit 2 and no output."""
    out = tmp_path / "out"
    evaluation = write(tmp_path / "eval.jsonl", [GOOD])
    with pytest.raises(SystemExit) as exit_:
        main(
            [
                "--output_dir",
                str(out),
                "--eval_dataset_name",
                evaluation,
                "--eval_fraction",
                "0",
                "--select_on_test",
                "true",
                *args,
            ]
        )
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    assert not out.exists(), sorted(out.rglob("*"))
    return err


@pytest.mark.parametrize("on_invalid", ["error", "skip"])
@pytest.mark.parametrize(
    "rows, report, fix",
    [
        (TAGGED, r"3 of 3 training rows are invalid: contains_tags x3 \(rows 0, 1, 2\)", r"strip them"),
        (NO_ANSWER, r"3 of 3 training rows are invalid: empty_answer x3 \(rows 0, 1, 2\)", r"`dataset_format`"),
    ],
    ids=["tags_already_in_data", "no_answers"],
)
def test_every_row_invalid_gives_the_report_and_no_traceback(tmp_path, capsys, rows, report, fix, on_invalid):
    data = write(tmp_path / "train.jsonl", rows)
    err = run(tmp_path, capsys, "--dataset_name", data, "--on_invalid", on_invalid)
    assert re.search(report, err) and re.search(fix, err), err
    assert f"no row is left to train on (on_invalid: {on_invalid})" in err
    assert "on_invalid: skip` to drop" not in err  # skipping cannot help when nothing is left


def test_some_rows_invalid_still_offers_skip(tmp_path, capsys):
    data = write(tmp_path / "train.jsonl", [GOOD, TAGGED[0], GOOD])
    err = run(tmp_path, capsys, "--dataset_name", data)
    assert err.endswith("contains_tags x1 (rows 1); fix the data or set `on_invalid: skip` to drop them"), err


@pytest.mark.parametrize(
    "text, message",
    [
        ("", r"`dataset_name`: `.*train.jsonl` is empty; point `dataset_name` at a file with at least one row"),
        ("\n \n", r"`dataset_name`: `.*train.jsonl` is empty; point `dataset_name` at a file"),
        ("[]", r"`dataset_name`: could not read `.*train.json` \(.*\); check that it is a valid .json with at least"),
    ],
    ids=["zero_bytes", "blank_lines", "no_rows"],
)
def test_empty_file_is_one_line(tmp_path, capsys, text, message):
    name = "train.json" if text.startswith("[") else "train.jsonl"
    err = run(tmp_path, capsys, "--dataset_name", write(tmp_path / name, text=text))
    assert re.search(message, err), err


def test_empty_file_is_refused_by_the_dry_run_too(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(
            [
                "--dry_run",
                "--dataset_name",
                write(tmp_path / "train.jsonl", text=""),
                "--eval_fraction",
                "0",
                "--select_on_test",
                "true",
            ]
        )
    assert "is empty" in capsys.readouterr().err


def test_one_row_with_a_hold_out_is_one_line(tmp_path, capsys):
    data = write(tmp_path / "train.jsonl", [GOOD])
    err = run(tmp_path, capsys, "--dataset_name", data, "--eval_fraction", "0.2")
    assert re.search(r"`eval_fraction: 0.2` of 1 training rows leaves no rows on one side; use more data", err), err
