"""The comparison runner: statistics on known inputs, the variant definitions, and a tiny end-to-end run."""

from __future__ import annotations

import json
import sys

import pytest
from conftest import ROOT

from sftkey_trl.run.compare import build_variants, markdown, mean_ci, summarise_variants
from sftkey_trl.train.objectives import Stage


def test_mean_ci_on_known_values():
    mean, half = mean_ci([0.5, 0.6, 0.7])  # sd 0.1, n 3, t(2) = 4.303
    assert mean == pytest.approx(0.6) and half == pytest.approx(4.303 * 0.1 / 3**0.5, rel=1e-4)
    assert mean_ci([0.4]) == (0.4, 0.0)
    assert mean_ci([0.3, 0.3, 0.3])[1] == 0.0


def test_paired_differences_use_the_same_seed():
    per_seed = {
        "sftkey_tag": {0: {"accuracy": 0.60}, 1: {"accuracy": 0.70}, 2: {"accuracy": 0.80}},
        "sft_tag": {0: {"accuracy": 0.50}, 1: {"accuracy": 0.60}, 2: {"accuracy": 0.70}},
    }
    summary = summarise_variants(per_seed)
    difference = summary["differences"]["sft_tag"]["accuracy"]
    # Unpaired, the means differ by 0.1 with a wide interval; paired, every seed differs by exactly 0.1
    assert difference["mean"] == pytest.approx(0.1) and difference["ci95"] == pytest.approx(0.0, abs=1e-12)
    assert summary["variants"]["sft_tag"]["accuracy"]["ci95"] > 0.2
    table = markdown(summary, {}, [0, 1, 2])
    assert "| sft_tag | +0.100 ± 0.000 *" in table


def test_variants_follow_the_recipe_stages():
    stages = [Stage(name="sft", loss_on="completion", overrides={"num_train_epochs": 3, "learning_rate": 1e-3}),
              Stage(name="key", loss_on="key", overrides={"num_train_epochs": 1, "learning_rate": 1e-4})]  # fmt: skip
    variants = build_variants(stages)
    matched = variants["sft_tag_matched"].stages[0]
    assert matched.loss_on == "completion" and matched.overrides["num_train_epochs"] == 4
    assert matched.overrides["learning_rate"] == 1e-3
    assert [s.name for s in variants["sftkey_tag"].stages] == ["sft", "key"]
    assert variants["sftkey_tag"].folder == variants["sft_tag"].folder  # stage 1 is trained once
    assert variants["sft"].response_format == "plain" and variants["key_tag"].stages[0].loss_on == "key"
    assert variants["sftkey_tag_norm"].stages[1].loss_normalization == "completion_tokens"
    assert variants["sftkey_tag_mix"].stages[1].reasoning_weight == 0.1
    assert variants["sftkey_tag_best"].stages[1].keep_best
    assert variants["sftkey_tag_stage1_lr"].stages[1].overrides["learning_rate"] == 1e-3


@pytest.mark.e2e
def test_compare_end_to_end_on_a_tiny_setting(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "recipes"))
    from compare import main

    out = tmp_path / "cmp"
    args = [
        "--variants",
        "sft_tag,sftkey_tag,sft_tag_matched",
        "--seeds",
        "2",
        "--output_dir",
        str(tmp_path / "o"),
        "--comparison_dir",
        str(out),
        "--max_train_samples",
        "64",
        "--max_eval_samples",
        "16",
        "--max_new_tokens",
        "40",
        "--stages",
        "[{name: sft, loss_on: completion, num_train_epochs: 1}, {name: key, loss_on: key, num_train_epochs: 1}]",
    ]
    assert main(args) == 0
    summary = json.loads((out / "comparison.json").read_text())
    assert set(summary["variants"]) == {"sft_tag", "sftkey_tag", "sft_tag_matched"}
    assert summary["seeds"] == [0, 1] and len(summary["variants"]["sftkey_tag"]["accuracy"]["values"]) == 2
    assert set(summary["differences"]) == {"sft_tag", "sft_tag_matched"}
    assert (out / "comparison.png").stat().st_size > 1000
    assert "Paired difference" in (out / "comparison.md").read_text()
    # sftkey_tag reused sft_tag's stage 1 (same folder, skipped by the manifest)
    manifest = json.loads((out / "seed0" / "tags" / "manifest.json").read_text())
    assert set(manifest["stages"]) == {"sft", "key"}
