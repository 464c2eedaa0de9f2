"""Validation in prepare_data: a row the tokenizer cannot represent (it produces the unk token) is an invalid row,
counted by reason with its row index; `on_invalid: error` stops, `skip` drops and logs it."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import pytest
from conftest import script_args
from datasets import Dataset

from sftkey_trl.data import loading, sources
from sftkey_trl.data.formatting import Formatter
from sftkey_trl.data.loading import prepare_data
from sftkey_trl.errors import SFTKeyError
from sftkey_trl.train.objectives import Stage

GOOD = {"question": "Compute 1 + 1.", "reasoning": "1 + 1 = 2", "answer": "2"}
ROWS = [
    GOOD,
    {**GOOD, "question": "Compute ½ + ½."},  # `½` is not in the demo tokenizer's alphabet
    GOOD,
    {**GOOD, "reasoning": "1 + 1 = 2 ✓"},
    {**GOOD, "question": "What does <unk> mean here?"},  # the unk token written out is represented as such
]
STAGES = [Stage(name="sft", loss_on="completion"), Stage(name="key", loss_on="key")]


def prepare(tokenizer, path, on_invalid):
    args = script_args(dataset_name=str(path), on_invalid=on_invalid)
    training_args = SimpleNamespace(seed=0, max_length=None)
    return prepare_data(args, training_args, STAGES, tokenizer, Formatter(tokenizer, args), cache_dir=None)


@pytest.fixture()
def data_file(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    return path


def test_unknown_characters_stop_the_run_with_their_rows(char_tokenizer, data_file):
    with pytest.raises(SFTKeyError) as info:
        prepare(char_tokenizer, data_file, "error")
    message = str(info.value)
    assert "2 of 5 training rows are invalid: unknown_characters x2 (rows 1, 3)" in message
    assert "on_invalid: skip" in message and "\n" not in message


def test_unknown_characters_are_skipped_and_logged(char_tokenizer, data_file, caplog):
    with caplog.at_level(logging.WARNING, logger="sftkey_trl.data.loading"):
        data = prepare(char_tokenizer, data_file, "skip")
    assert data.train["index"] == [0, 2, 4]
    assert data.report.counts == {"unknown_characters": 2}
    assert "unknown_characters x2 (rows 1, 3)" in caplog.text
    unk = char_tokenizer.unk_token_id
    assert [ids.count(unk) for ids in data.train["input_ids"]] == [0, 0, 1]


def test_a_tokenizer_without_unknown_tokens_keeps_every_row(bpe_tokenizer, data_file):
    data = prepare(bpe_tokenizer, data_file, "error")  # byte-level BPE represents every character
    assert data.train["index"] == [0, 1, 2, 3, 4] and data.report.total == 0


def test_the_tokenized_cache_is_written_whole_and_read_back(char_tokenizer, data_file, tmp_path, monkeypatch):
    args = script_args(dataset_name=str(data_file), on_invalid="skip")
    training_args = SimpleNamespace(seed=0, max_length=None)
    cache = tmp_path / "cache"
    first = prepare_data(args, training_args, STAGES, char_tokenizer, Formatter(char_tokenizer, args), cache)
    assert [path.name for path in cache.iterdir()] == [f"tokenized-{first.data_hash}"]  # no temporary folder left
    monkeypatch.setattr(loading, "tokenize_rendered", None)  # a second run must read the cache
    second = prepare_data(args, training_args, STAGES, char_tokenizer, Formatter(char_tokenizer, args), cache)
    assert second.train["index"] == first.train["index"] == [0, 2, 4]
    assert second.train["input_ids"] == first.train["input_ids"]


def prepared_rows(tokenizer, path, on_invalid="error"):
    data = prepare(tokenizer, path, on_invalid)
    return [tokenizer.decode(ids) for ids in data.train["input_ids"]], data


def test_a_non_text_answer_is_refused_with_its_row_not_trained_as_its_repr(char_tokenizer, tmp_path):
    path = tmp_path / "rows.jsonl"
    rows = [GOOD, {**GOOD, "answer": [2]}, {**GOOD, "answer": 2}]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(SFTKeyError, match=r"1 of 3 training rows are invalid: non_text_answer x1 \(rows 1\)"):
        prepare(char_tokenizer, path, "error")
    texts, data = prepared_rows(char_tokenizer, path, "skip")
    assert data.train["index"] == [0, 2] and all("<Answer>2</Answer>" in text for text in texts)


def test_a_csv_is_read_as_the_text_it_holds(char_tokenizer, tmp_path):
    """pandas' type inference read `007` as 7, `2.50` as 2.5, `NA` as a missing value and a True/False column as
    booleans."""
    path = tmp_path / "rows.csv"
    path.write_text(
        "\ufeffquestion,reasoning,answer,flag\n"
        "Compute 3 + 4.,3 + 4 = 007,007,True\nCompute 1 + 1.5.,1 + 1.5 = 2.50,2.50,False\nName it.,It is NA.,NA,True\n"
    )
    texts, _ = prepared_rows(char_tokenizer, path)
    assert all(
        ["<Answer>007</Answer>" in texts[0], "<Answer>2.50</Answer>" in texts[1], "<Answer>NA</Answer>" in texts[2]]
    )


ROW = b'{"question": "q", "reasoning": "r", "answer": "1"}'
BAD_ROW = b'{"question": "q", "reasoning": "r \xff", "answer": "1"}'


@pytest.mark.parametrize(
    "suffix, content",
    [
        (".jsonl", ROW + b"\n" + BAD_ROW + b"\n"),
        (".json", b"[" + ROW + b",\n" + BAD_ROW + b"]"),
        (".csv", b"question,reasoning,answer\nq,r \xff,1\nq,r,1\n"),
    ],
)
def test_a_data_file_that_is_not_utf8_names_the_byte_and_the_line(char_tokenizer, tmp_path, suffix, content):
    """JSON Lines were read by pyarrow without checking, then failed with a traceback when a row was read."""
    path = tmp_path / f"rows{suffix}"
    path.write_bytes(content)
    with pytest.raises(SFTKeyError, match=r"is not UTF-8 text \(byte 0x(ff|fe) on line 2\); save it as UTF-8"):
        prepare(char_tokenizer, path, "error")


def test_a_damaged_tokenized_cache_is_rebuilt(char_tokenizer, data_file, tmp_path, caplog):
    args = script_args(dataset_name=str(data_file), on_invalid="skip")
    training_args = SimpleNamespace(seed=0, max_length=None)
    cache = tmp_path / "cache"
    first = prepare_data(args, training_args, STAGES, char_tokenizer, Formatter(char_tokenizer, args), cache)
    folder = cache / f"tokenized-{first.data_hash}"
    for path in folder.glob("*.arrow"):
        path.write_bytes(path.read_bytes()[:100])  # a damaged cache: a truncated data file
    with caplog.at_level(logging.WARNING, logger="sftkey_trl.data.loading"):
        second = prepare_data(args, training_args, STAGES, char_tokenizer, Formatter(char_tokenizer, args), cache)
    assert "cannot be used" in caplog.text and "rebuilding it" in caplog.text
    assert second.train["input_ids"] == first.train["input_ids"]
    third = prepare_data(args, training_args, STAGES, char_tokenizer, Formatter(char_tokenizer, args), cache)
    assert third.train["input_ids"] == first.train["input_ids"]  # the rebuilt cache reads back


def test_damaged_demo_data_is_written_again(sftkey_cache, caplog):
    sources.load_source("demo:arithmetic", None, "test")
    test_file = sftkey_cache / "demo-arithmetic-v2" / "test.jsonl"
    whole = test_file.read_text()
    test_file.write_text(whole[: len(whole) // 2])  # cut mid-row
    with caplog.at_level(logging.WARNING, logger="sftkey_trl.data.sources"):
        rows = sources.load_source("demo:arithmetic", None, "test")
    assert len(rows) == 200 and test_file.read_text() == whole and "written again" in caplog.text
    (sftkey_cache / "demo-arithmetic-v2" / "train.jsonl").unlink()  # half built: one split only
    assert len(sources.load_source("demo:arithmetic", None, "train")) == 2000


def test_a_damaged_parquet_file_is_one_line(char_tokenizer, tmp_path):
    """Already one line (a guard): pyarrow names the missing footer."""
    path = tmp_path / "rows.parquet"
    Dataset.from_list([GOOD] * 4).to_parquet(str(path))
    path.write_bytes(path.read_bytes()[:-20])  # cut: its footer is gone
    with pytest.raises(SFTKeyError, match=r"`dataset_name`: could not read `.*rows.parquet` \(.*\); check that it is"):
        prepare(char_tokenizer, path, "error")
