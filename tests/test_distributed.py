"""Accelerate configs, launch detection and the QLoRA + sharding rules (CPU only: launches are simulated).

A launch is simulated the way `accelerate launch` does it: accelerate's own launcher code reads the YAML and
builds the environment each training process gets; the tests put that environment in `os.environ` and build the
training arguments the way transformers does under it.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DeepSpeedPlugin, DistributedType
from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env, prepare_simple_launcher_cmd_env
from trl import ModelConfig

from sftkey_trl import distributed
from sftkey_trl.distributed import (
    check_sharding_compatibility,
    detect_launch,
    is_main_process,
    quantized_device_map,
    world_size,
)
from sftkey_trl.errors import SFTKeyError

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "accelerate_configs").glob("*.yaml"))
CONFIG_NAMES = [path.stem for path in CONFIGS]
MULTI_GPU_CONFIGS = ["multi_gpu", "deepspeed_zero2", "deepspeed_zero3", "fsdp"]
LAUNCH_PREFIXES = ("ACCELERATE_", "FSDP_")


def launch_args(path: Path, *overrides: str):
    """Accelerate's own parsing and validation of `accelerate launch --config_file PATH [overrides] recipes/run.py`."""
    parser = launch_command_parser()
    args = parser.parse_args(["--config_file", str(path), *overrides, "recipes/run.py", "--config", "x.yaml"])
    return _validate_launch_command(args)


def launch_env(name: str, *overrides: str) -> dict[str, str]:
    """The accelerate/FSDP environment variables a training process gets from `accelerate launch` with this config."""
    args, defaults, _ = launch_args(ROOT / "accelerate_configs" / f"{name}.yaml", *overrides)
    args.main_process_port = 0  # a free port: nothing is started, but the launcher checks the port
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
        _, env = prepare_deepspeed_cmd_env(args)
    elif args.use_fsdp or args.multi_gpu:
        env = prepare_multi_gpu_env(args)
    else:
        _, env = prepare_simple_launcher_cmd_env(args)
    env = {key: value for key, value in env.items() if key.startswith(LAUNCH_PREFIXES)}
    env["WORLD_SIZE"], env["RANK"] = str(args.num_processes), "0"  # what torchrun adds for each process
    return env


@pytest.fixture()
def launched(monkeypatch):
    """Put this process 'under' `accelerate launch --config_file accelerate_configs/<name>.yaml`; returns a setter.

    `ranks=False` leaves out WORLD_SIZE/RANK: real training arguments would then try to join a process group.
    The accelerate states that real training arguments create are restored afterwards.
    """
    from accelerate.state import AcceleratorState, PartialState

    saved = [(state, dict(state._shared_state)) for state in (PartialState, AcceleratorState)]
    env_before = set(os.environ)
    monkeypatch.setattr(distributed, "_initialized_state", lambda: None)  # ignore states other tests created

    def enter(name: str | None, *overrides: str, ranks: bool = True, **extra: str) -> dict[str, str]:
        for key in list(os.environ):
            if key.startswith(LAUNCH_PREFIXES) or key in ("WORLD_SIZE", "RANK"):
                monkeypatch.delenv(key)
        env = launch_env(name, *overrides) if name else {}
        if not ranks:
            env = {key: value for key, value in env.items() if key not in ("WORLD_SIZE", "RANK")}
        env.update(extra)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        return env

    yield enter
    for key in set(os.environ) - env_before:  # e.g. FSDP_CPU_RAM_EFFICIENT_LOADING, set by transformers itself
        if key.startswith(LAUNCH_PREFIXES):
            os.environ.pop(key)
    for state, shared in saved:
        state._shared_state.clear()
        state._shared_state.update(shared)


def training_args(device: str = "cuda:0", **values):
    """Training arguments as transformers builds them under the current environment.

    transformers creates `deepspeed_plugin = DeepSpeedPlugin()` when `ACCELERATE_USE_DEEPSPEED` is set (its weakref
    step needs deepspeed, which is not installed here, so the object is built the same way but by hand).
    """
    plugin = DeepSpeedPlugin() if os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true" else None
    fields = dict(
        deepspeed=None,
        deepspeed_plugin=plugin,
        fsdp=None,
        fsdp_config=None,
        fsdp_plugin_args=None,
        fp16=False,
        bf16=True,
        optim="adamw_torch",
        device=torch.device(device),
    )
    fields.update(values)
    return SimpleNamespace(**fields)


def qlora(**values) -> ModelConfig:
    return ModelConfig(model_name_or_path="m", use_peft=True, load_in_4bit=True, **values)


def assert_one_line_with(error: pytest.ExceptionInfo, *needles: str) -> None:
    message = str(error.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message


# ---------------------------------------------------------------- the YAML files ----------------------------------


def test_all_expected_configs_exist():
    assert {"single_gpu", *MULTI_GPU_CONFIGS} <= set(CONFIG_NAMES)


@pytest.mark.parametrize("path", CONFIGS, ids=CONFIG_NAMES)
def test_config_is_accepted_by_accelerate(path):
    config = load_config_from_file(str(path))  # raises on unknown top-level keys
    assert isinstance(config, ClusterConfig)
    # keys inside deepspeed_config / fsdp_config are copied onto the launch arguments: each must be a real one
    parser = launch_command_parser()
    known = {action.dest for action in parser._actions}
    for key in config.deepspeed_config:
        assert key in known, f"{path.name}: unknown deepspeed_config key {key}"
    for key in config.fsdp_config:
        assert (key if key.startswith("fsdp_") else f"fsdp_{key}") in known, f"{path.name}: unknown fsdp key {key}"
    launch_args(path)  # accelerate's launch validation accepts it
    # precision comes from the recipe's bf16 flag (the Trainer's), never from the accelerate config
    assert config.mixed_precision == "no"
    assert config.use_cpu is False


@pytest.mark.parametrize("path", CONFIGS, ids=CONFIG_NAMES)
def test_config_header_has_an_exact_launch_line(path):
    lines = path.read_text().splitlines()
    header = []
    for line in lines:
        if not line.startswith("#"):
            break
        header.append(line)
    assert len(header) >= 2, f"{path.name}: needs a header (when to use it, and the launch line)"
    launch = [line for line in header if "accelerate launch" in line]
    assert launch, f"{path.name}: no launch line in the header"
    match = re.search(r"accelerate launch --config_file (\S+) (\S+) --config recipes/\S+\.yaml$", launch[0])
    assert match, launch[0]
    config_file, script = match.groups()
    assert config_file == f"accelerate_configs/{path.name}"
    assert (ROOT / config_file).is_file() and (ROOT / script).is_file()
    config = load_config_from_file(str(path))
    if path.stem in MULTI_GPU_CONFIGS:
        assert config.num_processes == 8
        assert "--num_processes N" in "\n".join(header)


def test_zero3_gathers_16bit_weights_on_save():
    config = load_config_from_file(str(ROOT / "accelerate_configs/deepspeed_zero3.yaml"))
    assert config.distributed_type == DistributedType.DEEPSPEED
    assert config.deepspeed_config["zero_stage"] == 3
    assert config.deepspeed_config["zero3_save_16bit_model"] is True
    assert config.deepspeed_config["zero3_init_flag"] is True
    assert config.deepspeed_config["deepspeed_multinode_launcher"] == "standard"
    # gradient accumulation / clipping are left to the training arguments (the stages derive accumulation)
    assert "gradient_accumulation_steps" not in config.deepspeed_config


def test_zero3_launch_gives_deepspeed_a_16bit_save(launched):
    launched("deepspeed_zero3")
    plugin = DeepSpeedPlugin()
    assert plugin.zero_stage == 3
    assert plugin.deepspeed_config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert plugin.gradient_accumulation_steps == "auto"


def test_fsdp_config_reloads_with_from_pretrained_and_suits_lora(launched):
    config = load_config_from_file(str(ROOT / "accelerate_configs/fsdp.yaml"))
    fsdp = config.fsdp_config
    assert fsdp["fsdp_state_dict_type"] == "FULL_STATE_DICT"
    assert fsdp["fsdp_use_orig_params"] is False
    assert fsdp["fsdp_cpu_ram_efficient_loading"] is True and fsdp["fsdp_sync_module_states"] is True
    assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    env = launched("fsdp")
    assert env["ACCELERATE_USE_FSDP"] == "true"
    assert env["FSDP_STATE_DICT_TYPE"] == "FULL_STATE_DICT" and env["FSDP_USE_ORIG_PARAMS"] == "false"


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
    from sftkey_trl.config import SFTKeyConfig

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


# ---------------------------------------------------------------- device map ----------------------------------------


def test_device_map_cpu_single_process(launched, tmp_path):
    from sftkey_trl.config import SFTKeyConfig

    launched(None)
    args = SFTKeyConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none")
    assert quantized_device_map(args) == {"": "cpu"}


@pytest.mark.parametrize("name", ["single_gpu", "multi_gpu", "deepspeed_zero2"])
def test_device_map_each_rank_its_own_gpu(launched, name):
    launched(name)
    assert quantized_device_map(training_args(device="cuda:3")) == {"": 3}


def test_device_map_cuda_without_index(launched, monkeypatch):
    launched("multi_gpu")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 5)
    assert quantized_device_map(training_args(device="cuda")) == {"": 5}


@pytest.mark.parametrize("name", ["deepspeed_zero3", "fsdp"])
def test_device_map_none_when_the_engine_shards(launched, name):
    launched(name)

    class NoDevice(SimpleNamespace):
        @property
        def device(self):
            raise AssertionError("the device must not be touched (it would initialise the process group)")

    args = training_args()
    assert quantized_device_map(NoDevice(**{k: v for k, v in vars(args).items() if k != "device"})) is None


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
    with caplog.at_level("WARNING", logger="sftkey_trl.distributed"):
        fixes = check_sharding_compatibility(model_args, training_args())
    assert fixes == ["bnb_4bit_quant_storage: uint8 -> bfloat16", "dtype: auto -> bfloat16"]
    assert (model_args.bnb_4bit_quant_storage, model_args.dtype) == ("bfloat16", "bfloat16")
    assert "bnb_4bit_quant_storage" in caplog.text
    assert check_sharding_compatibility(model_args, training_args()) == []  # idempotent (one call per stage is fine)
    # what modeling.py builds from it
    from sftkey_trl.modeling import DTYPES, quantization_config

    config = quantization_config(model_args)
    assert config.bnb_4bit_quant_storage == torch.bfloat16 == DTYPES[model_args.dtype]
    assert config.bnb_4bit_compute_dtype == torch.bfloat16


def test_qlora_sharded_storage_follows_a_float_dtype(launched):
    launched("fsdp")
    model_args = qlora()  # TRL's default dtype: float32
    assert check_sharding_compatibility(model_args, training_args()) == ["bnb_4bit_quant_storage: uint8 -> float32"]
    assert (model_args.bnb_4bit_quant_storage, model_args.dtype) == ("float32", "float32")


def test_qlora_sharded_dtype_follows_an_explicit_float_storage(launched):
    launched("deepspeed_zero3")
    model_args = qlora(bnb_4bit_quant_storage="bfloat16")
    assert check_sharding_compatibility(model_args, training_args()) == ["dtype: float32 -> bfloat16"]
    assert model_args.dtype == "bfloat16"


def test_qlora_sharded_with_fp16_training_uses_float32_storage(launched):
    launched("fsdp")
    model_args = qlora(dtype=None)
    check_sharding_compatibility(model_args, training_args(fp16=True, bf16=False))
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
    with caplog.at_level("WARNING", logger="sftkey_trl.distributed"):
        check_sharding_compatibility(qlora(dtype="bfloat16"), training_args())
    assert "fsdp_use_orig_params: true" in caplog.text
    assert "fsdp_cpu_ram_efficient_loading: false" in caplog.text


def test_qlora_zero3_with_param_offload_warns(launched, caplog):
    launched("deepspeed_zero3", "--offload_param_device", "cpu")
    with caplog.at_level("WARNING", logger="sftkey_trl.distributed"):
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
    from sftkey_trl.config import SFTKeyConfig

    launched(None)
    args = SFTKeyConfig(
        output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none", fsdp=True, fsdp_config={"version": 2}
    )
    with pytest.raises(SFTKeyError):
        check_sharding_compatibility(ModelConfig(model_name_or_path="m", use_peft=True, load_in_8bit=True), args)
    model_args = qlora(dtype="bfloat16")
    assert check_sharding_compatibility(model_args, args) == ["bnb_4bit_quant_storage: uint8 -> bfloat16"]


# ---------------------------------------------------------------- Slurm example and docs ----------------------------


def test_slurm_example_is_valid_bash_and_uses_existing_configs():
    script = ROOT / "scripts" / "slurm_multinode.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert "accelerate_configs/deepspeed_zero3.yaml" in text
    for flag in ("--num_machines", "--machine_rank", "--main_process_ip", "--main_process_port"):
        assert flag in text
    for path in re.findall(r"accelerate_configs/\S+?\.yaml", text):
        assert (ROOT / path).is_file(), path


@pytest.mark.parametrize("name", ["deepspeed_zero3", "fsdp"])
def test_multinode_launch_arguments(name):
    """The Slurm script's flags, as accelerate turns them into the per-node launcher settings (machine rank 1)."""
    args, defaults, _ = launch_args(
        ROOT / "accelerate_configs" / f"{name}.yaml",
        *("--num_machines", "2", "--num_processes", "16", "--machine_rank", "1"),
        *("--main_process_ip", "node-0", "--main_process_port", "29500"),
    )
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
        cmd, env = prepare_deepspeed_cmd_env(args)
        assert cmd is None  # `standard`: torchrun-style, no pdsh/ssh `deepspeed --hostfile` command
        assert env["ACCELERATE_USE_DEEPSPEED"] == "true"
    else:
        env = prepare_multi_gpu_env(args)
        assert env["ACCELERATE_USE_FSDP"] == "true"
    assert (args.nproc_per_node, args.nnodes, args.node_rank) == ("8", "2", 1)
    # torchrun's rendezvous point on machine 0 (accelerate passes it as rdzv_endpoint with the static backend)
    assert args.rdzv_endpoint == "node-0:29500" and args.rdzv_backend == "static"


def test_docs_name_existing_configs():
    text = (ROOT / "docs" / "distributed.md").read_text()
    named = set(re.findall(r"accelerate_configs/[\w.-]+?\.yaml", text))
    assert {f"accelerate_configs/{name}.yaml" for name in ["single_gpu", *MULTI_GPU_CONFIGS]} <= named
    for path in named:
        assert (ROOT / path).is_file(), path
