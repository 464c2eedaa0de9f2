"""Simulated `accelerate launch` environments shared by the distributed tests (CPU only)."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DeepSpeedPlugin
from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env, prepare_simple_launcher_cmd_env
from trl import ModelConfig

from sftkey_trl.train import distributed

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
