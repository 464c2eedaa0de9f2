"""Stage chaining: each stage trains from the previous stage's weights, saves to `<output_dir>/<stage>/` and is
evaluated. `manifest.json` makes reruns safe: finished stages are skipped, a killed stage resumes from its last
complete checkpoint, and a changed configuration for a finished stage is refused unless asked for."""

from __future__ import annotations

import gc
import json
import logging
import shutil
import time
from pathlib import Path

import torch
from accelerate import PartialState

from ..data.formatting import Formatter
from ..data.loading import PreparedData, cache_root, prepare_data
from ..errors import SFTKeyError
from ..evaluation.generation import evaluate_model
from ..files import read_json, write_json, write_jsonl, write_text
from ..recipe.config import Stage, stage_training_args
from ..train.distributed import check_sharding_compatibility, detect_launch
from ..train.keep_best import KeepBestCallback
from ..train.modeling import check_quantization, load_model, load_tokenizer, lora_config, resolve_model_path
from ..train.trainer import SFTKeyTrainer
from .manifest import Manifest, changed_keys, config_hash, resolved_config
from .report import plot_results, results_markdown
from .tracking import stage_run_name, track_stage

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


def last_complete_checkpoint(directory: Path) -> str | None:
    """The newest `checkpoint-N` whose `trainer_state.json` (written last by Trainer) is readable.

    A kill during a checkpoint save leaves a folder without it; such a folder is never resumed from.
    """
    if not directory.is_dir():
        return None
    candidates = sorted(
        (p for p in directory.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()),
        key=lambda p: int(p.name.split("-")[-1]),
        reverse=True,
    )
    for candidate in candidates:
        try:
            json.loads((candidate / "trainer_state.json").read_text())
            return str(candidate)
        except (OSError, ValueError):
            continue
    return None


class Pipeline:
    """Runs a recipe: prepare the data once, then train and evaluate each stage in order."""

    def __init__(self, script_args, training_args, model_args, stages: list[Stage]):
        self.script_args, self.training_args, self.model_args = script_args, training_args, model_args
        self.stages = stages
        self.output_dir = Path(training_args.output_dir)
        _ = training_args.device  # set up the distributed state from the training arguments (use_cpu: gloo) first
        self.state = PartialState()
        check_quantization(model_args)
        check_sharding_compatibility(model_args, training_args)
        self.sharded = detect_launch(training_args).shards_parameters
        self.tokenizer = load_tokenizer(model_args, training_args)
        self.formatter = Formatter(self.tokenizer, script_args, training_args.eos_token)
        self._data: PreparedData | None = None

    @property
    def data(self) -> PreparedData:
        if self._data is None:
            cache = cache_root() / "tokenized" if self.state.is_main_process else None
            with self.training_args.main_process_first(desc="preparing data"):
                self._data = prepare_data(
                    self.script_args, self.training_args, self.stages, self.tokenizer, self.formatter, cache
                )
        return self._data

    def stage_args(self, stage: Stage):
        args = stage_training_args(self.training_args, stage, str(self.output_dir / stage.name / "checkpoints"))
        apply_global_batch_size(args, args.world_size)
        args.run_name = stage_run_name(args, self.output_dir, stage.name)  # one tracked run per stage
        args.push_to_hub = False  # the Trainer would push every stage; run/hub.py pushes one, once, with a card
        return args

    def train_stage(self, stage: Stage, args, start_from: Path | None):
        """Train one stage from `start_from` (None: the base model), resuming from its last complete checkpoint,
        and save it to `<output_dir>/<stage>/`. Returns (trained model, training summary)."""
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
        track_stage(trainer, self.output_dir)
        global_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
        resume = last_complete_checkpoint(Path(args.output_dir))
        if self.state.is_main_process:
            logger.info(
                "stage %s: loss on %s, global batch %d%s",
                stage.name,
                stage.loss_on,
                global_batch,
                f", resuming from {resume}" if resume else "",
            )
        stage_dir = self.output_dir / stage.name
        keep_best = self._keep_best_callback(stage, args, trainer, stage_dir)
        started = time.perf_counter()
        output = trainer.train(resume_from_checkpoint=resume)
        seconds = time.perf_counter() - started
        trainer.save_model(str(stage_dir))
        if self.state.is_main_process:
            self.tokenizer.save_pretrained(str(stage_dir))
            write_json(stage_dir / "log_history.json", trainer.state.log_history)
        summary = {
            "train_loss": output.training_loss,
            "train_seconds": seconds,
            "global_batch_size": global_batch,
            "world_size": args.world_size,
            "train_tokens": trainer._total_train_tokens,
            "tokens_per_second": trainer._total_train_tokens / seconds if seconds else 0.0,
            "resumed_from": resume,
        }
        model = trainer.model
        if keep_best is not None:
            summary["keep_best"] = keep_best.finalize(stage_dir, start_from, trainer.state.global_step)
            if summary["keep_best"]["best_step"] != trainer.state.global_step:
                model = None  # the stage's output is an earlier snapshot: evaluate it from disk
        del trainer
        return model, summary

    def _keep_best_callback(self, stage: Stage, args, trainer, stage_dir: Path) -> KeepBestCallback | None:
        if not stage.keep_best:
            return None
        examples = self.data.validation_examples
        if not examples:
            raise SFTKeyError(
                f"stage `{stage.name}` has keep_best but there is no validation data; set `eval_fraction` "
                "(held out from train) or `eval_dataset_name`"
            )
        if [e["index"] for e in examples] == [e["index"] for e in self.data.eval_examples]:
            logger.warning(
                "keep_best selects on the evaluation set itself, so the reported accuracy is optimistic; give a "
                "separate `eval_dataset_name`/`eval_split` and an `eval_fraction` hold-out for an unbiased test"
            )
        per_step = args.per_device_train_batch_size * args.world_size * args.gradient_accumulation_steps
        steps_per_epoch = max(1, len(self.data.train) // per_step)
        every = int(args.eval_steps) if args.eval_steps and args.eval_steps >= 1 else max(1, steps_per_epoch // 2)
        callback = KeepBestCallback(self, examples, stage_dir, every)
        callback.trainer = trainer
        trainer.add_callback(callback)
        return callback

    def _vllm_source(self, checkpoint: str | Path | None) -> tuple[str, str | None] | None:
        """(model path, adapter path) for `eval_backend: vllm`: a LoRA stage is served as an adapter on its base."""
        if self.script_args.eval_backend != "vllm":
            return None
        base = resolve_model_path(self.model_args.model_name_or_path)
        if checkpoint is not None and (Path(checkpoint) / "adapter_config.json").exists():
            return base, str(checkpoint)
        return str(checkpoint or base), None

    def evaluate(self, model, name: str | Path, checkpoint: Path | None = None) -> dict:
        """Generate on the evaluation split with `model`; write `<output_dir>/<name>/predictions.jsonl` and return
        the metrics. With `eval_backend: vllm`, `checkpoint` (the saved stage) is served instead of `model`."""
        metrics, predictions = evaluate_model(
            model,
            self.tokenizer,
            self.data.eval_examples,
            self.data.answer_type,
            self.script_args,
            self.formatter,
            vllm_source=self._vllm_source(checkpoint),
        )
        if self.state.is_main_process:
            write_jsonl(self.output_dir / name / "predictions.jsonl", predictions)
        return metrics

    def _plan(self, manifest: Manifest) -> list[tuple]:
        """Resolve each stage's arguments and hash; refuse a changed finished stage unless restarting it."""
        plan, previous = [], self.data.data_hash
        names = [stage.name for stage in self.stages]
        restart = self.training_args.restart_from
        if restart is not None and restart not in names:
            raise SFTKeyError(f"`restart_from: {restart}` is not a stage of this recipe; stages are {names}")
        restarting = False
        for stage in self.stages:
            args = self.stage_args(stage)
            config = resolved_config(self.script_args, args, self.model_args, stage, self.data.data_hash, previous)
            digest = config_hash(config)
            restarting = restarting or stage.name == restart
            entry = manifest.stage(stage.name)
            if not entry and not restarting and (self.output_dir / stage.name).exists():
                raise SFTKeyError(
                    f"{self.output_dir / stage.name} exists but the manifest does not know it (another run's "
                    "output?); pass --overwrite_output_dir true or use another output_dir"
                )
            if entry and entry.get("hash") != digest and not restarting:
                changed = ", ".join(changed_keys(entry.get("config", {}), config)[:8]) or "the previous stage"
                raise SFTKeyError(
                    f"stage `{stage.name}` in {self.output_dir} was run with another config (changed: {changed}); "
                    f"pass --restart_from {stage.name} or --overwrite_output_dir true, or use another output_dir"
                )
            plan.append((stage, args, digest, config, restarting))
            previous = digest
        return plan

    def run(self) -> dict:
        """Train and evaluate every stage that is not already done; return the contents of `results.json`."""
        main = self.state.is_main_process
        if self.training_args.overwrite_output_dir and main and self.output_dir.exists():
            for stage in self.stages:
                shutil.rmtree(self.output_dir / stage.name, ignore_errors=True)
            for name in ("manifest.json", "results.json"):
                (self.output_dir / name).unlink(missing_ok=True)
        self.state.wait_for_everyone()
        manifest = Manifest(self.output_dir, write=main)
        plan = self._plan(manifest)  # every check before anything is written
        self.state.wait_for_everyone()  # no rank writes before every rank has read the manifest and checked
        results_path = self.output_dir / "results.json"
        results = read_json(results_path, None) or {"stages": {}}
        results.update(answer_type=self.data.answer_type, invalid_rows=self.data.report.counts)
        evaluate = self.script_args.eval_after_stages and bool(self.data.eval_examples)
        if self.script_args.eval_base and evaluate and "base" not in results:
            base = load_model(self.model_args, self.training_args)
            results["base"] = self.evaluate(base, "base")
            del base
        start_from: Path | None = None
        for stage, args, digest, config, restarting in plan:
            stage_dir = self.output_dir / stage.name
            entry = manifest.stage(stage.name) or {}
            if restarting:
                if main:
                    shutil.rmtree(stage_dir, ignore_errors=True)
                manifest.forget(stage.name)
                results["stages"].pop(stage.name, None)
                entry = {}
                self.state.wait_for_everyone()
            if entry.get("status") == "done":
                logger.info("stage %s is done with the same configuration: skipped", stage.name)
                start_from = stage_dir
                continue
            model = None
            if entry.get("status") != "trained":
                manifest.update(stage.name, status="running", hash=digest, config=config, checkpoint=str(stage_dir))
                model, training = self.train_stage(stage, args, start_from)
                if self.sharded:  # ZeRO-3/FSDP: evaluate the saved stage, loaded whole on each rank
                    model = None
                    gc.collect()
                results["stages"][stage.name] = {"loss_on": stage.loss_on, "training": training}
                if main:
                    write_json(results_path, results)
                manifest.update(stage.name, status="trained", seconds=training["train_seconds"])
            if evaluate:
                if model is None:  # killed during evaluation, or keep_best kept a snapshot: load the saved stage
                    model = load_model(self.model_args, args, stage_dir, trainable=False)
                results["stages"].setdefault(stage.name, {"loss_on": stage.loss_on})
                results["stages"][stage.name].update(self.evaluate(model, stage.name, stage_dir))
            if main:
                write_json(results_path, results)
            manifest.update(stage.name, status="done")
            del model
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            start_from = stage_dir
        if main:
            write_text(self.output_dir / "results.md", results_markdown(results))
            plot_results(results, self.output_dir)
        self.state.wait_for_everyone()
        return results

    def evaluate_only(self, checkpoint: str | None) -> dict:
        """Evaluate a saved stage folder (adapter or full weights), or the base model, without training."""
        name = Path(checkpoint).name if checkpoint else "base"
        if checkpoint and not Path(checkpoint).is_dir():
            raise SFTKeyError(f"`--checkpoint {checkpoint}` is not a folder; point it at a saved stage folder")
        if not self.data.eval_examples:
            raise SFTKeyError("no evaluation data: set `eval_dataset_name`, `eval_split` or `eval_fraction`")
        vllm = self.script_args.eval_backend == "vllm"
        model = None if vllm else load_model(self.model_args, self.training_args, checkpoint, trainable=False)
        metrics = self.evaluate(model, Path("eval_only") / name, checkpoint)
        if self.state.is_main_process:
            write_json(self.output_dir / "eval_only" / name / "metrics.json", metrics)
        return {"stages": {name: metrics}}
