"""benchmarks/measure_gsm8k.py on a 5-row GSM8K-layout file: rejections, masks and gold-as-prediction scores."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from conftest import ROOT

from sftkey_trl.errors import SFTKeyError


def _load_script():
    spec = importlib.util.spec_from_file_location("measure_gsm8k", ROOT / "benchmarks" / "measure_gsm8k.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ROWS = [
    {"question": "Tom has 3 apples and buys 4. How many?", "answer": "3 + 4 = <<3+4=7>>7\n#### 7"},
    {"question": "A rent of $600/month for a year?", "answer": "$600/month * 12 months/year = $7200/year\n#### 7,200"},
    {"question": "No final line here.", "answer": "2 + 2 = 4"},
    {"question": "", "answer": "1 + 1 = 2\n#### 2"},
    {"question": "What did James score?", "answer": "48 + 16 = 64 points.\n#### 66"},  # reasoning ends elsewhere
]


@pytest.fixture()
def gsm8k_file(tmp_path: Path) -> Path:
    path = tmp_path / "gsm8k.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    return path


def test_measure_counts_rejections_masks_and_gold_scores(gsm8k_file: Path, char_tokenizer) -> None:
    result = _load_script().measure(gsm8k_file, char_tokenizer)
    assert (result["rows"], result["converted"]) == (5, 3)
    assert result["rejections"] == {"no_final_answer": 1, "empty_question": 1}
    # the key is "\n<Answer>", the answer's characters, "</Answer>" and the end of turn: 4 tokens + the digits
    assert result["key_mask_tokens"] == {"min": 5, "median": 6, "max": 8}
    metrics = result["metrics"]
    assert metrics["accuracy"] == metrics["format_accuracy"] == metrics["strict_accuracy"] == 1.0
    assert metrics["reasoning_final_accuracy"] == metrics["answer_reasoning_consistency"] == pytest.approx(2 / 3)
    assert result["inconsistent"] == [{"index": 4, "reasoning_final": "64", "answer": "66"}]


def test_main_prints_the_report(gsm8k_file: Path, capsys) -> None:
    assert _load_script().main([str(gsm8k_file), "--limit", "2"]) == 0
    out = capsys.readouterr().out
    assert "rows: 2  converted: 2  rejected: none" in out
    assert "reasoning_final_accuracy: 1.0000" in out
    assert "inconsistent rows (0)" in out


def test_unreadable_input_is_a_one_line_error(tmp_path: Path, capsys) -> None:
    script = _load_script()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "#### 1"}\nnot json\n')
    with pytest.raises(SFTKeyError, match="line 2 is not JSON"):
        script.read_jsonl(bad)
    assert script.main([str(tmp_path / "missing.jsonl")]) == 2
    assert capsys.readouterr().err.startswith("error:")
