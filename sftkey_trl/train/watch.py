"""Each optimizer step of a stage, watched: a loss or gradient norm that turns NaN or infinite stops the stage with
one line (never a loss of 0 from transformers' `logging_nan_inf_filter`, never NaN weights saved as the stage), and
the whole stage's totals (loss, tokens, steps, seconds) go into every checkpoint, so that a killed and resumed stage
reports all of itself rather than the part after the resume.

Every rank decides alike: the step's verdict is one all-reduce of the ranks' non-finite counts (the gradient norm is
computed from the reduced gradients, the loss is each rank's own), so all ranks stop at the same step and none waits
in a collective for one that stopped.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback

from ..errors import SFTKeyError

TOTALS_KEY = "SFTKeyStageTotals"  # the totals' entry in trainer_state.json's `stateful_callbacks`


@dataclass
class StageTotals:
    """What a stage has trained so far: the sum of its optimizer steps' losses (each the mean over the ranks, as
    Trainer logs it), its steps, the tokens it trained on and its training seconds."""

    loss_sum: float = 0.0
    steps: int = 0
    train_tokens: int = 0
    train_seconds: float = 0.0


def saved_totals(checkpoint: str | Path) -> StageTotals | None:
    """The totals a checkpoint holds (None: written before they were recorded)."""
    try:
        trainer_state = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
        saved = (trainer_state.get("stateful_callbacks") or {}).get(TOTALS_KEY)
        return StageTotals(**saved) if isinstance(saved, dict) else None
    except (OSError, ValueError, TypeError):
        return None


def step_verdict(nan_losses: float, inf_losses: float, bad_norms: float, grad_norm) -> str | None:
    """What went non-finite in a step, from the counts summed over ranks and micro-batches, or None."""
    if nan_losses:
        return "the loss is NaN"
    if inf_losses:
        return "the loss is infinite"
    if bad_norms:
        return f"the gradient norm is {float(grad_norm) if grad_norm is not None else 'not finite'}"
    return None


def divergence_message(stage: str, step: int, max_steps: int, what: str, args) -> str:
    """The one line for a stage that diverged at `step`: what, where, the likely fix and the flag of the rerun."""
    if step <= 1:  # the first step's loss and gradients come before any update: not the learning rate
        fix = "it happened before any update, so check the data, the incoming weights and `dtype`"
    else:
        fix = f"lower `learning_rate` ({args.learning_rate:g} in this stage)"
        if not args.max_grad_norm:
            fix += ", clip gradients with `max_grad_norm: 1.0`"
        fix += ", or check the data and `dtype`"
    if args.fp16:
        fix += " (fp16 overflows: use bf16)"
    return (
        f"stage `{stage}` diverged at step {step} of {max_steps}: {what}, so it stops and nothing of it is kept as "
        f"the stage's output; {fix}, then rerun with `--restart_from {stage}`"
    )


class StageWatch(TrainerCallback):
    """The watch of one `SFTKeyTrainer` stage: the trainer reports each micro-batch's loss (`add_loss`) and each
    step's gradient norm (`grad_norm`); at every step's end the ranks decide together whether the stage diverged, and
    the totals are recorded into the state a checkpoint saves. Added first among the stage's callbacks, so that no
    later one (keep_best) evaluates or snapshots a diverged model."""

    def __init__(self, trainer, stage: str):
        self.trainer, self.stage = trainer, stage
        self.totals = StageTotals()
        self.earlier = StageTotals()  # what the checkpoint resumed from had trained
        self.unrecorded_steps = 0  # steps of a checkpoint written before the totals were recorded
        self.started = time.perf_counter()
        self.pending: torch.Tensor | None = None  # [NaN losses, infinite losses, loss sum] since the last step
        self.grad_norm: float | torch.Tensor | None = None

    def begin(self, checkpoint: str | Path | None) -> None:
        """Start the clock and, resuming from `checkpoint`, carry on from the totals it holds (a checkpoint written
        before they were recorded: the totals count from its step; `resumed_totals_from_step` says so)."""
        saved = saved_totals(checkpoint) if checkpoint is not None else StageTotals()
        if saved is None:
            step = int(json.loads((Path(checkpoint) / "trainer_state.json").read_text()).get("global_step", 0))
            saved, self.unrecorded_steps = StageTotals(steps=step), step
        self.earlier, self.totals = saved, dataclasses.replace(saved)
        self.started = time.perf_counter()

    def add_loss(self, loss: torch.Tensor) -> None:
        loss = loss.detach().float().reshape(-1).sum()
        finite = torch.nan_to_num(loss, nan=0.0, posinf=0.0, neginf=0.0)
        values = torch.stack([loss.isnan().float(), loss.isinf().float(), finite])
        self.pending = values if self.pending is None else self.pending + values.to(self.pending.device)

    def seconds(self) -> float:
        """The stage's training seconds: the checkpoint's and this run's."""
        return self.earlier.train_seconds + time.perf_counter() - self.started

    def on_step_end(self, args, state, control, **kwargs):
        accelerator = self.trainer.accelerator
        pending = self.pending if self.pending is not None else torch.zeros(3, device=accelerator.device)
        norm = self.grad_norm
        bad_norm = norm is not None and not math.isfinite(float(norm)) and not accelerator.optimizer_step_was_skipped
        step = torch.cat([pending, torch.tensor([float(bad_norm)], device=pending.device)])
        nan_losses, inf_losses, loss_sum, bad_norms = accelerator.reduce(step, reduction="sum").tolist()
        self.pending, self.grad_norm = None, None
        verdict = step_verdict(nan_losses, inf_losses, bad_norms, norm)
        if verdict is not None:
            for callback in self.trainer.callback_handler.callbacks:  # end the progress bar's line before ours
                if isinstance(callback, ProgressCallback):
                    callback.on_train_end(args, state, control)
            raise SFTKeyError(divergence_message(self.stage, state.global_step, state.max_steps, verdict, args))
        self.totals.loss_sum += loss_sum / accelerator.num_processes
        self.totals.steps = state.global_step
        self.totals.train_tokens = int(self.trainer._total_train_tokens)
        self.totals.train_seconds = self.seconds()
        # Trainer writes `stateful_callbacks` into the checkpoint it saves after this step, if any
        state.stateful_callbacks[TOTALS_KEY] = dataclasses.asdict(self.totals)

    def whole_stage(self) -> dict:
        """The whole stage, resumed or not: mean loss per optimizer step, steps, tokens and seconds."""
        steps = self.totals.steps - self.unrecorded_steps
        summary = {
            "train_loss": self.totals.loss_sum / steps if steps > 0 else 0.0,
            "optimizer_steps": self.totals.steps,
            "train_tokens": self.totals.train_tokens,
            "train_seconds": self.seconds(),
        }
        if self.unrecorded_steps:
            summary["resumed_totals_from_step"] = self.unrecorded_steps
        return summary
