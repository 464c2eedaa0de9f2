"""The whole pipeline on the real SmolLM2-135M-Instruct (CPU): full fine-tuning overfits four short examples so that
greedy generation reproduces them and stops at `<|im_end|>`, before and after the key stage; QLoRA (4-bit nf4) runs
both stages, stage 2 continuing the stage-1 adapter on the reloaded 4-bit base."""

from __future__ import annotations

import json

import pytest
from conftest import ROOT

from sftkey_trl.run.cli import main

pytestmark = [pytest.mark.real_model, pytest.mark.e2e]

CPU_RECIPE = str(ROOT / "recipes/smollm2-135m/arithmetic/sftkey_full_cpu.yaml")
ROWS = [
    {"question": "Compute 3 + 4.", "reasoning": "3 + 4 = 7", "answer": "7"},
    {"question": "Compute 9 - 5 + 2.", "reasoning": "9 - 5 = 4\n4 + 2 = 6", "answer": "6"},
    {"question": "Compute 2 - 8.", "reasoning": "2 - 8 = -6", "answer": "-6"},
    {"question": "Compute 6 + 7.", "reasoning": "6 + 7 = 13", "answer": "13"},
]
MAX_NEW_TOKENS = 40


def response(row: dict) -> str:
    return f"<Thinking>{row['reasoning']}</Thinking>\n<Answer>{row['answer']}</Answer>"


def run_args(model_dir, tmp_path, name: str, stages: str, *extra: str) -> list[str]:
    """The CPU recipe on the four rows (training and evaluation set), one optimizer step per epoch."""
    data = tmp_path / "four.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    return ["--config", CPU_RECIPE, "--model_name_or_path", str(model_dir), "--output_dir", str(tmp_path / name),
            "--dataset_name", str(data), "--eval_dataset_name", str(data), "--max_train_samples", "4",
            "--per_device_train_batch_size", "4", "--max_new_tokens", str(MAX_NEW_TOKENS), "--eval_batch_size", "4",
            "--stages", stages, *extra]  # fmt: skip


def predictions(output, stage: str) -> list[dict]:
    lines = (output / stage / "predictions.jsonl").read_text().splitlines()
    return sorted((json.loads(line) for line in lines), key=lambda p: p["index"])


def test_full_fine_tuning_overfits_four_examples_and_the_key_stage_keeps_them(smollm2_dir, tmp_path):
    stages = ("[{name: sft, loss_on: completion, num_train_epochs: 6}, "
              "{name: key, loss_on: key, num_train_epochs: 2, learning_rate: 2.0e-5}]")  # fmt: skip
    assert main(run_args(smollm2_dir, tmp_path, "overfit", stages, "--learning_rate", "2e-4")) == 0
    output = tmp_path / "overfit"
    results = json.loads((output / "results.json").read_text())
    for stage in ("sft", "key"):
        metrics = results["stages"][stage]
        assert (metrics["format_accuracy"], metrics["accuracy"]) == (1.0, 1.0), (stage, metrics)
        for row, prediction in zip(ROWS, predictions(output, stage)):
            assert prediction["generation"] == response(row), (stage, prediction)
            # Stopped by the stop token (<|im_end|>, the only one: see test_smollm2_masks), not by the budget
            assert prediction["generated_tokens"] < MAX_NEW_TOKENS, (stage, prediction)
    history = json.loads((output / "key" / "log_history.json").read_text())
    assert any("key_loss" in entry for entry in history)  # the key stage trained, from the stage-1 weights
    assert results["stages"]["key"]["training"]["train_tokens"] > 0


def test_qlora_both_stages_continue_the_adapter_on_the_4bit_base(smollm2_dir, tmp_path):
    import bitsandbytes as bnb
    import torch
    from safetensors.torch import load_file

    from sftkey_trl.recipe.parsing import parse_config
    from sftkey_trl.train.modeling import load_model

    stages = ("[{name: sft, loss_on: completion, num_train_epochs: 2}, "
              "{name: key, loss_on: key, num_train_epochs: 1, learning_rate: 2.0e-4}]")  # fmt: skip
    qlora = ["--load_in_4bit", "true", "--use_peft", "true", "--use_bnb_nested_quant", "true", "--dtype", "bfloat16",
             "--learning_rate", "1e-3", "--eval_after_stages", "false"]  # fmt: skip
    args = run_args(smollm2_dir, tmp_path, "qlora", stages, *qlora)
    assert main(args) == 0
    output = tmp_path / "qlora"
    sft, key = (load_file(output / stage / "adapter_model.safetensors") for stage in ("sft", "key"))
    assert sft.keys() == key.keys() and not any("lm_head" in name for name in sft)
    lora_b = [name for name in sft if "lora_B" in name]
    assert lora_b and any((sft[name] != key[name]).any() for name in sft)  # stage 2 trained the adapter
    # Stage 2 continued stage 1's adapter (B starts at zero in a fresh one): one small step away from it
    moved = sum((key[name] - sft[name]).float().norm() ** 2 for name in lora_b) ** 0.5
    assert moved < 0.5 * sum(sft[name].float().norm() ** 2 for name in lora_b) ** 0.5
    # What stage 2 starts from: the base re-quantised to 4-bit nf4 with the stage-1 adapter, trainable
    recipe = parse_config(args)
    model = load_model(recipe.model, recipe.training, output / "sft", purpose="train")
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and layers[0].weight.quant_type == "nf4"
    loaded = {n: p for n, p in model.named_parameters() if "lora_B" in n}
    assert loaded and all(p.requires_grad for p in loaded.values())
    first = next(name for name in lora_b if "layers.0.self_attn.q_proj" in name)
    match = next(p for n, p in loaded.items() if "layers.0.self_attn.q_proj" in n)
    assert torch.equal(match.detach().cpu().to(sft[first].dtype), sft[first])
