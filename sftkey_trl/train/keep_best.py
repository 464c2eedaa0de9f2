"""Keep the best model of a stage: evaluate on the validation split before the stage starts and every
`eval_steps` steps, and make the stage's output the best weights by a named metric, the incoming ones included."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from pathlib import Path

from transformers import TrainerCallback

logger = logging.getLogger(__name__)


class KeepBestCallback(TrainerCallback):
    """Track a validation metric during a stage and snapshot the best weights under `<stage>/best/`.

    `evaluate(model) -> metrics` scores the model being trained. Step 0 is the incoming model (the previous
    stage's output): if the stage never beats it, that is what is kept. Ties keep the earlier (less trained) weights.
    """

    def __init__(
        self, evaluate: Callable, metric: str, stage_dir: Path, every: int, trainer, is_main_process: bool = True
    ):
        self.evaluate, self.metric, self.every = evaluate, metric, max(1, every)
        self.trainer, self.is_main_process = trainer, is_main_process
        self.best_dir = stage_dir / "best"
        self.history: list[tuple[int, float]] = []
        self.best_step, self.best_score = 0, float("-inf")

    def _measure(self, model, step: int) -> None:
        score = self.evaluate(model).get(self.metric, 0.0)
        self.history.append((step, score))
        logger.info("keep_best: step %d validation %s %.4f", step, self.metric, score)
        if score > self.best_score:
            self.best_step, self.best_score = step, score
            if step > 0:
                self.trainer.save_model(str(self.best_dir))

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == 0 and not self.history:
            self._measure(model, 0)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0 or state.global_step == state.max_steps:
            self._measure(model, state.global_step)

    def finalize(self, stage_dir: Path, incoming: Path | None, final_step: int) -> dict:
        """Make `stage_dir` hold the best weights; return a report for results.json."""
        if self.best_step == final_step or (self.best_step == 0 and incoming is None):
            kept = f"the final weights (step {final_step})"
            self.best_step = final_step
        else:
            source = self.best_dir if self.best_step > 0 else incoming
            kept = f"step {self.best_step}" if self.best_step > 0 else "the incoming weights (stage did not help)"
            if self.is_main_process and source is not None:
                for name in ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors"):
                    if (source / name).exists():
                        shutil.copy2(source / name, stage_dir / name)
                for shard in source.glob("model-*.safetensors"):
                    shutil.copy2(shard, stage_dir / shard.name)
        if self.is_main_process:
            shutil.rmtree(self.best_dir, ignore_errors=True)
        if self.best_step == 0:
            logger.warning("keep_best: the stage never beat the incoming weights; kept them (%s)", kept)
        return {
            "best_step": self.best_step,
            "metric": self.metric,
            f"best_validation_{self.metric}": self.best_score,
            "kept": kept,
            "history": self.history,
        }
