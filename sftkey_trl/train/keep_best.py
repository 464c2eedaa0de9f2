"""Keep the best model of a stage: evaluate on the validation split before the stage and every `eval_steps` steps,
make the stage's output the best weights by a named metric (the incoming ones included), optionally stop after
`patience` evaluations without improvement.

The state goes into every checkpoint's `trainer_state.json` and is restored on resume, so a killed and resumed stage
keeps what an uninterrupted one keeps. Snapshots live in `<stage>/best/step-N/`; the one the newest checkpoint names
is kept until a newer checkpoint names another.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from ..errors import SFTKeyError
from ..files import discard, mark_folder, read_json
from .engines import full_parameters

logger = logging.getLogger(__name__)

STATE_KEY = "SFTKeyKeepBest"  # the state's entry in trainer_state.json's `stateful_callbacks`
STATE_FILE = "keep_best.json"  # where checkpoints written before STATE_KEY hold the state (read, never written)
BEST_DIR = "best"  # <stage>/best/step-N/: snapshots of the best weights so far


def saved_keep_best_state(checkpoint: str | Path) -> dict | None:
    """The keep_best state a checkpoint holds (None: none, e.g. a checkpoint of a stage without keep_best)."""
    try:
        trainer_state = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
    except (OSError, ValueError):
        trainer_state = {}
    saved = (trainer_state.get("stateful_callbacks") or {}).get(STATE_KEY)
    return saved if saved is not None else read_json(Path(checkpoint) / STATE_FILE)


def holds_keep_best_state(checkpoint: Path) -> bool:
    """Whether a keep_best stage can resume from `checkpoint` (see `run.plan.last_complete_checkpoint`)."""
    return saved_keep_best_state(checkpoint) is not None


class KeepBestCallback(TrainerCallback):
    """Track a validation metric (`evaluate(model) -> metrics`) and snapshot the best weights. Step 0 is the
    incoming model (`incoming`, else snapshotted); ties keep the earlier weights and count as no improvement;
    `patience` stops after that many evaluations in a row without one. Call `start` before training."""

    def __init__(
        self,
        evaluate: Callable,
        metric: str,
        stage_dir: Path,
        every: int,
        trainer,
        is_main_process: bool = True,
        patience: int | None = None,
        incoming: Path | None = None,
    ):
        self.evaluate, self.metric, self.every, self.patience = evaluate, metric, max(1, every), patience
        self.trainer, self.is_main_process = trainer, is_main_process
        self.incoming = Path(incoming) if incoming is not None else None
        self.best_dir = Path(stage_dir) / BEST_DIR
        self.history: list[tuple[int, float]] = []
        self.best_step, self.best_score = 0, float("-inf")
        self.without_improvement = 0
        self.stopped_at: int | None = None
        self.checkpointed_best: int | None = None  # the best step that the newest checkpoint's state names

    def snapshot(self, step: int) -> Path:
        """The folder holding the weights of `step` while it is, or a checkpoint says it is, the best."""
        return self.best_dir / f"step-{step}"

    def snapshotted(self, step: int) -> bool:
        """Whether `step`'s weights are snapshotted when best: every step but an incoming folder's step 0."""
        return step > 0 or self.incoming is None

    def source(self, step: int) -> Path:
        """Where the weights of `step` are while it is the best."""
        return self.snapshot(step) if self.snapshotted(step) else self.incoming

    def saved_state(self) -> dict[str, Any]:
        """What a checkpoint holds (trainer_state.json, under STATE_KEY): all the decisions after it depend on."""
        return {
            "metric": self.metric,
            "history": [[step, score] for step, score in self.history],
            "best_step": self.best_step,
            "best_score": self.best_score,
            "evaluations_without_improvement": self.without_improvement,
            "patience": self.patience,
        }

    def start(self, checkpoint: str | Path | None) -> None:
        """Restore the state saved in `checkpoint` (the one the stage resumes from; None: a fresh start) and drop
        the snapshots it does not name (they were taken after it and will be taken again)."""
        if checkpoint is not None:
            saved = saved_keep_best_state(checkpoint)
            if saved is None or saved.get("metric") != self.metric:
                raise SFTKeyError(
                    f"{checkpoint} has no keep_best state for metric `{self.metric}` to resume from; "
                    f"delete that checkpoint folder or pass --restart_from {self.best_dir.parent.name}"
                )
            self.history = [(int(step), float(score)) for step, score in saved["history"]]
            self.best_step, self.best_score = int(saved["best_step"]), float(saved["best_score"])
            self.without_improvement = int(saved["evaluations_without_improvement"])
            self.checkpointed_best = self.best_step
        self._prune()
        if checkpoint is not None and self.snapshotted(self.best_step) and not self.snapshot(self.best_step).is_dir():
            raise SFTKeyError(
                f"keep_best's best weights (step {self.best_step}) are missing from {self.best_dir}; "
                f"pass --restart_from {self.best_dir.parent.name} to retrain the stage"
            )

    def _prune(self) -> None:
        """Delete every snapshot but the current best and the one the newest checkpoint names."""
        if not self.is_main_process or not self.best_dir.is_dir():
            return
        named = (self.best_step if self.history else None, self.checkpointed_best)
        keep = {self.snapshot(step).name for step in named if step is not None and self.snapshotted(step)}
        stale = [folder for folder in self.best_dir.glob("step-*") if folder.name not in keep]
        discard(
            *stale,
            kinds=["snapshot"],
            fix=f"move it out of {self.best_dir}, or pass --restart_from {self.best_dir.parent.name}",
        )

    def _measure(self, model, step: int) -> None:
        # `model` is the one the Trainer was built with; under FSDP1 its root unit is sharded outside a forward
        with full_parameters(getattr(self.trainer, "model_wrapped", None)):
            score = float(self.evaluate(model).get(self.metric, 0.0))
        self.history.append((step, score))
        logger.info("keep_best: step %d validation %s %.4f", step, self.metric, score)
        if score > self.best_score:
            self.best_step, self.best_score, self.without_improvement = step, score, 0
            if self.snapshotted(step):
                if self.is_main_process:  # marked first: a kill mid-save leaves a folder the next prune may remove
                    mark_folder(self.best_dir, "snapshots")
                    mark_folder(self.snapshot(step), "snapshot", step=step)
                self.trainer.save_model(str(self.snapshot(step)))
                self._prune()
        else:
            self.without_improvement += 1

    def _record(self, state) -> None:
        # Trainer writes `stateful_callbacks` into each checkpoint's trainer_state.json, before rotating old ones out
        state.stateful_callbacks[STATE_KEY] = self.saved_state()

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == 0 and not self.history:
            self._measure(model, 0)
        self._record(state)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        step = state.global_step
        if step % self.every != 0 and step != state.max_steps:
            return
        self._measure(model, step)
        self._record(state)
        if self.patience is not None and self.without_improvement >= self.patience and step < state.max_steps:
            logger.info("keep_best: %d evaluations without improvement, stopping at step %d", self.patience, step)
            self.stopped_at = step
            control.should_training_stop = True
            # Never checkpoint a stopped stage: Trainer would resume it and train on past the stop
            control.should_save = False

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.stopped_at is not None:
            control.should_save = False

    def on_save(self, args, state, control, **kwargs):
        # Trainer has written the checkpoint, its trainer_state.json naming the best step: older snapshots can go
        self.checkpointed_best = self.best_step
        self._prune()

    def finalize(self, stage_dir: Path, final_step: int) -> dict:
        """Make `stage_dir` hold the best weights (the main process copies them; other ranks wait before reading) and
        return a report for results.json. Snapshots stay for a rerun; delete `<stage>/best/` once recorded."""
        if self.best_step == final_step:
            kept = f"the final weights (step {final_step})"
        else:
            source = self.source(self.best_step)
            kept = f"step {self.best_step}" if self.best_step > 0 else "the incoming weights (step 0: never beaten)"
            if self.is_main_process:
                for name in ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors"):
                    if (source / name).exists():
                        shutil.copy2(source / name, stage_dir / name)
                for shard in source.glob("model-*.safetensors"):
                    shutil.copy2(shard, stage_dir / shard.name)
        if self.best_step == 0:
            logger.warning("keep_best: the stage never beat its incoming weights (step 0); kept them")
        return {
            "best_step": self.best_step,
            "metric": self.metric,
            f"best_validation_{self.metric}": self.best_score,
            "kept": kept,
            "history": self.history,
            "patience": self.patience,
            "stopped_early": self.stopped_at is not None,
            "stopped_at": self.stopped_at,
            "steps_trained": final_step,
        }
