"""The GPU check: this project's two stages against a bare `trl.SFTTrainer` on one GPU, plus Liger, evaluation
generation, `accelerate launch` with DeepSpeed ZeRO-2/3 and FSDP (eval_base, keep_best on the key stage and an
--eval_only of a LoRA stage, with the device every evaluation generated on), and the memory estimate against
measured peaks. Everything is built locally (random-init Qwen2.5-1.5B/7B-shaped models, a byte-level BPE tokenizer
trained here), so it runs without network. It starts nothing new after --budget_s (420 s: a 600 s device command
keeps room to spare) and names the second call that runs what is left. Writes one JSON file and one table, after
every row.

    python benchmarks/gpu_check.py [--out FILE.json] [--tokenizer DIR] [--parts training,liger,generation,launch]
    python benchmarks/gpu_check.py --device cpu --tiny        # the same logic on tiny models, on CPU (the tests)

On the borrowed GPU machine use scripts/gpu_check.sh (docs/distributed.md, "Running the GPU check").
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import importlib.util
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import gpu_check_launches as launching
import gpu_check_models as models
import gpu_check_runs as runs
import torch
from gpu_check_report import (
    MEMORY_TOLERANCE_GIB,
    SPEED_TARGET,
    Row,
    format_table,
    gib,
    last_error_line,
    memory_rows,
    ratio,
    training_rows,
)

from sftkey_trl.files import write_json, write_text
from sftkey_trl.train.memory import estimate_for_model, estimate_memory_gib

PARTS = ("training", "liger", "generation", "launch")
METHOD_NAMES = {"qlora": "QLoRA nf4", "lora": "LoRA"}


@dataclass(frozen=True)
class Group:
    """One base model: both stages measured on it, then optionally Liger and evaluation generation."""

    shape: str
    method: str
    batch: int
    seq_len: int
    steps: int
    liger: bool = False
    generation: bool = False
    min_seconds: float = 0.0  # not started with less of the budget left

    @property
    def key(self) -> str:
        return f"{self.shape}-{self.method}"

    def label(self, cuda: bool) -> str:
        method = "bf16 LoRA" if self.method == "lora" and cuda else METHOD_NAMES[self.method]
        return f"{self.shape}{'' if cuda else ' (tiny)'} {method}"


GPU_GROUPS = (
    Group("1.5B", "qlora", batch=4, seq_len=2048, steps=10, liger=True, min_seconds=90),
    Group("1.5B", "lora", batch=4, seq_len=2048, steps=10, generation=True, min_seconds=90),
    Group("7B", "qlora", batch=2, seq_len=2048, steps=8, min_seconds=150),
)
TINY_GROUPS = tuple(Group(g.shape, g.method, 2, 128, 2, g.liger, g.generation) for g in GPU_GROUPS)
# Bare trl.SFTTrainer on one H200 (shared reference/anchors.md: trl 1.16, transformers 5.17, seq 2048, LoRA r=16)
REFERENCE = {
    ("1.5B-qlora", "completion"): "H200 reference: 18,470 tokens/s, 2.94 GiB (loss on the last 60%)",
    ("1.5B-qlora", "key"): "H200 reference: 19,320 tokens/s, 2.94 GiB (loss on the last 24 tokens)",
    ("1.5B-lora", "completion"): "H200 reference: 23,940 tokens/s, 4.94 GiB (loss on the last 60%)",
    ("7B-qlora", "completion"): "H200 reference: 7,070 tokens/s, 7.36 GiB (loss on the last 60%)",
    "liger": "H200 reference, bare trainer + Liger: 17,150 tokens/s, 2.74 GiB (loss on the last 60%)",
    "generation": "H200 reference, plain model.generate: 3,095 tokens/s, 3.66 GiB (batch 64, 128-token prompts)",
}
GPU_GENERATION = dict(count=64, batch=64, max_new_tokens=256, single_prompts=2)
TINY_GENERATION = dict(count=8, batch=8, max_new_tokens=8, single_prompts=2)


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "bitsandbytes", "deepspeed",
                 "liger-kernel"):  # fmt: skip
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def estimate(group: Group, tiny: bool, config, seq_len: int) -> float:
    """The dry run's estimate for the published shapes; for tiny shapes the same formula from the config."""
    if not tiny:
        return estimate_for_model(models.SHAPES[group.shape], group.method, runs.LORA_R, seq_len, group.batch, True)
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        params = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    return estimate_memory_gib(
        params / 1e9, group.method, runs.LORA_R, seq_len, group.batch, config.hidden_size, config.num_hidden_layers,
        True, intermediate_size=config.intermediate_size, vocab_size=config.vocab_size,
        kv_dim=config.num_key_value_heads * config.hidden_size // config.num_attention_heads,
        tied_embeddings=config.tie_word_embeddings,
    )  # fmt: skip


class Check:
    """Runs the parts in order, keeping every row and writing the JSON file after each part."""

    def __init__(self, args):
        self.args, self.cuda, self.tiny = args, args.device == "cuda", args.tiny
        self.clock = runs.Clock(args.budget_s)
        self.work = Path(args.work or tempfile.mkdtemp(prefix="gpu_check-"))
        self.rows: list[Row] = []
        self.meta = {"device": torch.cuda.get_device_name() if self.cuda else f"CPU ({os.cpu_count()} cores)",
                     "mode": "tiny" if self.tiny else "published shapes", "versions": versions(),
                     "speed_target": SPEED_TARGET, "memory_tolerance_gib": MEMORY_TOLERANCE_GIB,
                     "memory_measure": "torch.cuda.max_memory_allocated" if self.cuda else None,
                     "lora": f"r={runs.LORA_R} on every linear layer but lm_head", "seconds": {}}  # fmt: skip
        vocab = 512 if self.tiny else 2048
        self.tokenizer = models.local_tokenizer(args.tokenizer) if args.tokenizer else models.bpe_tokenizer(vocab)
        self.meta["tokenizer"] = args.tokenizer or f"byte-level BPE trained here ({len(self.tokenizer)} tokens)"
        groups = TINY_GROUPS if self.tiny else GPU_GROUPS
        self.groups = [group for group in groups if group.key in args.groups]

    def add(self, *rows: Row) -> None:
        """Keep rows and write them at once: a check cut short by the device's time limit keeps every finished row."""
        self.rows += rows
        self.save()

    def save(self) -> None:
        """Write the JSON file and the table (after every row, and at the end)."""
        self.meta["seconds"]["total"] = round(self.clock.budget_s - self.clock.left(), 1)
        write_json(self.args.out, {"meta": self.meta, "rows": [asdict(row) for row in self.rows]})
        write_text(Path(self.args.out).with_suffix(".md"), format_table(self.rows) + "\n")

    def model_dir(self, shape: str) -> Path:
        config = models.qwen_config(shape, self.tiny, self.tokenizer)
        return models.build_model(self.work / f"qwen2.5-{shape}-shaped", config, self.tokenizer, self.args.device)

    def run(self) -> None:
        started = time.perf_counter()
        launches = []
        if "launch" in self.args.parts:
            model_dir, data_dir = self.model_dir("1.5B"), launching.launch_data(self.work / "launch-data")
            steps = 2 if self.tiny else 3
            launches = [launching.start_launch(config, method, model_dir, data_dir, self.work, self.cuda, steps)
                        for config in launching.LAUNCH_CONFIGS for method in self.args.launch_methods]  # fmt: skip
        in_process = set(self.args.parts) - {"launch"}
        for group in self.groups if in_process else ():  # build while the launches run (they need only 1.5B)
            self.model_dir(group.shape)
        self.meta["seconds"]["build"] = round(time.perf_counter() - started, 1)
        if self.cuda:  # nothing else may use the GPU while it is being timed
            self.finish_launches(launches)
        for group in self.groups if in_process else ():
            self.run_group(group)
        if not self.cuda:  # on CPU nothing is timed for real: the launches overlap the runs
            self.finish_launches(launches)
        skipped = [row.data["group_key"] for row in self.rows if row.result == "skipped" and "group_key" in row.data]
        if skipped:  # what a second call runs
            parts = ",".join(part for part in self.args.parts if part != "launch")
            self.meta["next_call"] = f"bash scripts/gpu_check.sh --parts {parts} --groups {','.join(skipped)}"

    def finish_launches(self, launches: list) -> None:
        """A row per launch as it ends; after a LoRA run that worked, its `--eval_only` of stage 1 and a row."""
        started = time.perf_counter()
        for launch in launches:
            self.add(self.launch_row(launch, launching.finish_launch(launch, self.args.launch_timeout_s,
                                                                     last_error_line, self.cuda)))  # fmt: skip
            if launch.method == "lora" and launch.result is None and self.rows[-1].result == "works":
                if self.clock.left() < 30:
                    self.add(self.launch_row(launch, {"status": "skipped", "detail": "the time budget ran out"}))
                    continue
                evaluation = launching.start_eval_only(launch, self.cuda)
                timeout = min(self.args.launch_timeout_s, max(self.clock.left(), 30))
                self.add(self.launch_row(evaluation, launching.finish_launch(evaluation, timeout, last_error_line,
                                                                             self.cuda)))  # fmt: skip
        self.meta["seconds"]["launch wait"] = round(time.perf_counter() - started, 1)
        self.save()

    @staticmethod
    def launch_row(launch, result: dict) -> Row:
        setup = f"accelerate launch {launch.config}.yaml, {METHOD_NAMES[launch.method]}, 1 process"
        what = "--eval_only --checkpoint <run>/sft" if launch.eval_only else "eval_base, both stages, keep_best on key"
        data = {**result, "config": launch.config, "method": launch.method, "eval_only": launch.eval_only}
        return Row("launch", f"{setup}: {what}", result["status"], verdict=result["detail"], data=data)

    def run_group(self, group: Group) -> None:
        label = group.label(self.cuda)
        if self.clock.left() < group.min_seconds:
            verdict = f"not started: the time budget ran out (a second call runs it: --groups {group.key})"
            self.add(Row("training", label, "skipped", verdict=verdict, data={"group_key": group.key}))
            return
        started = time.perf_counter()
        values = runs.training_values(self.work, group.steps, group.batch, self.cuda)
        count = max(group.batch * group.steps, 8)
        columns = models.tokenised(self.tokenizer, models.long_examples(self.tokenizer, count, group.seq_len))
        seq_len = max(len(ids) for ids in columns["input_ids"])
        base = None
        try:
            base = runs.load_base(self.model_dir(group.shape), group.method, values)
            if "training" in self.args.parts:
                rounds = self.args.rounds or (1 if self.tiny else 2)
                reserve = 0 if self.tiny else 60
                measured, base, cut = runs.measure_stages(
                    base, self.tokenizer, columns, values, rounds, self.clock, reserve, warm_up=not self.tiny
                )
                for stage in runs.STAGES:
                    reference = "" if self.tiny else REFERENCE.get((group.key, stage.loss_on), "")
                    by_kind = measured[stage.loss_on]
                    self.add(*training_rows(label, stage.loss_on, by_kind, cut, reference, judge=not self.tiny))
                peaks = {s.loss_on: self._peak(measured[s.loss_on]["sftkey"]) for s in runs.STAGES}
                config = models.qwen_config(group.shape, self.tiny, self.tokenizer)
                shape = f"batch {group.batch} x {seq_len} tokens"
                estimated = estimate(group, self.tiny, config, seq_len)
                self.add(*memory_rows(label, group.method, estimated, peaks, shape))
            if group.generation and "generation" in self.args.parts:
                base = base.to(self.args.device)  # loaded to train: the Trainer places it, and none ran
                model = f"{group.shape}{'' if self.cuda else ' (tiny)'} {'bf16' if self.cuda else 'float32'} model"
                self.add(self.generation_row(model, base))
            if group.liger and "liger" in self.args.parts:
                self.add(*self.liger_rows(label, base, columns, values))
        except Exception as error:  # one failed group must not lose the others' rows
            line = last_error_line(f"{type(error).__name__}: {error}")
            trace = traceback.format_exc().splitlines()[-30:]
            self.add(Row("training", label, "error", verdict=line, data={"group": label, "traceback": trace}))
        finally:
            del base
            gc.collect()
            if self.cuda:
                torch.cuda.empty_cache()
        self.meta["seconds"][label] = round(time.perf_counter() - started, 1)

    @staticmethod
    def _peak(measured: list) -> float | None:
        peaks = [m.peak_gib for m in measured]
        return None if not peaks or None in peaks else max(peaks)

    def generation_row(self, label: str, model) -> Row:
        settings = TINY_GENERATION if self.tiny else GPU_GENERATION
        texts, end_of_turn = models.prompts(self.tokenizer, settings["count"])
        result = runs.measure_generation(model, self.tokenizer, texts, end_of_turn, settings["batch"],
                                    settings["max_new_tokens"], settings["single_prompts"])  # fmt: skip
        speedup = ratio(result["batched_tokens_per_s"], result["single_tokens_per_s"])
        prompt_tokens = statistics.mean(len(self.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)
        setup = (f"{label}, {result['prompts']} prompts (~{prompt_tokens:.0f} tokens), up to "
                 f"{result['max_new_tokens']} new tokens, batch {result['batch']}")  # fmt: skip
        return Row("generation", setup, f"{result['batched_tokens_per_s']:,.0f} generated tokens/s (batched)",
                   f"{speedup:.1f}x one at a time ({result['single_tokens_per_s']:,.0f} tokens/s)",
                   gib(result["batched_peak_gib"]), "" if self.tiny else REFERENCE["generation"],
                   data=result)  # fmt: skip

    def liger_rows(self, label: str, base, columns, values: dict) -> list[Row]:
        setup = f"{label}, use_liger_kernel"
        if importlib.util.find_spec("liger_kernel") is None:
            return [Row("liger", setup, "not installed", verdict="liger-kernel is not installed")]
        try:
            results = runs.measure_liger(base, self.tokenizer, columns, values)
        except Exception as error:
            return [Row("liger", setup, "error", verdict=last_error_line(f"{type(error).__name__}: {error}"))]
        rows = []
        for loss_on, measured in results.items():
            off = [r for r in self.rows if r.data.get("group") == label and r.data.get("kind") == "sftkey"
                   and r.data.get("loss_on") == loss_on]  # fmt: skip
            off_speed = off[0].data["tokens_per_s"] if off else None
            off_peak = off[0].data["peak_gib"] if off else None
            note = "" if self.tiny or loss_on != "completion" else REFERENCE["liger"]
            rows.append(Row("liger", f"{label}, {loss_on} stage, sftkey + use_liger_kernel",
                            f"{measured.tokens_per_s:,.0f} tokens/s",
                            f"{ratio(measured.tokens_per_s, off_speed) or 0:.3f}x liger off",
                            gib(measured.peak_gib, off_peak), note,
                            data={"group": label, "loss_on": loss_on, "tokens_per_s": measured.tokens_per_s,
                                  "peak_gib": measured.peak_gib, "off_tokens_per_s": off_speed,
                                  "off_peak_gib": off_peak}))  # fmt: skip
        return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="Tiny stand-in models and few steps (CPU tests).")
    parser.add_argument("--out", default="outputs/gpu_check/gpu_check.json", help="The JSON file to write.")
    parser.add_argument("--work", default=None, help="Folder for models and runs (default: a new temporary one).")
    parser.add_argument("--tokenizer", default=None, help="A local tokenizer folder instead of the BPE built here.")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"Comma-separated subset of {','.join(PARTS)}.")
    parser.add_argument("--rounds", type=int, default=None, help="Rounds per trainer (default: 2; 1 with --tiny).")
    parser.add_argument("--budget_s", type=float, default=None, help="Stop starting new work after this many s.")
    parser.add_argument("--launch_timeout_s", type=float, default=240.0, help="Kill a launch after this many s.")
    keys = ",".join(g.key for g in GPU_GROUPS)
    parser.add_argument("--groups", default=keys, help=f"Models to train and measure, a subset of {keys}.")
    parser.add_argument("--launch_methods", default="lora,qlora", help="Launch each config with these methods.")
    args = parser.parse_args(argv)
    choices = {"parts": PARTS, "launch_methods": tuple(METHOD_NAMES), "groups": tuple(g.key for g in GPU_GROUPS)}
    for name, allowed in choices.items():
        values = [value for value in getattr(args, name).split(",") if value]
        unknown = sorted(set(values) - set(allowed))
        if unknown:
            parser.error(f"--{name}: unknown {unknown}; choose from {','.join(allowed)}")
        setattr(args, name, values)
    if args.device == "cpu" and not args.tiny:
        parser.error("the published shapes need a GPU; on CPU add --tiny")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("no GPU is visible; use --device cpu --tiny")
    if args.budget_s is None:
        # The device runs a command for at most 600 s: 420 s leaves room for imports, the builds' tail and writing
        args.budget_s = 3600.0 if args.tiny else 420.0
    return args


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = parse_args(argv)
    if args.device == "cpu":  # tiny matrices gain nothing from threads, and a shared CPU punishes spinning ones
        torch.set_num_threads(1)
    check = Check(args)
    check.run()
    check.save()
    table = format_table(check.rows)
    print(f"\nGPU check on {check.meta['device']} ({check.meta['mode']}), {check.meta['seconds']['total']:.0f} s")
    print(table)
    print(f"\nwritten: {check.args.out}")
    if "next_call" in check.meta:
        print(f"not run within the time budget; next: {check.meta['next_call']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
