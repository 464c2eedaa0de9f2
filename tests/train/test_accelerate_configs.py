"""The accelerate configs: parsed by accelerate, exact launch headers, the Slurm example and the docs.

A launch is simulated the way `accelerate launch` does it (see `launching.py`): accelerate's own launcher code reads
the YAML and builds the environment each training process gets; the tests put that environment in `os.environ`.
"""

from __future__ import annotations

import re
import subprocess

import pytest
from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
from accelerate.commands.launch import launch_command_parser
from accelerate.utils import DeepSpeedPlugin, DistributedType
from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env
from launching import (  # the simulated launches shared with test_accelerate_configs.py / test_distributed.py
    CONFIG_NAMES,
    CONFIGS,
    MULTI_GPU_CONFIGS,
    ROOT,
    launch_args,
)

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
    match = re.search(r"accelerate launch (-q )?--config_file (\S+) (\S+) --config recipes/\S+\.yaml$", launch[0])
    assert match, launch[0]
    quiet, config_file, script = match.groups()
    assert bool(quiet) == (path.stem not in MULTI_GPU_CONFIGS), "`-q` on one-process launches (torchrun ignores it)"
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
