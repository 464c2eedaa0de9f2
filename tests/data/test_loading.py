"""Validation in prepare_data: a row the tokenizer cannot represent (it produces the unk token) is an invalid row,
counted by reason with its row index; `on_invalid: error` stops, `skip` drops and logs it."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import pytest
from conftest import script_args

from sftkey_trl.data import loading
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
