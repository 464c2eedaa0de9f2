"""Keep the best model of a stage: evaluate by generation on the validation split before the stage starts and
every `eval_steps` steps, and make the stage's output the most accurate weights, the incoming ones included."""

from __future__ import annotations

import dataclasses
import logging
import shutil
from pathlib import Path

from transformers import TrainerCallback

from ..evaluation.generation import evaluate_model

logger = logging.getLogger(__name__)


class KeepBestCallback(TrainerCallback):
    """Track validation accuracy during a stage and snapshot the best weights under `<stage>/best/`.

    Step 0 is the incoming model (the previous stage's output): if the stage never beats it, that is what is
    kept. Ties keep the earlier (less trained) weights.
    """

    def __init__(self, pipeline, examples: list[dict], stage_dir: Path, every: int):
        self.pipeline, self.examples, self.every = pipeline, examples, max(1, every)
        self.best_dir = stage_dir / "best"
        self.history: list[tuple[int, float]] = []
        self.best_step, self.best_accuracy = 0, -1.0
        self.trainer = None  # set after the trainer is built

    def _measure(self, model, step: int) -> None:
        metrics, _ = evaluate_model(
            model,
            self.pipeline.tokenizer,
            self.examples,
            self.pipeline.data.answer_type,
            dataclasses.replace(self.pipeline.script_args, eval_backend="hf"),  # in-process model, mid-training
            self.pipeline.formatter,
        )
        accuracy = metrics.get("accuracy", 0.0)
        self.history.append((step, accuracy))
        logger.info("keep_best: step %d validation accuracy %.4f", step, accuracy)
        if accuracy > self.best_accuracy:
            self.best_step, self.best_accuracy = step, accuracy
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
            if self.pipeline.state.is_main_process and source is not None:
                for name in ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors"):
                    if (source / name).exists():
                        shutil.copy2(source / name, stage_dir / name)
                for shard in source.glob("model-*.safetensors"):
                    shutil.copy2(shard, stage_dir / shard.name)
        if self.pipeline.state.is_main_process:
            shutil.rmtree(self.best_dir, ignore_errors=True)
        if self.best_step == 0:
            logger.warning("keep_best: the stage never beat the incoming weights; kept them (%s)", kept)
        return {
            "best_step": self.best_step,
            "best_validation_accuracy": self.best_accuracy,
            "kept": kept,
            "history": self.history,
        }
