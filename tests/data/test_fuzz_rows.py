"""Property-based test of the data path: generated JSONL and CSV files (missing, null, non-string, nested, very long,
binary and duplicate fields; files cut off mid-row or not UTF-8) give the invalid-row report or a one-line error,
never a traceback, both under `--dry_run` and through the loading and validation a real run does (`prepare_data`).
With `on_invalid: skip` exactly the usable rows are kept; one small real training run shows that they train.

Bounded for CI (`FUZZ` below, derandomized so every run draws the same files). The examples the fuzzing found are
kept as regular cases at the end.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from sftkey_trl.data.formatting import Formatter
from sftkey_trl.data.loading import prepare_data
from sftkey_trl.errors import SFTKeyError
from sftkey_trl.run import cli
from sftkey_trl.train.modeling import load_tokenizer

settings.register_profile(
    "sftkey_fuzz_rows",
    max_examples=60,
    deadline=None,  # correctness, not speed (a dry run of a few rows takes about 0.1 s)
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
FUZZ = settings.get_profile("sftkey_fuzz_rows")
FIELDS = ("question", "reasoning", "answer")
GOOD = {"question": "Compute 1 + 1.", "reasoning": "1 + 1 = 2", "answer": "2"}
MISSING = object()  # the field is left out of the row

TEXT = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), min_size=1, max_size=20)
STRING_VALUES = st.one_of(
    TEXT,
    st.sampled_from(["", "  ", "x" * 20000, "<Thinking>", "</Answer>", "a\nb", "é", "\u0000", "\x7f"]),
    st.none(),
    st.just(MISSING),
)
FIELD_VALUES = st.one_of(
    STRING_VALUES,
    st.integers(-(10**20), 10**20),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.lists(st.one_of(st.integers(), TEXT), max_size=2),
    st.dictionaries(TEXT, st.one_of(st.integers(), TEXT, st.none()), max_size=2),
)
# Columns of strings (and nulls) mostly: a column that mixes types is refused by the reader as a whole
ROWS = st.one_of(
    *[st.lists(st.fixed_dictionaries({name: values for name in FIELDS}), min_size=1, max_size=6)
      for values in (STRING_VALUES, STRING_VALUES, FIELD_VALUES)]
)  # fmt: skip
GOOD_ROWS = st.lists(st.just(GOOD), min_size=0, max_size=4)


@pytest.fixture(autouse=True)
def quiet_progress_bars(tiny_model_dir):
    """The demo model is built before the first example; `datasets` draws no progress bars in the captured output."""
    import datasets

    was_enabled = not datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    yield
    if was_enabled:
        datasets.enable_progress_bars()


def jsonl_bytes(rows: list[dict], duplicate: bool) -> bytes:
    lines = []
    for row in rows:
        items = [(k, v) for k, v in row.items() if v is not MISSING]
        text = "{" + ", ".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in items)
        if duplicate and items:  # a field given twice: JSON readers keep the last
            text += (", " if items else "") + f"{json.dumps(items[0][0])}: {json.dumps(items[0][1])}"
        lines.append(text + "}\n")
    return "".join(lines).encode("utf-8", "surrogatepass")


def csv_bytes(rows: list[dict]) -> bytes:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(FIELDS)
    for row in rows:
        writer.writerow(["" if row[name] in (None, MISSING) else row[name] for name in FIELDS])
    return out.getvalue().encode("utf-8", "surrogatepass")


@st.composite
def data_files(draw) -> tuple[str, bytes, list[dict]]:
    """(suffix, file bytes, the rows as written): rows mixed with good ones, sometimes damaged as a file."""
    rows = draw(ROWS) + draw(GOOD_ROWS)
    rows = draw(st.permutations(rows))
    suffix = draw(st.sampled_from([".jsonl", ".csv"]))
    data = jsonl_bytes(rows, draw(st.booleans())) if suffix == ".jsonl" else csv_bytes(rows)
    damage = draw(st.sampled_from(["none"] * 5 + ["truncated", "not_utf8", "binary"]))
    if damage == "truncated":
        data = data[: draw(st.integers(1, max(1, len(data) - 1)))]
    elif damage == "not_utf8":
        at = draw(st.integers(0, len(data)))
        data = data[:at] + b"\xff\xfe\x80" + data[at:]
    elif damage == "binary":
        data = bytes(draw(st.binary(min_size=1, max_size=64))) + data
    return suffix, data, rows if damage == "none" else []


def usable(row: dict, suffix: str) -> bool:
    """A row the generic adapter can use: three non-empty fields of text. A CSV cell is text as written (`str()` of
    the value here); in JSON a number counts as its text, while a list, a mapping, true/false or an infinite number
    is not text and NaN is a missing value (README)."""
    for name in FIELDS:
        value = row[name]
        if value is MISSING or value is None:
            return False
        if suffix == ".jsonl" and isinstance(value, (bool, list, dict)):
            return False
        if suffix == ".jsonl" and isinstance(value, float) and (value != value or abs(value) == float("inf")):
            return False
        if not str(value).strip():
            return False
    return True


def recipe_argv(path: str, on_invalid: str) -> list[str]:
    """The demo recipe on the file at `path`."""
    out = str(Path(path).parent / "out")
    return ["--dataset_name", path, "--eval_fraction", "0", "--select_on_test", "true",
            "--eval_dataset_name", "demo:arithmetic", "--max_eval_samples", "4", "--on_invalid", on_invalid,
            "--output_dir", out]  # fmt: skip


def dry_run(argv: list[str]) -> str | None:
    """`--dry_run` in-process: None when it passes, else its one error line."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            cli.main(["--dry_run", *argv])
    except SystemExit as exit_:
        line = err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else ""
        assert exit_.code == 2 and line.startswith("error: "), (exit_.code, err.getvalue()[-2000:])
        return line
    return None


def prepare(argv: list[str]):
    """What a real run does with the data before the model is loaded: the checks, then loading and validation."""
    recipe, _ = cli.load_checked_recipe(cli.run_options(argv)[1])
    tokenizer = load_tokenizer(recipe.model, recipe.training)
    formatter = Formatter(tokenizer, recipe.script, recipe.training.eos_token)
    return prepare_data(recipe.script, recipe.training, recipe.stages, tokenizer, formatter, cache_dir=None)


@pytest.mark.slow
@FUZZ
@given(file=data_files(), on_invalid=st.sampled_from(["error", "skip"]))
def test_generated_rows_give_the_report_or_one_line(file, on_invalid):
    suffix, data, rows = file
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"train{suffix}"
        path.write_bytes(data)
        argv = recipe_argv(str(path), on_invalid)
        error = dry_run(argv)
        assert error is None or "\n" not in error
        try:
            prepared = prepare(argv)
        except SFTKeyError as refusal:
            message = str(refusal)
            assert "\n" not in message, message
            assert error == f"error: {message}", (error, message)  # the dry run runs the same row checks
            kinds = {"training rows are invalid": "the invalid-row report", "could not read": "file unreadable",
                     "not UTF-8": "not UTF-8", "needs column": "a column missing"}  # fmt: skip
            kind = next((what for part, what in kinds.items() if part in message), message)
            event(f"refused ({'--dry_run too' if error else 'real run only'}): {kind}")
            if rows and not any(usable(row, suffix) for row in rows):
                assert any(part in message for part in ("no row is left", "could not read", "needs column")), message
            if on_invalid == "skip" and rows and suffix == ".jsonl" and any(usable(row, suffix) for row in rows):
                # only the tokenizer (unknown characters) or the reader (mixed column types) can refuse these
                assert "unknown_characters" in message or "could not read" in message, message
            return
        assert error is None, f"--dry_run refused what a real run accepts: {error}"
        kept = set(prepared.train["index"])
        event(f"prepared ({'all rows' if not prepared.report.total else 'invalid rows skipped'})")
        if rows:
            assert kept <= {index for index, row in enumerate(rows) if usable(row, suffix)}, "an unusable row was kept"
            if on_invalid == "error":
                assert len(kept) == len(rows) and prepared.report.total == 0
            else:
                assert len(kept) + prepared.report.total == len(rows)


# --------------------------------------------------------------------------------------------------
# Regular cases


@pytest.mark.slow
def test_skip_trains_on_the_valid_rows(tmp_path, capsys):
    """A real (tiny) training run with `on_invalid: skip`: the broken rows are reported and dropped, the rest train."""
    rows = [GOOD] * 6 + [{**GOOD, "answer": None}, {"question": "q", "answer": "2"}, {**GOOD, "reasoning": " "}]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "out"
    argv = [*recipe_argv(str(path), "skip"), "--output_dir", str(out), "--eval_after_stages", "false",
            "--stages", "[{name: sft, loss_on: completion, max_steps: 2}]", "--per_device_train_batch_size", "4",
            "--save_strategy", "no", "--logging_steps", "1"]  # fmt: skip
    assert cli.main(argv) == 0
    history = json.loads((out / "sft" / "log_history.json").read_text())
    assert [entry["loss"] for entry in history if "loss" in entry], history


def test_a_file_that_is_not_utf8_is_one_line(tmp_path):
    """Found by the fuzzing: the blank-file check decoded the file as text (UnicodeDecodeError)."""
    path = tmp_path / "train.jsonl"
    path.write_bytes(b'\xff\xfe\x80{"question": null, "answer": null}\n')
    argv = recipe_argv(str(path), "error")
    assert "is not UTF-8 text (byte 0xff on line 1); save it as UTF-8" in dry_run(argv)
    with pytest.raises(SFTKeyError, match=r"`dataset_name`: .* is not UTF-8 text \(byte 0xff on line 1\)"):
        prepare(argv)


def test_dry_run_with_no_usable_training_row(tmp_path):
    """Found by the fuzzing: the dry run's length checks tokenised an empty list (IndexError); now the dry run runs
    the real run's row checks and gives its invalid-row report, line for line."""
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"question": "0", "reasoning": None, "answer": "0"}) + "\n")
    argv = recipe_argv(str(path), "skip")
    with pytest.raises(SFTKeyError, match=r"1 of 1 training rows are invalid: empty_reasoning x1 \(rows 0\)") as real:
        prepare(argv)
    assert dry_run(argv) == f"error: {real.value}"
