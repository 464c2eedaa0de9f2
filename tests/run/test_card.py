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
