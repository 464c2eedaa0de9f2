"""Experiment tracking across stages: with `report_to`, each stage is its own run `<run>/<stage>` (`run_name`, else
the output folder's name); TensorBoard writes to `<output_dir>/runs/<run>/<stage>` (or `$TENSORBOARD_LOGGING_DIR`)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from transformers import TrainerCallback
from transformers.integrations import TensorBoardCallback


def stage_run_name(args, output_dir: Path, stage_name: str) -> str:
    """`<run>/<stage>`: the run name a stage reports under."""
    return f"{args.run_name or Path(output_dir).name}/{stage_name}"


def tensorboard_dir(output_dir: Path, run_name: str) -> Path:
    """Where TensorBoard writes a stage's events; transformers 5 has no `logging_dir` argument, only this variable."""
    root = os.environ.get("TENSORBOARD_LOGGING_DIR")
    return (Path(root).expanduser() if root else Path(output_dir) / "runs") / run_name


class EndRunAtTrainEnd(TrainerCallback):
    """Finish the W&B run when a stage ends: transformers' WandbCallback leaves it open, so the next stage's
    trainer would log into it instead of starting its own run (trackio, MLflow and TensorBoard close theirs)."""

    def on_train_end(self, args, state, control, **kwargs):
        wandb = sys.modules.get("wandb")
        if state.is_world_process_zero and wandb is not None and getattr(wandb, "run", None) is not None:
            wandb.finish()


def track_stage(trainer, output_dir: Path) -> None:
    """Give one stage's trainer its own tracked run: its TensorBoard folder, and a W&B run that ends with it."""
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, TensorBoardCallback):
            callback.logging_dir = str(tensorboard_dir(output_dir, trainer.args.run_name))
    if "wandb" in trainer.args.report_to:
        trainer.add_callback(EndRunAtTrainEnd())
