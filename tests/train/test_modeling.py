"""The quantisation and LoRA configs a stage loads with: TRL's helpers plus the project's two defaults (4-bit
compute in bfloat16, LoRA on every linear layer but the LM head)."""

from __future__ import annotations

import pytest
import torch
from trl import ModelConfig

from sftkey_trl.train.modeling import lora_config, quantization_config


@pytest.mark.parametrize(
    ("dtype", "compute"),
    [
        (None, torch.bfloat16),
        ("auto", torch.bfloat16),
        ("float32", torch.bfloat16),
        ("bfloat16", torch.bfloat16),
        ("float16", torch.float16),
    ],
)
def test_4bit_computes_in_bfloat16_unless_the_model_loads_in_half_precision(dtype, compute):
    model_args = ModelConfig(model_name_or_path="m", load_in_4bit=True, dtype=dtype, use_bnb_nested_quant=True)
    config = quantization_config(model_args)
    assert config.load_in_4bit and not config.load_in_8bit
    assert config.bnb_4bit_compute_dtype == compute
    assert (config.bnb_4bit_quant_type, config.bnb_4bit_use_double_quant) == ("nf4", True)
    assert config.bnb_4bit_quant_storage == torch.uint8  # bitsandbytes' default when the recipe sets none
    assert model_args.dtype == dtype  # read, never changed


def test_4bit_keeps_the_recipes_quantisation_settings():
    model_args = ModelConfig(
        model_name_or_path="m", load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_quant_storage="bfloat16"
    )
    config = quantization_config(model_args)
    assert (config.bnb_4bit_quant_type, config.bnb_4bit_use_double_quant) == ("fp4", False)
    assert config.bnb_4bit_quant_storage == torch.bfloat16


def test_8bit_and_unquantised():
    config = quantization_config(ModelConfig(model_name_or_path="m", load_in_8bit=True))
    assert config.load_in_8bit and not config.load_in_4bit
    assert quantization_config(ModelConfig(model_name_or_path="m")) is None


def test_lora_defaults_to_every_linear_layer_but_the_lm_head(tiny_model_dir):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    model_args = ModelConfig(model_name_or_path="m", use_peft=True)
    config = lora_config(model_args)
    assert (config.task_type, config.bias, config.r, config.lora_alpha) == ("CAUSAL_LM", "none", 16, 32)
    assert model_args.lora_target_modules is None  # read, never changed
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), config)
    wrapped = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if hasattr(module, "lora_A")}
    assert wrapped == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_lora_keeps_the_recipes_settings():
    model_args = ModelConfig(
        model_name_or_path="m",
        use_peft=True,
        lora_target_modules=["q_proj", "v_proj"],
        lora_r=8,
        lora_alpha=8,
        lora_dropout=0.0,
        use_rslora=True,
        use_dora=True,
        lora_modules_to_save=["lm_head"],
    )
    config = lora_config(model_args)
    assert config.target_modules == {"q_proj", "v_proj"}
    assert (config.r, config.lora_alpha, config.lora_dropout, config.use_rslora, config.use_dora) == (
        8,
        8,
        0.0,
        True,
        True,
    )
    assert config.modules_to_save == ["lm_head"]
    assert lora_config(ModelConfig(model_name_or_path="m")) is None
