"""Stage chaining: each stage trains from the previous stage's weights, saves to `<output_dir>/<stage>/` and is
evaluated; results accumulate in `<output_dir>/results.json`."""

from __future__ import annotations

import gc
import logging
import time
from pathlib import Path

import torch
from accelerate import PartialState

from .config import Stage, stage_training_args
from .data import PreparedData, prepare_data
from .errors import SFTKeyError
from .evaluate import evaluate_model
from .files import read_json, write_json, write_jsonl
from .formatting import Formatter
from .modeling import load_model, load_tokenizer, lora_config
from .trainer import SFTKeyTrainer

logger = logging.getLogger(__name__)


def apply_global_batch_size(args, world_size: int) -> None:
    """Derive gradient accumulation from `global_batch_size`, so the GPU count does not change the optimisation."""
    if not args.global_batch_size:
        return
    per_step = args.per_device_train_batch_size * world_size
    if args.global_batch_size % per_step:
        raise SFTKeyError(
            f"`global_batch_size: {args.global_batch_size}` is not a multiple of per_device_train_batch_size x "
            f"processes = {per_step}; change one of them"
        )
    args.gradient_accumulation_steps = args.global_batch_size // per_step


class Pipeline:
    """Runs a recipe: prepare the data once, then train and evaluate each stage in order."""

    def __init__(self, script_args, training_args, model_args, stages: list[Stage]):
        self.script_args, self.training_args, self.model_args, self.stages = (
            script_args,
            training_args,
            model_args,
            stages,
        )
        self.output_dir = Path(training_args.output_dir)
        self.state = PartialState()
        self.tokenizer = load_tokenizer(model_args, training_args)
        self.formatter = Formatter(self.tokenizer, script_args, training_args.eos_token)
        self._data: PreparedData | None = None

    @property
    def data(self) -> PreparedData:
        if self._data is None:
            with self.training_args.main_process_first(desc="preparing data"):
                self._data = prepare_data(
                    self.script_args,
                    self.training_args,
                    self.stages,
                    self.tokenizer,
                    self.formatter,
                    self.output_dir / ".cache",
                )
        return self._data

    @property
    def results_path(self) -> Path:
        return self.output_dir / "results.json"

    def stage_args(self, stage: Stage):
        args = stage_training_args(self.training_args, stage, str(self.output_dir / stage.name / "checkpoints"))
        apply_global_batch_size(args, args.world_size)
        return args

    def train_stage(self, stage: Stage, start_from: Path | None) -> dict:
        """Train one stage from `start_from` (None: the base model) and save it to `<output_dir>/<stage>/`."""
        args = self.stage_args(stage)
        model = load_model(self.model_args, args, start_from)
        trainer = SFTKeyTrainer(
            model=model,
            args=args,
            train_dataset=self.data.train,
            processing_class=self.tokenizer,
            peft_config=lora_config(self.model_args) if start_from is None else None,
            stage=stage,
            log_part_losses=self.training_args.log_part_losses,
        )
        global_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
        if self.state.is_main_process:
            logger.info("stage %s: loss on %s, global batch %d", stage.name, stage.loss_on, global_batch)
        started = time.perf_counter()
        output = trainer.train(resume_from_checkpoint=last_checkpoint(args.output_dir))
        seconds = time.perf_counter() - started
        stage_dir = self.output_dir / stage.name
        trainer.save_model(str(stage_dir))
        if self.state.is_main_process:
            self.tokenizer.save_pretrained(str(stage_dir))
            write_json(stage_dir / "log_history.json", trainer.state.log_history)
        summary = {
            "train_loss": output.training_loss,
            "train_seconds": seconds,
            "global_batch_size": global_batch,
            "train_tokens": trainer._total_train_tokens,
            "tokens_per_second": trainer._total_train_tokens / seconds if seconds else 0.0,
        }
        self._model = trainer.model
        del trainer
        return summary

    def evaluate(self, model, name: str) -> dict:
        """Generate on the evaluation split with `model`; write predictions and return the metrics."""
        metrics, predictions = evaluate_model(
            model,
            self.tokenizer,
            self.data.eval_examples,
            self.data.answer_type,
            self.script_args,
            self.formatter,
        )
        if self.state.is_main_process:
            write_jsonl(self.output_dir / name / "predictions.jsonl", predictions)
        return metrics

    def run(self) -> dict:
        """Train and evaluate every stage; return the results written to `results.json`."""
        results = read_json(self.results_path, None) or {"stages": {}}
        results["answer_type"] = self.data.answer_type
        results["invalid_rows"] = self.data.report.counts
        evaluate = self.script_args.eval_after_stages and bool(self.data.eval_examples)
        if self.script_args.eval_base and evaluate:
            base = load_model(self.model_args, self.training_args)
            results["base"] = self.evaluate(base, "base")
            del base
        start_from: Path | None = None
        for stage in self.stages:
            training = self.train_stage(stage, start_from)
            entry = {"loss_on": stage.loss_on, "training": training}
            if evaluate:
                entry.update(self.evaluate(self._model, stage.name))
            results["stages"][stage.name] = entry
            if self.state.is_main_process:
                write_json(self.results_path, results)
            self._model = None
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            start_from = self.output_dir / stage.name
        self.state.wait_for_everyone()
        return results


def last_checkpoint(directory: str) -> str | None:
    """The newest complete `checkpoint-N` folder under `directory`, if any (used to resume a killed stage)."""
    from transformers.trainer_utils import get_last_checkpoint

    path = Path(directory)
    return get_last_checkpoint(str(path)) if path.is_dir() else None
