"""Run a checked recipe (`recipe.checks.check_recipe` first, as `run/cli.py` does): prepare the data once, then
train, save and evaluate each stage from the previous one's weights into `<output_dir>/<stage>/`; `plan.py` decides
what a rerun skips, resumes or refuses."""

from __future__ import annotations

import dataclasses
import logging
from functools import cached_property
from pathlib import Path

from accelerate import PartialState

from ..data.formatting import Formatter
from ..data.loading import PreparedData, prepare_data
from ..errors import SFTKeyError
from ..evaluation.generation import evaluate_model
from ..evaluation.metrics import DEFAULT_METRIC
from ..files import cache_root, discard, mark_folder, write_json, write_jsonl, write_text
from ..recipe.schema import Recipe
from ..train.distributed import detect_launch
from ..train.engines import free_device_memory, release_trainer
from ..train.keep_best import BEST_DIR, KeepBestCallback, holds_keep_best_state
from ..train.modeling import load_model, load_tokenizer, lora_config, resolve_model_path
from ..train.objectives import Stage
from ..train.steps import global_batch, keep_best_interval, stage_training_args
from ..train.trainer import SFTKeyTrainer
from .diagnosis import diagnose
from .lock import holding
from .plan import (
    Manifest,
    PlannedStage,
    clear_run,
    delete_stage,
    evaluated,
    last_complete_checkpoint,
    own_run_folder,
    plan_stages,
    read_run_file,
)
from .report import plot_results, results_markdown
from .tracking import stage_run_name, track_stage

logger = logging.getLogger(__name__)
PLACEHOLDER_CARD = "# Model Card for Model ID"  # the title of the template card peft writes beside each adapter


def drop_placeholder_card(folder: Path) -> None:
    """Delete the placeholder README.md (about 200 lines of "[More Information Needed]") peft saves with an adapter."""
    readme = folder / "README.md"
    if readme.is_file() and PLACEHOLDER_CARD in readme.read_text(errors="replace"):
        discard(readme, kinds=["stage"])


class Pipeline:
    """Runs a recipe: prepare the data once, then train and evaluate each stage in order."""

    def __init__(self, recipe: Recipe, one_run: bool = True):
        """`one_run: False`: the folder may hold other runs' stages beside this one's (compare.py's arms)."""
        self.recipe, training_args = recipe, recipe.training
        self.one_run = one_run
        self.output_dir = Path(training_args.output_dir)
        _ = training_args.device  # set up the distributed state from the training arguments (use_cpu: gloo) first
        self.state = PartialState()
        self.sharded = detect_launch(training_args).shards_parameters
        self.tokenizer = load_tokenizer(recipe.model, training_args)
        self.formatter = Formatter(self.tokenizer, recipe.script, training_args.eos_token)

    @cached_property
    def data(self) -> PreparedData:
        """The prepared splits, built on first use (the main process first)."""
        cache = cache_root() / "tokenized" if self.state.is_main_process else None
        with self.recipe.training.main_process_first(desc="preparing data"):
            return prepare_data(
                self.recipe.script, self.recipe.training, self.recipe.stages, self.tokenizer, self.formatter, cache
            )

    def stage_args(self, stage: Stage):
        """The stage's training arguments; its Trainer checkpoints go to `<output_dir>/<stage>/checkpoints`."""
        args = stage_training_args(
            self.recipe.training, stage, str(self.output_dir / stage.name / "checkpoints"), self.state.num_processes
        )
        args.run_name = stage_run_name(args, self.output_dir, stage.name)  # one tracked run per stage
        args.push_to_hub = False  # the Trainer would push every stage; run/hub.py pushes one, once, with a card
        return args

    def run(self) -> dict:
        """Train and evaluate every stage that is not already done, holding the output folder's lock (one run per
        folder); return the contents of `results.json`."""
        with holding(self.output_dir, self.state):
            return self._run()

    def _run(self) -> dict:
        main, names = self.state.is_main_process, [stage.name for stage in self.recipe.stages]
        if self.recipe.training.overwrite_output_dir and main and self.output_dir.exists():
            clear_run(self.output_dir, names)
        self.state.wait_for_everyone()
        manifest = Manifest(self.output_dir, write=main)
        # what the model card names as the training command, also when a later `--merge` runs with other flags
        manifest.data["command"] = {"config": self.recipe.path, "overrides": list(self.recipe.overrides)}
        results = read_run_file(self.output_dir / "results.json", main) or {"stages": {}}
        plan = plan_stages(
            self.recipe, self.stage_args, self.data.data_hash, manifest, self.state.num_processes, self.one_run,
            recorded=results["stages"],
        )  # fmt: skip
        if main:
            own_run_folder(self.output_dir, manifest)
            if self.one_run:
                manifest.record_stage_names(names)
        self.state.wait_for_everyone()  # no rank writes before every rank has read the manifest and checked
        if retrained := [planned.stage.name for planned in plan if planned.restarting]:
            # on disk at once: a retrained stage that then fails must not leave its earlier result (or a summary that
            # read it) reported as this run's
            results["stages"] = {k: v for k, v in results["stages"].items() if k not in retrained}
            results.pop("summary", None)
            self._save_results(results)
        results.update(answer_type=self.data.answer_type, invalid_rows=self.data.report.counts)
        if self.recipe.script.select_on_test and any(stage.keep_best for stage in self.recipe.stages):
            results["selected_on_test"] = True  # keep_best chose checkpoints on the evaluation set: say so
        evaluate = self.recipe.script.eval_after_stages and bool(self.data.eval_examples)
        if self.recipe.script.eval_base and evaluate and "base" not in results:
            results["base"] = self.evaluate(None, "base")
        start_from: Path | None = None
        for planned in plan:
            self.run_stage(planned, manifest, results, start_from, evaluate)
            start_from = self.output_dir / planned.stage.name
        results["summary"] = diagnose(results)
        self._save_results(results, report=True)
        self.state.wait_for_everyone()
        return results

    def _save_results(self, results: dict, report: bool = False) -> None:
        """Write `results.json` from the main process; with `report` (the run's end) also results.md and the plots."""
        if self.state.is_main_process:
            write_json(self.output_dir / "results.json", results)
            if report:
                write_text(self.output_dir / "results.md", results_markdown(results))
                plot_results(results, self.output_dir)

    def run_stage(self, planned: PlannedStage, manifest: Manifest, results: dict, start_from, evaluate: bool):
        """Train (or resume, or skip) one stage, then evaluate it; the manifest and results.json follow each step."""
        stage, args, main = planned.stage, planned.args, self.state.is_main_process
        stage_dir = self.output_dir / stage.name
        if planned.restarting:
            delete_stage(manifest, stage.name, fix=f"move it out of {self.output_dir}, or use another output_dir")
            results["stages"].pop(stage.name, None)
            self.state.wait_for_everyone()
        entry = manifest.stage(stage.name) or {}
        if entry.get("status") == "done":
            if not evaluate or evaluated(results["stages"].get(stage.name)):
                logger.info("stage %s is done with the same configuration: skipped", stage.name)
                return
            logger.info("stage %s is done but was not evaluated: evaluating it", stage.name)
        model = None
        if entry.get("status") not in ("trained", "done"):
            manifest.update(
                stage.name, status="running", hash=planned.digest, config=planned.config, checkpoint=str(stage_dir)
            )
            if main:
                mark_folder(stage_dir, "stage", stage=stage.name)
            model, training = self.train_stage(stage, args, start_from)
            results["stages"][stage.name] = {
                "loss_on": stage.loss_on,
                "started_from": start_from.name if start_from is not None else "base",
                "training": training,
            }
            self._save_results(results)
            manifest.update(stage.name, status="trained", seconds=training["train_seconds"])
        if main:  # keep_best's snapshots: the stage's output holds the kept weights now
            discard(stage_dir / BEST_DIR, kinds=["snapshots"])
        if evaluate:  # without the trained model (see `train_stage`), `evaluate` loads the saved stage
            results["stages"].setdefault(stage.name, {"loss_on": stage.loss_on})
            results["stages"][stage.name].update(self.evaluate(model, stage.name, stage_dir))
        self._save_results(results)
        manifest.update(stage.name, status="done")
        del model
        free_device_memory()

    def train_stage(self, stage: Stage, args, start_from: Path | None):
        """Train one stage from `start_from` (None: the base model), resuming from its last complete checkpoint,
        into `<output_dir>/<stage>/`. Returns (the trained model if it is evaluated in memory, else None; summary).
        The trainer's engine, optimizer and the rest are released before it returns."""
        trainer = SFTKeyTrainer(
            model=load_model(self.recipe.model, args, start_from, purpose="train"),
            args=args,
            train_dataset=self.data.train,
            processing_class=self.tokenizer,
            peft_config=lora_config(self.recipe.model) if start_from is None else None,
            stage=stage,
            log_part_losses=args.log_part_losses,
        )
        track_stage(trainer, self.output_dir)
        batch = global_batch(args, args.world_size)
        resume = last_complete_checkpoint(Path(args.output_dir), holds_keep_best_state if stage.keep_best else None)
        if self.state.is_main_process:
            resuming = f", resuming from {resume}" if resume else ""
            logger.info("stage %s: loss on %s, global batch %d%s", stage.name, stage.summary, batch, resuming)
        stage_dir = self.output_dir / stage.name
        keep_best = self.keep_best_callback(stage, args, trainer, start_from, resume) if stage.keep_best else None
        trainer.train(resume_from_checkpoint=resume)
        trained = trainer.stage_summary()  # the whole stage, the part before a resume included
        trainer.save_model(str(stage_dir))
        if self.state.is_main_process:
            self.tokenizer.save_pretrained(str(stage_dir))
            write_json(stage_dir / "log_history.json", trainer.state.log_history)
            drop_placeholder_card(stage_dir)  # the stage's card is card.py's, written when it is exported or pushed
        seconds, tokens = trained.pop("train_seconds"), trained.pop("train_tokens")
        summary = {
            "train_loss": trained.pop("train_loss"),
            "train_seconds": seconds,
            "global_batch_size": batch,
            "world_size": args.world_size,
            "train_tokens": tokens,
            "tokens_per_second": tokens / seconds if seconds else 0.0,
            "resumed_from": resume,
            **trained,
        }
        model = trainer.model if self.evaluates_in_memory else None
        if keep_best is not None:
            summary["keep_best"] = keep_best.finalize(stage_dir, summary["optimizer_steps"])
            if summary["keep_best"]["best_step"] != summary["optimizer_steps"]:
                model = None  # the stage's output is an earlier snapshot: evaluate it from disk
        release_trainer(trainer)
        del trainer
        # Only the main process wrote the stage folder (keep_best's kept weights too); the others read it next
        self.state.wait_for_everyone()
        return model, summary

    def keep_best_callback(
        self, stage: Stage, args, trainer, start_from: Path | None, resume: str | None
    ) -> KeepBestCallback:
        """Evaluate on the validation split every `eval_steps` (default: twice an epoch) on the stage's metric
        (`metric_for_best_model`, the stage's own or the recipe's) and keep the best, the incoming weights
        (`start_from`, None: the base model) included; with `resume`, carry on from the state in that checkpoint."""
        examples = self.data.validation_examples  # never the evaluation set, unless `select_on_test` (checks.py)
        every = keep_best_interval(args, len(self.data.train), args.world_size)
        in_process = dataclasses.replace(self.recipe.script, eval_backend="hf")  # the model being trained
        # ZeRO-3/FSDP: every rank's forward gathers the shards, so all ranks generate in lockstep (evaluate_model
        # gives every rank the same number of prompts)
        synced = self.sharded and self.state.num_processes > 1

        def evaluate(model) -> dict:
            return self._score(model, examples, in_process, synced_gpus=synced, label="keep_best")[0]

        metric, main = args.metric_for_best_model or DEFAULT_METRIC, self.state.is_main_process
        callback = KeepBestCallback(
            evaluate, metric, self.output_dir / stage.name, every, trainer, main, stage.patience, incoming=start_from
        )
        callback.start(resume)
        trainer.add_callback(callback)
        return callback

    def _vllm_source(self, checkpoint: str | Path | None) -> tuple[str, str | None] | None:
        """(model path, adapter path) for `eval_backend: vllm`: a LoRA stage is served as an adapter on its base."""
        if self.recipe.script.eval_backend != "vllm":
            return None
        base = resolve_model_path(self.recipe.model.model_name_or_path)
        if checkpoint is not None and (Path(checkpoint) / "adapter_config.json").exists():
            return base, str(checkpoint)
        return str(checkpoint or base), None

    def _score(self, model, examples: list[dict], script_args, **options) -> tuple[dict, list[dict]]:
        """`evaluation.generation.evaluate_model` on `examples` with this run's tokenizer, answer type and format."""
        return evaluate_model(
            model, self.tokenizer, examples, self.data.answer_type, script_args, self.formatter, **options
        )

    @property
    def evaluates_in_memory(self) -> bool:
        """Whether a stage is evaluated with the model it has just trained. Not under DeepSpeed or FSDP, where the
        saved stage is loaded whole on each rank instead: under ZeRO-3/FSDP each rank holds a shard, and a DeepSpeed
        engine leaves its forward hooks on the model it trained when it is destroyed, which would keep the engine
        and its optimizer state in memory through the evaluation. Nor with vLLM, which loads the saved stage
        itself once this process has freed its copy."""
        engine = detect_launch(self.recipe.training).engine
        return engine not in ("deepspeed", "fsdp") and self.recipe.script.eval_backend != "vllm"

    def evaluate(self, model, name: str | Path, checkpoint: Path | None = None) -> dict:
        """Generate on the evaluation split with `model` (None: `checkpoint`, the saved stage, or the base model,
        loaded for evaluation on this process's device); write `<output_dir>/<name>/predictions.jsonl` and return
        the metrics. With `eval_backend: vllm`, vLLM serves `checkpoint` and no model is loaded here."""
        source = self._vllm_source(checkpoint)
        if model is None and source is None:
            model = load_model(self.recipe.model, self.recipe.training, checkpoint, purpose="evaluate")
        examples, script = self.data.eval_examples, self.recipe.script
        metrics, predictions = self._score(model, examples, script, vllm_source=source, label=str(name))
        if self.state.is_main_process:
            write_jsonl(self.output_dir / name / "predictions.jsonl", predictions)
        return metrics

    def evaluate_only(self, checkpoint: str | None) -> dict:
        """Evaluate a saved stage folder (adapter or full weights), or the base model, without training; it writes
        into the output folder, so it holds the folder's lock as a run does."""
        fix = "wait for it to end, or pass another --output_dir (the --checkpoint folder can stay where it is)"
        with holding(self.output_dir, self.state, fix=fix):
            return self._evaluate_only(checkpoint)

    def _evaluate_only(self, checkpoint: str | None) -> dict:
        name = Path(checkpoint).name if checkpoint else "base"  # a folder: `cli.check_flags` checked
        if not self.data.eval_examples:
            raise SFTKeyError("no evaluation data: set `eval_dataset_name`, `eval_split` or `eval_fraction`")
        metrics = self.evaluate(None, Path("eval_only") / name, checkpoint)
        if self.state.is_main_process:
            write_json(self.output_dir / "eval_only" / name / "metrics.json", metrics)
        return {"stages": {name: metrics}}
