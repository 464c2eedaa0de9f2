"""What the launch shards, and which quantised setups work with it: checks to run before the model is loaded.

The engine comes from `accelerate launch`'s environment variables, transformers' `deepspeed_plugin`, or the recipe's
own `deepspeed:` / `fsdp:` training arguments. `detect_launch` reads them without starting anything (no process
group, no CUDA), so it is safe before the model is loaded and in tests.
"""

from __future__ import annotations

import json
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate.state import AcceleratorState, PartialState, is_initialized
from accelerate.utils import get_cpu_distributed_information, get_int_from_env, str_to_bool

from ..errors import SFTKeyError

logger = logging.getLogger(__name__)

FLOAT_STORAGE = ("bfloat16", "float32", "float16")


def _env_flag(name: str, default: bool = False) -> bool:
    return _as_bool(os.environ.get(name), name, default)


def _as_bool(value, name: str, default: bool | None = None) -> bool | None:
    """A launch setting read as accelerate reads it (`str_to_bool`), which would stop on any other word later."""
    if value is None or value == "auto":
        return default
    if isinstance(value, bool):
        return value
    try:
        return bool(str_to_bool(str(value).strip()))
    except ValueError:
        raise SFTKeyError(f"`{name}: {value}` is not a boolean; set it to true or false") from None


@dataclass(frozen=True)
class Launch:
    """How this process was launched, as far as model loading cares: engine "single", "ddp", "deepspeed" or "fsdp"."""

    engine: str = "single"
    zero_stage: int | None = None
    offload_param: bool = False
    zero3_save_16bit_model: bool | None = None
    fsdp_version: int | None = None
    fsdp_use_orig_params: bool | None = None
    fsdp_cpu_ram_efficient_loading: bool | None = None

    @property
    def shards_parameters(self) -> bool:
        """True when the engine splits the weights themselves across processes (ZeRO-3, FSDP)."""
        return self.engine == "fsdp" or (self.engine == "deepspeed" and self.zero_stage == 3)

    @property
    def name(self) -> str:
        if self.engine == "deepspeed":
            return f"DeepSpeed ZeRO-{self.zero_stage}"
        if self.engine == "fsdp":
            return f"FSDP{self.fsdp_version or ''}"
        return {"single": "a single process", "ddp": "DDP"}[self.engine]


def _initialized_state():
    """The `AcceleratorState` (or `PartialState`) if this process already created one, else None; creates nothing."""
    if is_initialized():
        return AcceleratorState()
    if PartialState._shared_state:
        return PartialState()
    return None


def _distributed_type(state) -> str:
    kind = getattr(state, "distributed_type", None)
    return str(getattr(kind, "value", kind) or "")


def _deepspeed_json(config) -> dict:
    """A DeepSpeed config given as a dict, a JSON string or a JSON file path ({} when unreadable)."""
    if isinstance(config, dict):
        return config
    if not isinstance(config, str) or config in ("", "none"):
        return {}
    try:
        return json.loads(config if config.lstrip().startswith("{") else Path(config).read_text())
    except (OSError, ValueError):
        return {}


def _deepspeed_launch(training_args) -> Launch | None:
    plugin = getattr(training_args, "deepspeed_plugin", None)
    config = getattr(training_args, "deepspeed", None)
    if plugin is None and not config and not _env_flag("ACCELERATE_USE_DEEPSPEED"):
        state = _initialized_state()
        if _distributed_type(state) != "DEEPSPEED":
            return None
        plugin = getattr(state, "deepspeed_plugin", None)
    if plugin is not None:
        offload = str(getattr(plugin, "offload_param_device", None) or "none").lower()
        return Launch(
            engine="deepspeed",
            zero_stage=int(getattr(plugin, "zero_stage", 2) or 0),
            offload_param=offload not in ("none", "auto"),
            zero3_save_16bit_model=_as_bool(getattr(plugin, "zero3_save_16bit_model", None), "zero3_save_16bit_model"),
        )
    # A DeepSpeed JSON (recipe `deepspeed:` or accelerate's `deepspeed_config_file`), or accelerate's env variables
    data = _deepspeed_json(config) or _deepspeed_json(os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE"))
    if data:
        zero = data.get("zero_optimization", {}) or {}
        offload = str((zero.get("offload_param") or {}).get("device", "none")).lower()
        key = "stage3_gather_16bit_weights_on_model_save"
        gather = zero.get(key, zero.get("stage3_gather_fp16_weights_on_model_save"))
        return Launch(
            engine="deepspeed",
            zero_stage=int(zero.get("stage", 0) or 0),
            offload_param=offload not in ("none", "auto"),
            zero3_save_16bit_model=False if gather is None else _as_bool(gather, key),  # DeepSpeed's default: false
        )
    return Launch(
        engine="deepspeed",
        zero_stage=get_int_from_env(["ACCELERATE_DEEPSPEED_ZERO_STAGE"], 2),
        offload_param=os.environ.get("ACCELERATE_DEEPSPEED_OFFLOAD_PARAM_DEVICE", "none").lower() not in ("none", ""),
        zero3_save_16bit_model=_env_flag("ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL"),
    )


def _fsdp_launch(training_args) -> Launch | None:
    # Training arguments first: the Trainer builds its FSDP plugin from `fsdp_plugin_args` and fills gaps from env
    plugin_args = getattr(training_args, "fsdp_plugin_args", None) or {}
    fsdp_config = getattr(training_args, "fsdp_config", None) or {}
    if not isinstance(fsdp_config, dict):
        fsdp_config = {}
    fsdp_config = {key.removeprefix("fsdp_"): value for key, value in fsdp_config.items()}
    from_args = bool(getattr(training_args, "fsdp", None)) or bool(plugin_args)
    state = None
    if not from_args and not _env_flag("ACCELERATE_USE_FSDP"):
        state = _initialized_state()
        if _distributed_type(state) != "FSDP":
            return None
    fsdp_plugin = getattr(state, "fsdp_plugin", None)

    def setting(key: str, env: str, default: str) -> bool | None:
        for source in (plugin_args, fsdp_config):
            if source.get(key) is not None:
                return _as_bool(source[key], f"fsdp_{key}")
        if fsdp_plugin is not None and getattr(fsdp_plugin, key, None) is not None:
            return _as_bool(getattr(fsdp_plugin, key), f"fsdp_{key}")
        return _as_bool(os.environ.get(env, default), env)

    # transformers defaults `fsdp_config["version"]` to 2; accelerate's launcher and plugin default to 1
    version = plugin_args.get("fsdp_version", fsdp_config.get("version", 2 if from_args else None))
    if version is None:
        version = getattr(fsdp_plugin, "fsdp_version", None) or os.environ.get("FSDP_VERSION", "1")
    version = int(version)
    use_orig_params = setting("use_orig_params", "FSDP_USE_ORIG_PARAMS", "false") if version == 1 else None
    return Launch(
        engine="fsdp",
        fsdp_version=version,
        fsdp_use_orig_params=use_orig_params,
        fsdp_cpu_ram_efficient_loading=setting("cpu_ram_efficient_loading", "FSDP_CPU_RAM_EFFICIENT_LOADING", "false"),
    )


def detect_launch(training_args) -> Launch:
    """Which engine this process runs under (DeepSpeed and its ZeRO stage, FSDP and its settings, DDP, one process),
    from the training arguments, `accelerate launch`'s variables and an accelerate state only if one exists."""
    return (
        _deepspeed_launch(training_args)
        or _fsdp_launch(training_args)
        or Launch("ddp" if world_size() > 1 else "single")
    )


def world_size() -> int:
    """Number of processes in the job (1 outside a launcher). Never creates the accelerate state, which would start
    the process group before the training arguments choose its backend (and in a dry run)."""
    state = _initialized_state()
    return int(state.num_processes) if state is not None else get_cpu_distributed_information().world_size


def is_main_process() -> bool:
    """True on the process of global rank 0 (the one that logs, saves and writes reports); read like `world_size`."""
    state = _initialized_state()
    return bool(state.is_main_process) if state is not None else get_cpu_distributed_information().rank == 0


def _on_cpu(training_args) -> bool:
    device_type = getattr(getattr(training_args, "device", None), "type", None)
    return bool(getattr(training_args, "use_cpu", False)) or device_type == "cpu"


def check_engine_runs_here(training_args) -> None:
    """Refuse a sharding engine that accelerate would not start on these (CPU) processes; call before loading.

    accelerate 1.15 selects FSDP only on GPU-class devices. DeepSpeed runs on CPU processes, but only without
    `use_cpu` (accelerate then drops it for DDP) and with `ddp_backend: gloo` (else the ranks train apart)."""
    launch = detect_launch(training_args)
    if launch.engine not in ("fsdp", "deepspeed") or not _on_cpu(training_args):
        return
    if launch.engine == "fsdp":
        raise SFTKeyError(
            f"{launch.name} does not run on CPU processes (accelerate shards with FSDP only on GPUs; on CPU it runs "
            "plain DDP or unconnected processes); on CPU launch with accelerate_configs/deepspeed_zero3.yaml "
            "(`ddp_backend: gloo`) or multi_gpu.yaml (`use_cpu: true`)"
        )
    if getattr(training_args, "use_cpu", False):
        raise SFTKeyError(
            f"`use_cpu: true` under {launch.name}: accelerate then ignores DeepSpeed and runs plain DDP; on CPU "
            "processes remove `use_cpu` and set `ddp_backend: gloo`"
        )
    processes = get_int_from_env(["WORLD_SIZE"], 1)  # torchrun's count: accelerate's is 1 in this case
    if processes > 1 and getattr(training_args, "ddp_backend", None) not in ("gloo", "ccl"):
        raise SFTKeyError(
            f"{launch.name} on CPU processes needs `ddp_backend: gloo` (without it accelerate counts one process "
            "per job and the ranks train apart); add `--ddp_backend gloo`"
        )


def release_engine_state(training_args) -> bool:
    """Forget the previous stage's DeepSpeed `AcceleratorState` so the next Trainer can bring its own plugin; True
    when it did. accelerate refuses a second plugin in a live state (transformers#35073), so stage 2 never started
    under DeepSpeed; the process group lives in `PartialState`, which is kept."""
    if getattr(training_args, "deepspeed_plugin", None) is None:
        return False
    if not is_initialized() or _distributed_type(AcceleratorState()) != "DEEPSPEED":
        return False
    AcceleratorState._reset_state()
    return True


PURPOSES = ("train", "evaluate", "merge")


def native_bf16() -> bool:
    """Whether this machine's GPU computes in bfloat16 in hardware (Ampere and later): torch's plain
    `is_bf16_supported()` also counts GPUs that only emulate it (V100, T4), where bf16 runs slowly."""
    return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False))


def rank_device(training_args) -> int | str:
    """This process's own device as a `device_map` value: the CUDA index (the current device when the training
    arguments name none), else the device's name."""
    device = training_args.device
    if device.type == "cuda":
        return torch.cuda.current_device() if device.index is None else device.index
    return "cpu" if device.type == "cpu" else str(device)


def device_map(training_args, purpose: str, quantized: bool = False) -> dict | None:
    """Where `from_pretrained` puts a model: the one rule for every model this project loads.

    - "evaluate": whole on this process's device, under every engine (each rank generates from all the weights;
      without a map `from_pretrained` loads to the CPU, where a 7B model would generate for hours).
    - "train": a quantised model on this process's device under one process, DDP and ZeRO-1/2 (each rank its own
      4-bit copy); otherwise None: the Trainer moves the model to `training_args.device`, and ZeRO-3/FSDP place and
      shard it (transformers refuses a map under ZeRO-3).
    - "merge" (`--merge`): the CPU. Merging needs the unquantised base whole, which often does not fit the GPU a
      QLoRA stage trained on, and the merge itself is a few additions per weight."""
    if purpose not in PURPOSES:
        raise ValueError(f"purpose must be one of {PURPOSES}, not {purpose!r}")
    if purpose == "merge":
        return {"": "cpu"}
    if purpose == "train" and (not quantized or detect_launch(training_args).shards_parameters):
        return None
    return {"": rank_device(training_args)}


@contextmanager
def built_for(training_args, purpose: str):
    """Build the next model partitioned by ZeRO-3 (inside `deepspeed.zero.Init`) exactly when it is trained under
    ZeRO-3 with `zero3_init_flag`, and whole otherwise.

    transformers decides from a process-wide weak reference to a DeepSpeed config, which every `TrainingArguments`
    and every Accelerator's plugin selection sets; one left unset (or set) by an earlier load would decide for the
    next model. So a training load activates its own arguments' config (as accelerate's plugin selection does) and
    any other load builds without one; either way the arguments' config is active again afterwards."""
    plugin = getattr(training_args, "deepspeed_plugin", None)
    launch = detect_launch(training_args)
    if plugin is None or launch.engine != "deepspeed" or launch.zero_stage != 3:
        yield
        return
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    if purpose == "train" and plugin.is_zero3_init_enabled():
        plugin.set_deepspeed_weakref()
    else:
        unset_hf_deepspeed_config()
    try:
        yield
    finally:
        plugin.set_deepspeed_weakref()


def _storage_name(value) -> str | None:
    return None if value is None else str(value).removeprefix("torch.")


def _storage_target(model_args, training_args, launch: Launch) -> str:
    """The float dtype that QLoRA under weight sharding stores 4-bit weights in and loads the model in (see
    `check_sharding_compatibility`); refuses the combinations that have none."""
    storage = _storage_name(getattr(model_args, "bnb_4bit_quant_storage", None))
    dtype = getattr(model_args, "dtype", None)
    fp16 = bool(getattr(training_args, "fp16", False))
    if dtype == "float16" or storage == "float16":
        raise SFTKeyError(
            f"QLoRA under {launch.name} with float16 weights is not supported (float16 training needs float32 4-bit "
            "storage); set `dtype: bfloat16` (or `dtype: float32` on GPUs without bf16) and leave "
            "`bnb_4bit_quant_storage` unset"
        )
    if storage in FLOAT_STORAGE:
        target = storage  # an explicit float storage decides; the model dtype follows it
    elif dtype in FLOAT_STORAGE:
        target = dtype
    else:  # dtype unset or "auto"
        target = "float32" if fp16 else "bfloat16"
    if fp16 and target != "float32":
        raise SFTKeyError(
            f"QLoRA under {launch.name} with `fp16: true` needs float32 4-bit storage, but the storage would be "
            f"{target}; use `bf16: true` instead of fp16, or set `dtype: float32`"
        )
    return target


def resolve_sharding_defaults(model_args, training_args) -> list[str]:
    """QLoRA under ZeRO-3/FSDP: set `bnb_4bit_quant_storage` and `dtype` to the one float dtype it needs; returns
    the changes. A combination with none is left as it is, for `check_sharding_compatibility` to refuse."""
    launch = detect_launch(training_args)
    if not model_args.load_in_4bit or model_args.load_in_8bit or not launch.shards_parameters:
        return []
    try:
        target = _storage_target(model_args, training_args, launch)
    except SFTKeyError:
        return []
    storage = _storage_name(model_args.bnb_4bit_quant_storage) or "uint8"
    fixes = [f"bnb_4bit_quant_storage: {storage} -> {target}"] if storage != target else []
    fixes += [f"dtype: {model_args.dtype} -> {target}"] if model_args.dtype != target else []
    model_args.bnb_4bit_quant_storage = model_args.dtype = target
    if fixes and is_main_process():
        logger.warning("QLoRA under %s needs the 4-bit storage dtype to equal the dtype; set %s", launch.name, fixes)
    return fixes


def check_sharding_compatibility(model_args, training_args) -> list[str]:
    """Refuse quantised + sharding combinations that do not work (one line: the problem and a working alternative);
    never changes `model_args`; returns no notes (it logs them). The rules and their sources are in
    docs/distributed.md."""
    launch = detect_launch(training_args)
    if launch.engine == "deepspeed" and launch.zero_stage == 3 and launch.zero3_save_16bit_model is False:
        raise SFTKeyError(
            "DeepSpeed ZeRO-3 without `zero3_save_16bit_model: true` saves only DeepSpeed shards that the next stage "
            "cannot load; set it (`stage3_gather_16bit_weights_on_model_save: true` in a DeepSpeed JSON) or launch "
            "with accelerate_configs/deepspeed_zero3.yaml"
        )
    load_in_4bit = bool(getattr(model_args, "load_in_4bit", False))
    load_in_8bit = bool(getattr(model_args, "load_in_8bit", False))
    if not (load_in_4bit or load_in_8bit) or not launch.shards_parameters:
        return []
    if load_in_8bit:
        raise SFTKeyError(
            f"`load_in_8bit` cannot be sharded by {launch.name} (bitsandbytes int8 weights are not float tensors); "
            "use `load_in_4bit: true` (QLoRA works with ZeRO-3 and FSDP), or keep 8-bit and launch with "
            "accelerate_configs/deepspeed_zero2.yaml or multi_gpu.yaml"
        )
    _storage_target(model_args, training_args, launch)
    main = is_main_process()
    if launch.engine == "fsdp":
        optim = getattr(training_args, "optim", None)
        optim = str(getattr(optim, "value", optim) or "").lower()
        if optim == "paged_adamw_8bit":
            raise SFTKeyError(
                "`optim: paged_adamw_8bit` with QLoRA under FSDP fails when a checkpoint is saved (peft caveat); use "
                "`optim: adamw_torch` (or `paged_adamw_32bit`)"
            )
        if main and launch.fsdp_version == 1 and launch.fsdp_use_orig_params:
            logger.warning(
                "QLoRA under FSDP1 with `fsdp_use_orig_params: true`: peft's recipe sets it to false for its memory "
                "savings (accelerate_configs/fsdp.yaml does)"
            )
        if main and launch.fsdp_version == 1 and launch.fsdp_cpu_ram_efficient_loading is False:
            logger.warning(
                "QLoRA under FSDP1 with `fsdp_cpu_ram_efficient_loading: false`: peft's recipe sets it to true "
                "(accelerate_configs/fsdp.yaml does)"
            )
        if main and launch.fsdp_version == 2:
            logger.info("QLoRA under FSDP2: peft documents QLoRA with FSDP1 (accelerate_configs/fsdp.yaml)")
    if main and launch.engine == "deepspeed" and launch.offload_param:
        logger.warning("QLoRA under ZeRO-3 with parameter offload uses more GPU memory than without (peft caveat)")
    return []
