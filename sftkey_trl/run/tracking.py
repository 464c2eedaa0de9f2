"""What a stage reports while it trains: on the console, a line of numbers per logging step (`LogLines`); with
`report_to`, each stage is its own tracked run `<run>/<stage>` (`run_name`, else the output folder's name), and
TensorBoard writes to `<output_dir>/runs/<run>/<stage>` (or `$TENSORBOARD_LOGGING_DIR`)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from tqdm.auto import tqdm
from transformers import PrinterCallback, ProgressCallback, TrainerCallback
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


def log_line(logs: dict, step: int, max_steps: int) -> str:
    """One logging step as a line of numbers: `step 10/40: loss 1.234, grad_norm 0.5, learning_rate 0.0002, ...`."""
    shown = []
    for key, value in logs.items():
        if key == "total_flos":
            continue
        if isinstance(value, float):
            value = f"{value:.0f}" if value.is_integer() and abs(value) < 1e15 else f"{value:.4g}"
        shown.append(f"{key} {value}")
    return f"step {step}/{max_steps}: " + ", ".join(shown)


class LogLines(ProgressCallback):
    """transformers' progress bar, drawn only on a terminal (a pipe or a log file gets no bar), with each log as one
    line of numbers above it."""

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            off = True if args.disable_tqdm else None  # None: tqdm draws on a terminal only
            self.training_bar = tqdm(total=state.max_steps, dynamic_ncols=True, disable=off)
        self.current_step = 0

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            tqdm.write(log_line(logs, state.global_step, state.max_steps))


def _use_log_lines(trainer) -> None:
    """Give `trainer` the `LogLines` console in place of transformers' progress bar or, with `disable_tqdm`, its
    printer of log dicts."""
    for replaced in (ProgressCallback, PrinterCallback):
        trainer.pop_callback(replaced)
    trainer.add_callback(LogLines)


def track_stage(trainer, output_dir: Path) -> None:
    """Give one stage's trainer its console (`LogLines`) and its own tracked run: its TensorBoard folder, and a W&B
    run that ends with it."""
    _use_log_lines(trainer)
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, TensorBoardCallback):
            callback.logging_dir = str(tensorboard_dir(output_dir, trainer.args.run_name))
    if "wandb" in trainer.args.report_to:
        trainer.add_callback(EndRunAtTrainEnd())
