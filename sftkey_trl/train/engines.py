"""A stage's training engine around the Trainer: the checkpointing setting TRL passes it, full parameters while
keep_best generates under FSDP1, and everything it holds released when the stage ends."""

from __future__ import annotations

import gc
from contextlib import contextmanager

import torch


def share_checkpointing_kwargs(training_args) -> None:
    """Make `gradient_checkpointing_kwargs` and `activation_checkpointing_kwargs` one dict while checkpointing is on.

    TRL forces `use_reentrant=True` for PEFT + DeepSpeed ZeRO-3 + checkpointing by assigning a new dict to the
    deprecated `gradient_checkpointing_kwargs` (trl/trainer/sft_trainer.py) when that alias is empty; transformers
    5.24 reads only `activation_checkpointing_kwargs` (trainer.py), which then stays None and checkpoints
    non-reentrantly. With transformers' own default written out (`use_reentrant: False`) both names hold the same,
    non-empty dict, so TRL's change lands where transformers reads it. Call before the Trainer is built."""
    if not getattr(training_args, "activation_checkpointing", False):
        return
    if training_args.activation_checkpointing_kwargs is None:
        training_args.activation_checkpointing_kwargs = {"use_reentrant": False}  # transformers' default for None
    training_args.gradient_checkpointing_kwargs = training_args.activation_checkpointing_kwargs


@contextmanager
def full_parameters(wrapped):
    """Generate from a model trained under FSDP1: its root unit (embeddings, final norm, LM head) stays sharded
    outside a forward of the FSDP wrapper, so gather it for the duration (TRL's own generation does the same,
    `trl.distributed.DistributedBackend.summon_full_params(..., recurse=False)`); the nested units gather
    themselves in their forward, in lockstep on every rank (`synced_gpus`). Call on every rank. FSDP2 keeps its
    parameters reachable through the module's own hooks, and the other engines need nothing: a no-op there."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    if isinstance(wrapped, FSDP):
        with FSDP.summon_full_params(wrapped, recurse=False):
            yield
    else:
        yield


def release_trainer(trainer) -> None:
    """Free what a finished stage's trainer holds beyond the files it wrote: the DeepSpeed engine is destroyed
    (`Accelerator.free_memory`; ZeRO's hooks on the weights would otherwise keep the optimizer and its fp32 state
    alive as long as the model), and the trainer's and its callbacks' references to the model, optimizer and
    scheduler are dropped. The memory is given back at once, not when a garbage collection happens to find it."""
    wrapper = getattr(trainer.accelerator, "deepspeed_engine_wrapped", None)
    module = wrapper.engine.module if wrapper is not None else None  # the model a DeepSpeed engine trained
    del wrapper
    trainer.accelerator.free_memory()
    if module is not None:
        _release_zero3_leftovers(module)
    del module  # no reference from here either when the memory is collected below
    handler = trainer.callback_handler
    handler.model = handler.optimizer = handler.lr_scheduler = handler.train_dataloader = None
    handler.callbacks.clear()  # keep_best's callback holds the trainer, and with it everything above
    trainer.model = trainer.model_wrapped = trainer.optimizer = trainer.lr_scheduler = None
    if hasattr(trainer, "deepspeed"):
        trainer.deepspeed = None
    free_device_memory()


def _release_zero3_leftovers(module) -> None:
    """Drop what DeepSpeed 0.19's ZeRO-3 keeps of a destroyed engine in module-level state, which `destroy()` leaves:
    the engine's model on the forward stack (`parameter_offload.FWD_MODULE_STACK`, pushed when the hooks are set up
    and never popped), and every engine's parameter coordinator and sub-modules in the class-wide `lru_cache` of
    `PartitionedParameterCoordinator.__params_to_release`. From either, the model's hooks keep the engine alive,
    and with it the optimizer's fp32 partitions and Adam state, for the rest of the process (so stage 2 would train
    beside stage 1's optimizer; deepspeedai/DeepSpeed#7204 reports the growth). Both paths were found by
    tests/train/test_deepspeed.py, which checks the engine is gone. The cache is only a cache: it refills."""
    import inspect

    from deepspeed.runtime.zero import parameter_offload
    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator

    stack = parameter_offload.FWD_MODULE_STACK
    stack[:] = [entry for entry in stack if entry is not module]
    # The cached method is wrapped by DeepSpeed's `instrument_w_nvtx`, which keeps the lru_cache as `func`
    instrumented = vars(PartitionedParameterCoordinator).get("_PartitionedParameterCoordinator__params_to_release")
    cached = inspect.getclosurevars(instrumented).nonlocals.get("func") if instrumented is not None else None
    if hasattr(cached, "cache_clear"):
        cached.cache_clear()


def free_device_memory() -> None:
    """Collect unreachable objects now and return cached accelerator memory (for the next stage, or vLLM)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
