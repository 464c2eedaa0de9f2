"""Recipe parsing: every YAML under recipes/ parses, and bad keys/values are one-line errors naming the fix."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import ROOT

from sftkey_trl.errors import SFTKeyError
from sftkey_trl.recipe.parsing import parse_config
from sftkey_trl.run.cli import load_checked_recipe

RECIPES = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "recipes").rglob("*.yaml"))


def test_there_are_recipes():
    assert "recipes/demo/sftkey_tiny.yaml" in RECIPES


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_parses(recipe):
    parsed = parse_config(["--config", str(ROOT / recipe)])
    assert parsed.stages and parsed.model.model_name_or_path and parsed.training.output_dir


def test_cli_overrides_recipe_values():
    parsed = parse_config(
        [
            "--config",
            str(ROOT / "recipes/demo/sftkey_tiny.yaml"),
            "--learning_rate",
            "1e-4",
            "--stages",
            "[{name: only, loss_on: key, num_train_epochs: 2}]",
        ]
    )
    assert parsed.training.learning_rate == 1e-4
    assert [(s.name, s.loss_on, s.overrides) for s in parsed.stages] == [("only", "key", {"num_train_epochs": 2})]


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    "text, message",
    [
        ("learnig_rate: 1.0e-4\n", "unknown recipe key `learnig_rate` .*did you mean `learning_rate`"),
        ("stages: []\n", "`stages` must be a non-empty list"),
        ("stages: [{name: a, loss_on: answer}]\n", "`loss_on: answer` is not valid"),
        ("stages: [{name: a}, {name: a}]\n", "stage name `a` repeats"),
        ("stages: [{name: a, num_train_epoch: 1}]\n", "unknown key `num_train_epoch`.*num_train_epochs"),
        ("stages: [{name: a, loss_on: key, reasoning_weight: 2}]\n", "between 0 and 1"),
        ("stages: [{name: a, keep_best: true, patience: 0}]\n", "`patience: 0` is not valid.*at least 1"),
        ("response_format: tag\n", "`response_format: tag` is not valid.*did you mean `tags`"),
        ("learning_rate: fast\n", "`learning_rate` must be a number"),
        ("answer_template: 'Answer:'\n", "must contain `{answer}`"),
        ("key: [unclosed\n", "not valid YAML at line"),
        ("- a list\n", "must be a YAML mapping"),
        # PyYAML keeps the last of a repeated key silently
        (
            "learning_rate: 1.0e-4\nseed: 1\nlearning_rate: 2.0e-4\n",
            r"key `learning_rate` is given twice \(lines 1 and 3\)",
        ),
        (
            "stages:\n  - {name: a, loss_on: key,\n     loss_on: completion}\n",
            r"key `loss_on` is given twice \(lines 2 and 3\)",
        ),
        ("env: [1, 2]\n", r"`env` must be a mapping of environment variable names to values"),
        ("env: {A: [1]}\n", r"`env`: `A: \[1\]` is not a variable name with a plain value"),
        (
            "model_name_or_path: demo:tiny-llama\ndataset_name: demo:arithmetic\nstages: [{name: a, max_length: 8}]\n",
            r"stage `a`: `max_length` cannot be set in a stage",
        ),
    ],
)
def test_bad_recipes_are_one_line_errors(tmp_path, text, message):
    """Parsing and checking, as every entry point does before anything is loaded."""
    with pytest.raises(SFTKeyError, match=message) as error:
        load_checked_recipe(["--config", write(tmp_path, text)])
    assert "\n" not in str(error.value)


def test_unknown_cli_option_suggests_the_closest():
    with pytest.raises(SFTKeyError, match="--learning_rat` .*learning_rate"):
        parse_config(["--learning_rat", "1"])


def test_missing_recipe_file():
    with pytest.raises(SFTKeyError, match="does not exist"):
        parse_config(["--config", "recipes/nope.yaml"])


def test_a_recipe_that_is_a_folder(tmp_path):
    """It raised IsADirectoryError."""
    with pytest.raises(SFTKeyError, match="is a folder; give --config a recipe's .yaml file"):
        parse_config(["--config", str(tmp_path)])


@pytest.mark.parametrize(("major", "expected"), [(7, False), (8, True)])
def test_bf16_defaults_on_only_where_the_gpu_has_bf16_hardware(monkeypatch, tmp_path, major, expected):
    """A faked CUDA GPU of compute capability 7.x (V100, T4) that can make bfloat16 tensors: torch's
    `is_bf16_supported()` counts that emulation; the recipe's default must not (8.x: Ampere and later)."""
    from types import SimpleNamespace

    import torch

    from sftkey_trl.recipe.schema import SFTKeyConfig

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(major=major))
    monkeypatch.setattr(torch.cuda, "_check_bf16_tensor_supported", lambda device: True)  # emulation works
    assert torch.cuda.is_bf16_supported()  # what torch says by default, for both
    assert SFTKeyConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True).bf16 is expected
    assert SFTKeyConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=False).bf16 is False
    # A QLoRA merge loads the base in bf16 only where the GPU has it too (float32 otherwise), by the same rule
    from trl import ModelConfig

    from sftkey_trl.run.export import merge_dtype

    qlora = ModelConfig(model_name_or_path="m", load_in_4bit=True, use_peft=True, dtype="auto")
    assert merge_dtype(qlora) == ("bfloat16" if expected else "float32")
