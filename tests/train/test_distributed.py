"""Launch detection, device maps and the QLoRA + sharding rules of `sftkey_trl.train.distributed`.

A launch is simulated the way `accelerate launch` does it (see `launching.py`): accelerate's own launcher code reads
the YAML and builds the environment each training process gets; the tests put that environment in `os.environ`.
"""

from __future__ import annotations

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType
from launching import (  # the simulated launches shared with test_accelerate_configs.py / test_distributed.py
    ROOT,
    assert_one_line_with,
    qlora,
    training_args,
)
from trl import ModelConfig

from sftkey_trl.errors import SFTKeyError
from sftkey_trl.train import distributed
from sftkey_trl.train.distributed import (
    check_sharding_compatibility,
    detect_launch,
    device_map,
    is_main_process,
    resolve_sharding_defaults,
    world_size,
)

# ---------------------------------------------------------------- launch detection ----------------------------------


@pytest.mark.parametrize(
    "name, engine, zero_stage, shards",
    [
        (None, "single", None, False),
        ("single_gpu", "single", None, False),
        ("multi_gpu", "ddp", None, False),
        ("deepspeed_zero2", "deepspeed", 2, False),
        ("deepspeed_zero3", "deepspeed", 3, True),
        ("fsdp", "fsdp", None, True),
    ],
)
def test_detect_launch_from_accelerate_environment(launched, name, engine, zero_stage, shards):
    launched(name)
    launch = detect_launch(training_args())
    assert launch.engine == engine
    assert launch.zero_stage == zero_stage
    assert launch.shards_parameters is shards
    if engine == "fsdp":
        assert launch.fsdp_version == 1
        assert launch.fsdp_use_orig_params is False
        assert launch.fsdp_cpu_ram_efficient_loading is True


def test_detect_launch_with_real_training_arguments(launched, tmp_path):
    from sftkey_trl.recipe.schema import SFTKeyConfig

    launched("fsdp", ranks=False)
    args = SFTKeyConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none")
    assert detect_launch(args).engine == "fsdp"
    launched(None)
    args = SFTKeyConfig(
        output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none", fsdp=True, fsdp_config={"version": 2}
    )
    launch = detect_launch(args)
    assert launch.engine == "fsdp" and launch.fsdp_version == 2 and launch.fsdp_use_orig_params is None


def test_detect_launch_from_a_deepspeed_json(launched, tmp_path):
    launched(None)
    config = {"zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True}}
    assert detect_launch(training_args(deepspeed=config)).shards_parameters
    path = tmp_path / "ds.json"
    path.write_text('{"zero_optimization": {"stage": 2}}')
    launch = detect_launch(training_args(deepspeed=str(path)))
    assert (launch.engine, launch.zero_stage) == ("deepspeed", 2)


def test_detect_launch_from_an_existing_accelerator_state(monkeypatch, launched):
    launched(None)
    state = SimpleNamespace(
        distributed_type=DistributedType.DEEPSPEED,
        deepspeed_plugin=SimpleNamespace(zero_stage=3, offload_param_device="cpu", zero3_save_16bit_model=True),
        num_processes=16,
        is_main_process=False,
    )
    monkeypatch.setattr(distributed, "_initialized_state", lambda: state)
    launch = detect_launch(training_args())
    assert (launch.engine, launch.zero_stage, launch.offload_param) == ("deepspeed", 3, True)
    assert world_size() == 16 and is_main_process() is False


def test_world_size_and_main_process_from_environment(launched):
    launched(None, WORLD_SIZE="4", RANK="2")
    assert world_size() == 4 and is_main_process() is False
    launched(None)
    assert world_size() == 1 and is_main_process() is True


UNSTARTED = """
import torch
from accelerate.state import PartialState
from sftkey_trl.train.distributed import is_main_process, world_size
print("READ", world_size(), is_main_process(), PartialState._shared_state == {}, torch.distributed.is_initialized())
"""


@pytest.mark.slow
def test_world_size_before_the_state_exists_starts_no_process_group(tmp_path):
    """Read before the launch is set up (a real run's recipe check): creating accelerate's state there would join a
    process group of two that never forms (this process would hang; the timeout fails the test)."""
    script = tmp_path / "read.py"
    script.write_text(UNSTARTED)
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "CUDA_VISIBLE_DEVICES": "",
        "WORLD_SIZE": "2",
        "RANK": "1",
        "LOCAL_RANK": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "29591",
    }
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "READ 2 False True False" in done.stdout


@pytest.mark.parametrize(
    ("word", "expected"), [("1", True), ("yes", True), ("On", True), ("off", False), ("N", False)]
)
def test_launch_flags_read_as_accelerate_reads_them(launched, word, expected):
    launched("fsdp", FSDP_USE_ORIG_PARAMS=word, FSDP_VERSION="1")
    assert detect_launch(training_args()).fsdp_use_orig_params is expected


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"FSDP_USE_ORIG_PARAMS": "maybe", "FSDP_VERSION": "1"}, "`FSDP_USE_ORIG_PARAMS: maybe`"),
        ({"FSDP_CPU_RAM_EFFICIENT_LOADING": "sometimes"}, "`FSDP_CPU_RAM_EFFICIENT_LOADING: sometimes`"),
    ],
)
def test_a_launch_flag_that_is_no_boolean_is_refused_in_one_line(launched, env, needle):
    """accelerate's FSDP plugin would stop on the word later (`str_to_bool`); the old reading took it as false."""
    launched("fsdp", **env)
    with pytest.raises(SFTKeyError) as error:
        detect_launch(training_args())
    assert_one_line_with(error, needle, "true or false")


# ---------------------------------------------------------------- device map ----------------------------------------


def test_device_map_cpu_single_process(launched, tmp_path):
    from sftkey_trl.recipe.schema import SFTKeyConfig

    launched(None)
    args = SFTKeyConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none")
    assert device_map(args, "train", quantized=True) == {"": "cpu"}


@pytest.mark.parametrize("name", ["single_gpu", "multi_gpu", "deepspeed_zero2"])
def test_device_map_each_rank_its_own_gpu(launched, name):
    launched(name)
    assert device_map(training_args(device="cuda:3"), "train", quantized=True) == {"": 3}


def test_device_map_cuda_without_index(launched, monkeypatch):
    launched("multi_gpu")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 5)
    assert device_map(training_args(device="cuda"), "train", quantized=True) == {"": 5}


@pytest.mark.parametrize("name", ["deepspeed_zero3", "fsdp"])
def test_device_map_none_when_the_engine_shards(launched, name):
    launched(name)

    class NoDevice(SimpleNamespace):
        @property
        def device(self):
            raise AssertionError("the device must not be touched (it would initialise the process group)")

    args = training_args()
    no_device = NoDevice(**{k: v for k, v in vars(args).items() if k != "device"})
    assert device_map(no_device, "train", quantized=True) is None


# ---------------------------------------------------------------- compatibility rules -------------------------------


@pytest.mark.parametrize("name", [None, "single_gpu", "multi_gpu", "deepspeed_zero2", "deepspeed_zero3", "fsdp"])
def test_unquantised_models_pass_everywhere(launched, name):
    launched(name)
    model_args = ModelConfig(model_name_or_path="m", use_peft=True, dtype="bfloat16")
    assert check_sharding_compatibility(model_args, training_args()) == []
    assert model_args.bnb_4bit_quant_storage is None


@pytest.mark.parametrize("name", [None, "single_gpu", "multi_gpu", "deepspeed_zero2"])
@pytest.mark.parametrize("bits", ["load_in_4bit", "load_in_8bit"])
def test_quantised_without_weight_sharding_passes_unchanged(launched, name, bits):
    launched(name)
    model_args = ModelConfig(model_name_or_path="m", use_peft=True, **{bits: True})
    assert check_sharding_compatibility(model_args, training_args()) == []
    assert model_args.bnb_4bit_quant_storage is None and model_args.dtype == "float32"


@pytest.mark.parametrize("name, engine", [("deepspeed_zero3", "DeepSpeed ZeRO-3"), ("fsdp", "FSDP1")])
def test_8bit_with_weight_sharding_is_refused(launched, name, engine):
    launched(name)
    model_args = ModelConfig(model_name_or_path="m", use_peft=True, load_in_8bit=True)
    with pytest.raises(SFTKeyError) as error:
        check_sharding_compatibility(model_args, training_args())
    assert_one_line_with(error, "load_in_8bit", engine, "load_in_4bit", "deepspeed_zero2.yaml")


@pytest.mark.parametrize("name", ["deepspeed_zero3", "fsdp"])
def test_qlora_sharded_gets_bfloat16_storage(launched, name, caplog):
    launched(name)
    model_args = qlora(dtype="auto")
    with caplog.at_level("WARNING", logger="sftkey_trl.train.distributed"):
        fixes = resolve_sharding_defaults(model_args, training_args())
    assert fixes == ["bnb_4bit_quant_storage: uint8 -> bfloat16", "dtype: auto -> bfloat16"]
    assert (model_args.bnb_4bit_quant_storage, model_args.dtype) == ("bfloat16", "bfloat16")
    assert "bnb_4bit_quant_storage" in caplog.text
    assert resolve_sharding_defaults(model_args, training_args()) == []  # idempotent (one call per stage is fine)
    assert check_sharding_compatibility(model_args, training_args()) == []  # the resolved recipe passes
    # what modeling.py builds from it
    from sftkey_trl.train.modeling import DTYPES, quantization_config

    config = quantization_config(model_args)
    assert config.bnb_4bit_quant_storage == torch.bfloat16 == DTYPES[model_args.dtype]
    assert config.bnb_4bit_compute_dtype == torch.bfloat16


def test_qlora_sharded_storage_follows_a_float_dtype(launched):
    launched("fsdp")
    model_args = qlora()  # TRL's default dtype: float32
    assert resolve_sharding_defaults(model_args, training_args()) == ["bnb_4bit_quant_storage: uint8 -> float32"]
    assert (model_args.bnb_4bit_quant_storage, model_args.dtype) == ("float32", "float32")


def test_qlora_sharded_dtype_follows_an_explicit_float_storage(launched):
    launched("deepspeed_zero3")
    model_args = qlora(bnb_4bit_quant_storage="bfloat16")
    assert resolve_sharding_defaults(model_args, training_args()) == ["dtype: float32 -> bfloat16"]
    assert model_args.dtype == "bfloat16"


def test_qlora_sharded_with_fp16_training_uses_float32_storage(launched):
    launched("fsdp")
    model_args = qlora(dtype=None)
    resolve_sharding_defaults(model_args, training_args(fp16=True, bf16=False))
    assert (model_args.bnb_4bit_quant_storage, model_args.dtype) == ("float32", "float32")


@pytest.mark.parametrize(
    "values, train, needles",
    [
        ({"dtype": "float16"}, {}, ("float16", "dtype: bfloat16")),
        ({"bnb_4bit_quant_storage": "float16"}, {}, ("float16", "dtype: bfloat16")),
        ({"dtype": "bfloat16"}, {"fp16": True, "bf16": False}, ("fp16: true", "bf16: true")),
    ],
)
@pytest.mark.parametrize("name", ["deepspeed_zero3", "fsdp"])
def test_qlora_sharded_float16_is_refused(launched, name, values, train, needles):
    launched(name)
    with pytest.raises(SFTKeyError) as error:
        check_sharding_compatibility(qlora(**values), training_args(**train))
    assert_one_line_with(error, *needles)


def test_qlora_fsdp_paged_adamw_8bit_is_refused(launched):
    from transformers.training_args import OptimizerNames

    launched("fsdp")
    with pytest.raises(SFTKeyError) as error:
        check_sharding_compatibility(qlora(dtype="bfloat16"), training_args(optim=OptimizerNames.PAGED_ADAMW_8BIT))
    assert_one_line_with(error, "paged_adamw_8bit", "adamw_torch")
    launched("deepspeed_zero2")  # not an FSDP problem: fine elsewhere
    assert check_sharding_compatibility(qlora(), training_args(optim="paged_adamw_8bit")) == []


def test_qlora_fsdp_with_orig_params_warns(launched, caplog):
    launched("fsdp", "--fsdp_use_orig_params", "true", "--fsdp_cpu_ram_efficient_loading", "false")
    with caplog.at_level("WARNING", logger="sftkey_trl.train.distributed"):
        check_sharding_compatibility(qlora(dtype="bfloat16"), training_args())
    assert "fsdp_use_orig_params: true" in caplog.text
    assert "fsdp_cpu_ram_efficient_loading: false" in caplog.text


def test_qlora_zero3_with_param_offload_warns(launched, caplog):
    launched("deepspeed_zero3", "--offload_param_device", "cpu")
    with caplog.at_level("WARNING", logger="sftkey_trl.train.distributed"):
        check_sharding_compatibility(qlora(dtype="bfloat16"), training_args())
    assert "offload" in caplog.text


@pytest.mark.parametrize("quantised", [False, True])
def test_zero3_without_16bit_save_is_refused(launched, quantised):
    launched("deepspeed_zero3", "--zero3_save_16bit_model", "false")
    model_args = qlora(dtype="bfloat16") if quantised else ModelConfig(model_name_or_path="m")
    with pytest.raises(SFTKeyError) as error:
        check_sharding_compatibility(model_args, training_args())
    assert_one_line_with(error, "zero3_save_16bit_model: true", "deepspeed_zero3.yaml")


def test_zero3_json_without_16bit_save_is_refused(launched):
    launched(None)
    with pytest.raises(SFTKeyError):
        check_sharding_compatibility(qlora(), training_args(deepspeed={"zero_optimization": {"stage": 3}}))


def test_qlora_with_fsdp_from_training_arguments(launched, tmp_path):
    from sftkey_trl.recipe.schema import SFTKeyConfig

    launched(None)
    args = SFTKeyConfig(
        output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none", fsdp=True, fsdp_config={"version": 2}
    )
    with pytest.raises(SFTKeyError):
        check_sharding_compatibility(ModelConfig(model_name_or_path="m", use_peft=True, load_in_8bit=True), args)
    model_args = qlora(dtype="bfloat16")
    assert resolve_sharding_defaults(model_args, args) == ["bnb_4bit_quant_storage: uint8 -> bfloat16"]
