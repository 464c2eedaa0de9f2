"""The recipe shown in a pushed model card never carries a secret, whatever YAML form it was written in."""

from __future__ import annotations

import pytest
import yaml

from sftkey_trl.run.card import REDACTED, redacted

SECRET = "hf_abcdefghijklmnopqrstuvwxyz0123"


@pytest.mark.parametrize(
    "recipe",
    [
        f"hub_token: {SECRET}\n",
        f'"hub_token": "{SECRET}"\n',
        f"'hub_token': {SECRET}\n",
        f"stages: [{{name: key, loss_on: key, hub_token: {SECRET}}}]\n",
        f"stages:\n  - name: key\n    loss_on: key\n    hub_token: {SECRET}\n",
        f"env:\n  HF_TOKEN: {SECRET}\n",
        f"env: {{HF_TOKEN: {SECRET}, WANDB_API_KEY: abc}}\n",
        f"model_init_kwargs: {{token: {SECRET}}}\n",
        f"run_name: pushed with {SECRET}\n",
    ],
)
def test_card_recipe_has_no_secret(recipe: str) -> None:
    shown = redacted("model_name_or_path: Qwen/Qwen2.5-1.5B\nlearning_rate: 1.0e-4\n" + recipe)
    assert SECRET not in shown and "abc" not in shown.replace(REDACTED, "")
    assert REDACTED in shown
    data = yaml.safe_load(shown)
    assert data["model_name_or_path"] == "Qwen/Qwen2.5-1.5B" and data["learning_rate"] == 1e-4


def test_card_recipe_keeps_public_token_keys() -> None:
    shown = yaml.safe_load(
        redacted("max_new_tokens: 256\neos_token: <|im_end|>\nstages: [{name: sft, loss_on: completion}]\n")
    )
    assert shown == {
        "max_new_tokens": 256,
        "eos_token": "<|im_end|>",
        "stages": [{"name": "sft", "loss_on": "completion"}],
    }


def test_card_recipe_that_is_not_yaml_is_not_shown() -> None:
    assert SECRET not in redacted(f"hub_token: {SECRET}\n  bad: [\n")


DEMO = "recipes/demo/sftkey_tiny.yaml"
ONE_EPOCH_EACH = (
    "[{name: sft, loss_on: completion, num_train_epochs: 1}, {name: key, loss_on: key, num_train_epochs: 1}]"
)


@pytest.fixture(scope="module")
def merged_demo(tmp_path_factory):
    """A few-step LoRA run of the tiny demo model with command-line overrides, then a separate `--merge key` run with
    none of them (as a user merges later)."""
    from conftest import ROOT

    from sftkey_trl.run.cli import main

    out = tmp_path_factory.mktemp("card") / "demo-lora"
    config = str(ROOT / DEMO)
    trained = ["--output_dir", str(out), "--use_peft", "true", "--learning_rate", "1e-2", "--max_train_samples", "32",
               "--max_eval_samples", "4", "--max_new_tokens", "12", "--stages", ONE_EPOCH_EACH]  # fmt: skip
    assert main(["--config", config, *trained]) == 0
    assert main(["--config", config, "--output_dir", str(out), "--merge", "key"]) == 0
    return out


@pytest.mark.e2e
def test_the_merged_cards_usage_snippet_runs_as_written(merged_demo):
    import os
    import re
    import subprocess
    import sys

    text = (merged_demo / "key" / "merged" / "README.md").read_text()
    (snippet,) = re.findall(r"```python\n(.*?)```", text, re.DOTALL)
    assert f'from_pretrained("{merged_demo / "key" / "merged"}")' in snippet
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.e2e
def test_the_merged_card_records_the_training_command_and_why_it_names_no_base_model(merged_demo):
    from huggingface_hub import ModelCard

    card = ModelCard.load(merged_demo / "key" / "merged" / "README.md")
    assert card.data.base_model is None and card.data.library_name == "transformers"
    reason = "`demo:tiny-llama` (a tiny random-init model built on this machine; not a Hub id, so the card's header"
    assert reason in card.text
    # the training run's command and settings, though the `--merge` command had none of its overrides
    assert "--learning_rate 1e-2 --max_train_samples 32" in card.text and "--use_peft true" in card.text
    assert "- Base model: `demo:tiny-llama`; LoRA, r=16" in card.text and "max_new_tokens=12," in card.text


@pytest.mark.e2e
def test_no_placeholder_card_is_left_beside_the_stages(merged_demo):
    for stage in ("sft", "key"):
        assert (merged_demo / stage / "adapter_model.safetensors").exists()
        readme = merged_demo / stage / "README.md"
        assert not readme.exists() or "Model Card for Model ID" not in readme.read_text(), stage


def test_a_hub_base_model_is_in_the_merged_cards_header(tmp_path):
    from sftkey_trl.recipe.parsing import parse_config
    from sftkey_trl.run.card import model_card

    recipe = parse_config(["--config", DEMO, "--model_name_or_path", "Qwen/Qwen2.5-0.5B-Instruct",
                           "--output_dir", str(tmp_path)])  # fmt: skip
    card = model_card(tmp_path / "key" / "merged", "key", "merged", "me/qwen-key", recipe)
    assert card.data.base_model == "Qwen/Qwen2.5-0.5B-Instruct"
    assert "not a Hub id" not in card.text
    assert 'from_pretrained("me/qwen-key")' in card.text  # to be pushed: the snippet loads the repository
