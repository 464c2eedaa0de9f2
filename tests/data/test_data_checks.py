"""Data checks before training: evaluation data that adapts to nothing, a `max_length` that cuts rows, a
`max_new_tokens` below the reference responses; `--dry_run` reports them from local data, a real run stops or
warns before any stage trains."""

from __future__ import annotations

import json
import re

import pytest
from conftest import ROOT

from sftkey_trl.data.loading import length_notes
from sftkey_trl.run import cli

DEMO = str(ROOT / "recipes/demo/sftkey_tiny.yaml")


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_length_notes_warn_above_five_percent():
    assert length_notes([10] * 100, [5] * 100, 20, 8) == []
    notes = length_notes([10] * 90 + [30] * 10, [5] * 90 + [9] * 10, 20, 8)
    assert "`max_length: 20` cuts 10% of the training rows" in notes[0] and "30 tokens" in notes[0]
    assert "`max_new_tokens: 8` is below 10% of the reference responses" in notes[1]


@pytest.mark.slow
def test_dry_run_reports_lengths_from_the_local_data(capsys):
    assert cli.main(["--config", DEMO, "--dry_run", "--max_new_tokens", "12"]) == 0
    out = capsys.readouterr().out
    assert "evaluation rows: 200 of 200 usable" in out
    assert re.search(r"`max_new_tokens: 12` is below \d+% of the reference responses", out), out


@pytest.mark.slow
def test_a_max_length_that_cuts_most_answers_stops_the_dry_run_as_it_stops_a_real_run(capsys):
    """The demo's rows are 64 or 78 tokens: `max_length: 40` cuts every answer, which a real run refuses before
    training (and the dry run only noted)."""
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--config", DEMO, "--dry_run", "--max_length", "40"])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_.value.code == 2
    cut = "`max_length: 40` cuts the answer off 1800 of 1800 examples (100%; the longest has 78 tokens)"
    assert error == f"error: {cut}; raise `max_length`"


def test_an_evaluation_set_the_adapter_empties_stops_before_training(tmp_path, capsys):
    train = write_jsonl(tmp_path / "train.jsonl", [{"question": f"q{i}", "answer": f"{i} + 1 = {i + 1}\n#### {i + 1}"}
                                                   for i in range(8)])  # fmt: skip
    other = write_jsonl(tmp_path / "eval.jsonl", [{"question": "q", "answer": "4"}] * 5)  # no `#### N` line
    args = ["--config", DEMO, "--dataset_name", train, "--dataset_format", "gsm8k", "--eval_dataset_name", other,
            "--eval_fraction", "0", "--select_on_test", "true", "--output_dir", str(tmp_path / "out")]  # fmt: skip
    for flags in (["--dry_run"], []):
        with pytest.raises(SystemExit) as exit_:
            cli.main(args + flags)
        assert exit_.value.code == 2
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
        assert (
            len(errors) == 1 and "none of its 5 rows is usable by the `gsm8k` adapter (no_final_answer x5" in errors[0]
        )
    assert not (tmp_path / "out" / "sft").exists()  # nothing trained
