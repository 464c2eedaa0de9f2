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


# ---------------------------------------------------------------- where load_model puts a model ---------------------
# `from_pretrained` is recorded, not run: what it was asked (its device map) and whether transformers would have
# built the model inside `deepspeed.zero.Init` (its process-wide ZeRO-3 config) at that moment. The training device
# is a GPU, faked: on a CPU every model is on the CPU whatever it was asked.
ENGINES = [None, "single_gpu", "multi_gpu", "deepspeed_zero2", "deepspeed_zero3", "fsdp"]


@pytest.fixture()
def recorded_loads(monkeypatch):
    from transformers import AutoModelForCausalLM
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled, unset_hf_deepspeed_config

    from sftkey_trl.train import modeling

    calls = []

    def from_pretrained(source, **kwargs):
        calls.append({**kwargs, "zero3_init": is_deepspeed_zero3_enabled()})
        return object()

    monkeypatch.setattr(modeling.AutoModelForCausalLM, "from_pretrained", from_pretrained)
    assert modeling.AutoModelForCausalLM is AutoModelForCausalLM
    yield calls
    unset_hf_deepspeed_config()  # no ZeRO-3 config may outlive the simulated launch


def _where(call: dict) -> str | None:
    """The device a recorded load was asked for (None: no device map, so the CPU until something moves it)."""
    device_map = call.get("device_map")
    if device_map is None:
        return None
    (device,) = device_map.values()
    return f"cuda:{device}" if isinstance(device, int) else str(torch.device(device))


def _load(model_args, purpose: str, **values):
    from launching import training_args

    from sftkey_trl.train.modeling import load_model

    return load_model(model_args, training_args(device="cuda:3", trust_remote_code=False, **values), purpose=purpose)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("bits", [None, 4, 8])
def test_a_model_loaded_to_evaluate_is_whole_on_the_training_device_under_every_engine(
    engine, bits, launched, recorded_loads, tiny_model_dir
):
    """eval_base, --eval_only and every evaluation from disk: on the rank's own GPU (never left on the CPU, where
    `from_pretrained` loads without a device map), and never partitioned by ZeRO-3 (each rank generates alone)."""
    launched(engine)
    model_args = ModelConfig(model_name_or_path=str(tiny_model_dir), load_in_4bit=bits == 4, load_in_8bit=bits == 8)
    _load(model_args, "evaluate")
    (call,) = recorded_loads
    assert _where(call) == "cuda:3" and not call["zero3_init"]


@pytest.mark.parametrize("engine", ENGINES)
def test_a_model_to_train_is_placed_by_its_engine_and_partitioned_under_zero3(
    engine, launched, recorded_loads, tiny_model_dir
):
    """Unquantised: the Trainer moves it to the device, or ZeRO-3/FSDP place it; ZeRO-3 builds it partitioned
    (`zero3_init_flag: true` in deepspeed_zero3.yaml) even right after a model was loaded whole for evaluation,
    which is what happens to stage 2 after stage 1's evaluation; 4-bit: each rank's own GPU unless sharded."""
    launched(engine)
    model_args = ModelConfig(model_name_or_path=str(tiny_model_dir))
    _load(model_args, "evaluate")
    _load(model_args, "train")
    _load(ModelConfig(model_name_or_path=str(tiny_model_dir), load_in_4bit=True), "train")
    evaluation, training, quantised = recorded_loads
    assert _where(evaluation) == "cuda:3" and not evaluation["zero3_init"]
    assert _where(training) is None and training["zero3_init"] == (engine == "deepspeed_zero3")
    assert _where(quantised) == (None if engine in ("deepspeed_zero3", "fsdp") else "cuda:3")


def test_a_merge_loads_on_the_cpu(launched, recorded_loads, tiny_model_dir):
    """--merge needs the unquantised base whole: on the CPU, which holds it where a QLoRA GPU often cannot."""
    launched("single_gpu")
    _load(ModelConfig(model_name_or_path=str(tiny_model_dir)), "merge")
    assert _where(recorded_loads[0]) == "cpu"


def test_load_model_needs_a_purpose(tiny_model_dir):
    from sftkey_trl.train.modeling import load_model

    with pytest.raises(TypeError, match="purpose"):
        load_model(ModelConfig(model_name_or_path=str(tiny_model_dir)), None)
