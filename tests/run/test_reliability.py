"""Reliability: bad input is a one-line error before anything is written; a killed run resumes to the same result;
a finished run is not retrained; the same seed gives the same numbers."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import DIVERGING_RATE
from real_launches import kill_when, run_to_end, start_run
from safetensors.torch import load_file

from sftkey_trl.run.cli import main
from sftkey_trl.train.keep_best import holds_keep_best_state

SMALL = [
    "--max_train_samples", "192", "--max_eval_samples", "48", "--max_new_tokens", "40", "--save_strategy", "steps",
    "--save_steps", "4", "--logging_steps", "4",
    "--stages", "[{name: sft, loss_on: completion, num_train_epochs: 2}, {name: key, loss_on: key}]",
]  # fmt: skip


def snapshot(directory: Path) -> dict[str, float]:
    return {str(p.relative_to(directory)): p.stat().st_mtime_ns for p in directory.rglob("*")}


@pytest.fixture()
def previous_run(tmp_path):
    """An output_dir holding a previous run's files, which no failed start may touch."""
    out = tmp_path / "previous"
    (out / "sft").mkdir(parents=True)
    (out / "sft" / "model.safetensors").write_text("weights")
    (out / "manifest.json").write_text(json.dumps({"stages": {"sft": {"status": "done", "hash": "x"}}}))
    return out


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


GOOD = {"question": "Compute 1 + 1.", "reasoning": "1 + 1 = 2", "answer": "2"}


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing_file", "file `.*nope.jsonl` does not exist"),
        ("missing_columns", r"needs column\(s\) `reasoning`.*found: `question`, `answer`"),
        ("empty_fields", r"invalid: empty_answer x2 \(rows 1, 3\)"),
        ("tags_in_data", r"contains_tags x1 \(rows 0\)"),
        ("short_max_length", r"`max_length: 20` cuts the answer off 4 of 4 examples"),
        ("hub_dataset_offline", "could not be loaded from the Hugging Face Hub.*local .jsonl"),
        ("hub_model_offline", "model `nobody/no-such-model` could not be loaded.*local folder"),
        ("qlora_without_peft", "set `use_peft: true`"),
        ("bad_stage_value", "`loss_on: answer` is not valid"),
        ("unknown_key", "unknown command-line option `--learnin_rate`"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, previous_run, capsys, case, message):
    args = {
        "missing_file": ["--dataset_name", str(tmp_path / "nope.jsonl")],
        "missing_columns": ["--dataset_name", write_jsonl(tmp_path / "a.jsonl", [{"question": "q", "answer": "1"}])],
        "empty_fields": [
            "--dataset_name",
            write_jsonl(tmp_path / "b.jsonl", [GOOD, {**GOOD, "answer": ""}, GOOD, {**GOOD, "answer": None}]),
        ],
        "tags_in_data": [
            "--dataset_name",
            write_jsonl(tmp_path / "c.jsonl", [{**GOOD, "reasoning": "x</Thinking>"}, GOOD]),
        ],
        "short_max_length": ["--dataset_name", write_jsonl(tmp_path / "d.jsonl", [GOOD] * 4), "--max_length", "20"],
        "hub_dataset_offline": ["--dataset_name", "nobody/no-such-dataset"],
        "hub_model_offline": ["--model_name_or_path", "nobody/no-such-model"],
        "qlora_without_peft": ["--load_in_4bit", "true", "--max_train_samples", "8"],
        "bad_stage_value": ["--stages", "[{name: a, loss_on: answer}]"],
        "unknown_key": ["--learnin_rate", "1"],
    }[case]
    before = snapshot(previous_run)
    with pytest.raises(SystemExit) as exit_:
        main(["--output_dir", str(previous_run), "--eval_fraction", "0", "--select_on_test", "true", *args])
    assert exit_.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("error: ") and re.search(message, error), error
    assert snapshot(previous_run) == before


def test_qlora_without_bitsandbytes_is_refused(monkeypatch):
    import importlib.util

    from trl import ModelConfig

    from sftkey_trl.errors import SFTKeyError
    from sftkey_trl.recipe.checks import check_model

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "bitsandbytes" else real(name))
    with pytest.raises(SFTKeyError, match="needs bitsandbytes"):
        check_model(ModelConfig(model_name_or_path="x", load_in_4bit=True, use_peft=True))


def test_trust_remote_code_is_off_unless_the_recipe_says_so():
    from sftkey_trl.recipe.parsing import parse_config

    assert parse_config([]).training.trust_remote_code is False
    assert parse_config(["--trust_remote_code", "true"]).training.trust_remote_code is True


def checkpoints(out: Path, stage: str) -> list[Path]:
    return list((out / stage / "checkpoints").glob("checkpoint-*/trainer_state.json"))


KILL_POINTS = {
    "inside_stage_1": lambda out: len(checkpoints(out, "sft")) >= 1,
    "inside_stage_2": lambda out: len(checkpoints(out, "key")) >= 1,
    "during_evaluation": lambda out: (
        (out / "key" / "model.safetensors").exists() and not (out / "key" / "predictions.jsonl").exists()
    ),
}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "run"
    run_to_end(out, SMALL)
    return out


def outcome(out: Path) -> tuple[dict, dict]:
    results = json.loads((out / "results.json").read_text())
    metrics = {name: {k: v for k, v in stage.items() if k != "training"} for name, stage in results["stages"].items()}
    return metrics, load_file(out / "key" / "model.safetensors")


@pytest.mark.e2e
@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_sigkill_then_rerun_gives_the_uninterrupted_result(tmp_path, reference, point):
    out = tmp_path / "run"
    kill_when(out, KILL_POINTS[point], SMALL)
    stderr = run_to_end(out, SMALL)
    if point != "during_evaluation":
        assert "resuming from" in stderr
    expected_metrics, expected_weights = outcome(reference)
    metrics, weights = outcome(out)
    assert metrics == expected_metrics
    for name, tensor in expected_weights.items():
        torch.testing.assert_close(weights[name], tensor, rtol=1e-5, atol=1e-6)


@pytest.mark.e2e
def test_rerun_of_a_finished_run_is_a_no_op(reference):
    before = snapshot(reference / "key")
    stderr = run_to_end(reference, SMALL)
    assert "stage sft is done with the same configuration: skipped" in stderr
    assert "stage key is done with the same configuration: skipped" in stderr
    assert snapshot(reference / "key") == before


@pytest.mark.e2e
def test_same_seed_same_numbers_and_changed_config_is_refused(tmp_path, reference, capsys):
    out = tmp_path / "again"
    run_to_end(out, SMALL)
    losses = [
        [e.get("loss") for e in json.loads((run / "sft" / "log_history.json").read_text())] for run in (reference, out)
    ]
    assert losses[0] == losses[1]
    assert outcome(out)[0] == outcome(reference)[0]
    with pytest.raises(SystemExit):
        main(["--output_dir", str(out), *SMALL[:-2], "--learning_rate", "1e-4", *SMALL[-2:]])
    error = capsys.readouterr().err
    assert "stage `sft`" in error and "training.learning_rate" in error and "--restart_from sft" in error


KEEP_BEST = [
    "--max_train_samples", "64", "--max_eval_samples", "8", "--max_new_tokens", "32", "--save_strategy", "steps",
    "--save_steps", "2", "--eval_steps", "2", "--logging_steps", "2",
    "--stages", "[{name: sft, loss_on: completion, num_train_epochs: 3, keep_best: true, patience: 2}]",
]  # fmt: skip
RUN_SPECIFIC = {"train_seconds", "tokens_per_second", "resumed_from"}  # a resumed stage's train_loss is the whole's


def kept(out: Path) -> tuple[dict, dict]:
    """The stage's results.json entry without what depends on the run rather than the result, and its weights."""
    entry = json.loads((out / "results.json").read_text())["stages"]["sft"]
    entry["training"] = {k: v for k, v in entry["training"].items() if k not in RUN_SPECIFIC}
    return entry, load_file(out / "sft" / "model.safetensors")


@pytest.mark.e2e
def test_keep_best_stage_killed_after_an_evaluation_resumes_to_the_uninterrupted_result(tmp_path):
    """Its history, best step and patience count come back from the checkpoint, so the rerun stops and keeps
    exactly what the uninterrupted run does."""
    reference = tmp_path / "reference"
    run_to_end(reference, KEEP_BEST)
    out = tmp_path / "killed"
    checkpoints = out / "sft" / "checkpoints"
    kill_when(out, lambda out: any(holds_keep_best_state(p) for p in checkpoints.glob("checkpoint-*")), KEEP_BEST)
    run_to_end(out, KEEP_BEST)
    assert json.loads((out / "results.json").read_text())["stages"]["sft"]["training"]["resumed_from"]
    expected, expected_weights = kept(reference)
    entry, weights = kept(out)
    assert len(expected["training"]["keep_best"]["history"]) >= 2
    assert entry["training"].pop("train_loss") == pytest.approx(expected["training"].pop("train_loss"), rel=1e-6)
    assert entry == expected
    assert weights.keys() == expected_weights.keys()
    for name, tensor in expected_weights.items():
        torch.testing.assert_close(weights[name], tensor, rtol=1e-5, atol=1e-6)
    assert not (out / "sft" / "best").exists()


def test_invalid_rows_are_named_by_their_row_in_the_file_after_a_hold_out(tmp_path, capsys):
    rows = [{**GOOD, "answer": "" if i in (3, 17) else "2"} for i in range(20)]
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    with pytest.raises(SystemExit):
        main(["--output_dir", str(tmp_path / "out"), "--dataset_name", data, "--eval_fraction", "0.25"])
    error = capsys.readouterr().err
    reported = {int(i) for i in re.search(r"empty_answer x\d \(rows ([\d, ]+)\)", error).group(1).split(", ")}
    assert reported and reported <= {3, 17}


DIVERGING = [
    "--max_train_samples", "64", "--eval_fraction", "0", "--eval_after_stages", "false", "--logging_steps", "1",
    "--save_strategy", "steps", "--save_steps", "1",
    "--stages", "[{name: sft, loss_on: completion, num_train_epochs: 2}]",
]  # fmt: skip


@pytest.mark.e2e
def test_a_diverging_stage_exits_non_zero_with_one_line_and_nothing_calls_it_trained(tmp_path):
    """A diverging learning rate makes the demo's loss NaN from step 3; Trainer's NaN filter logged a loss of 0
    and the run reported `train_loss` 0.0 with exit 0. The line's fix (a lower rate, `--restart_from`) then works."""
    out = tmp_path / "run"
    process = start_run(out, [*DIVERGING, "--learning_rate", DIVERGING_RATE])
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 2, stderr[-3000:]
    error = stderr.strip().splitlines()[-1]
    match = re.fullmatch(r"error: stage `sft` diverged at step (\d+) of 8: .* rerun with `--restart_from sft`", error)
    assert match, error
    step = int(match[1])
    results = json.loads((out / "results.json").read_text()) if (out / "results.json").exists() else {"stages": {}}
    assert "sft" not in results["stages"]
    assert json.loads((out / "manifest.json").read_text())["stages"]["sft"]["status"] not in ("trained", "done")
    assert not (out / "sft" / "model.safetensors").exists() and not (out / "sft" / "log_history.json").exists()
    checkpoints = sorted(int(p.name.split("-")[1]) for p in (out / "sft" / "checkpoints").glob("checkpoint-*"))
    assert checkpoints and max(checkpoints) < step  # none holds the diverged step's weights

    # The same command again resumes from the last checkpoint (finite weights) and stops at the same step
    process = start_run(out, [*DIVERGING, "--learning_rate", DIVERGING_RATE])
    _, again = process.communicate(timeout=600)
    assert process.returncode == 2 and "resuming from" in again and again.strip().splitlines()[-1] == error

    run_to_end(out, [*DIVERGING, "--learning_rate", "1e-3", "--restart_from", "sft"])
    training = json.loads((out / "results.json").read_text())["stages"]["sft"]["training"]
    assert training["optimizer_steps"] == 8 and 0 < training["train_loss"] < 10


@pytest.mark.slow
def test_a_restarted_stage_that_diverges_leaves_no_earlier_result_of_it(tmp_path, capsys, monkeypatch):
    """`--restart_from sft` drops the results of every stage it retrains on disk before training: when the retrained
    stage then diverges, results.json must not still report the earlier stages (or a summary read from them)."""
    monkeypatch.setenv("SFTKEY_CACHE", str(tmp_path / "cache"))  # the demo model as a run builds it
    out = str(tmp_path / "run")
    two = "[{name: sft, loss_on: completion, num_train_epochs: 2%s}, {name: key, loss_on: key, num_train_epochs: 1}]"
    base = DIVERGING[: DIVERGING.index("--stages")]
    assert main(["--output_dir", out, *base, "--stages", two % ""]) == 0
    assert {"sft", "key"} <= set(json.loads((tmp_path / "run" / "results.json").read_text())["stages"])
    with pytest.raises(SystemExit):
        main(
            [
                "--output_dir",
                out,
                *base,
                "--stages",
                two % f", learning_rate: {DIVERGING_RATE}",
                "--restart_from",
                "sft",
            ]
        )
    assert "diverged" in capsys.readouterr().err
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert not results["stages"] and "summary" not in results
