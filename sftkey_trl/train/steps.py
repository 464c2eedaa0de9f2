"""A stage's resolved training arguments and the batch arithmetic every other module reads from here."""

from __future__ import annotations

import dataclasses
import math

from trl import SFTConfig

from ..errors import SFTKeyError, invalid_arguments
from .objectives import Stage


def accumulation_steps(args: SFTConfig, processes: int) -> int:
    """Gradient accumulation: derived from `global_batch_size` when set (which must divide evenly)."""
    if not getattr(args, "global_batch_size", None):
        return args.gradient_accumulation_steps
    per_step = args.per_device_train_batch_size * processes
    if args.global_batch_size % per_step:
        plural = "process" if processes == 1 else "processes"
        raise SFTKeyError(
            f"`global_batch_size: {args.global_batch_size}` is not a multiple of per_device_train_batch_size "
            f"{args.per_device_train_batch_size} x {processes} {plural} = {per_step}; change one of them"
        )
    return args.global_batch_size // per_step


def global_batch(args: SFTConfig, processes: int) -> int:
    """Examples per optimizer step across all processes."""
    return args.per_device_train_batch_size * accumulation_steps(args, processes) * processes


def stage_training_args(base: SFTConfig, stage: Stage, output_dir: str, processes: int = 1) -> SFTConfig:
    """The training arguments of one stage: the recipe's values with the stage's overrides applied and gradient
    accumulation derived from `global_batch_size`, so the process count does not change the optimisation."""
    changes = {**stage.overrides, "output_dir": output_dir}
    try:
        args = dataclasses.replace(base, **changes)
    except Exception as error:  # TRL's __post_init__ raises many types for values it refuses
        values = {f.name: getattr(base, f.name) for f in dataclasses.fields(base) if f.init} | changes
        recipe = {key: value for key, value in values.items() if key not in stage.overrides}
        where = f"stage `{stage.name}`: "
        raise invalid_arguments(error, [(type(base), stage.overrides, recipe)], where) from error
    try:
        args.gradient_accumulation_steps = accumulation_steps(args, processes)
    except SFTKeyError as error:
        raise SFTKeyError(f"stage `{stage.name}`: {error}") from None
    return args


def optimizer_steps(args: SFTConfig, num_rows: int, processes: int = 1) -> int:
    """Optimizer steps a stage takes over `num_rows` training rows, as `transformers.Trainer` counts them."""
    if args.max_steps and args.max_steps > 0:
        return int(args.max_steps)
    return math.ceil(args.num_train_epochs * steps_per_epoch(args, num_rows, processes))


def steps_per_epoch(args: SFTConfig, num_rows: int, processes: int = 1) -> int:
    """Optimizer steps in one epoch over `num_rows` rows, as `transformers.Trainer` counts them: each process's
    last batch and last accumulation group count even when short (rounded up, never down)."""
    per_process = math.ceil(num_rows / processes)
    batches = math.ceil(per_process / args.per_device_train_batch_size)
    accumulation = accumulation_steps(args, processes)
    return max(batches // accumulation + int(batches % accumulation > 0), 1)


def keep_best_interval(args: SFTConfig, num_rows: int, processes: int = 1) -> int:
    """Optimizer steps between keep_best's evaluations: `eval_steps`, read as Trainer reads it (below 1: that
    fraction of the stage's steps, rounded up), else twice an epoch (half of Trainer's steps per epoch)."""
    if args.eval_steps:
        if args.eval_steps < 1:
            return max(1, math.ceil(optimizer_steps(args, num_rows, processes) * args.eval_steps))
        return int(args.eval_steps)
    return max(1, steps_per_epoch(args, num_rows, processes) // 2)
