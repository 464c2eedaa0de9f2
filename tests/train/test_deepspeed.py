"""DeepSpeed ZeRO-2 and ZeRO-3 for real, on two CPU processes: DeepSpeed's CPU accelerator with gloo
(`ddp_backend: gloo`, no `use_cpu`), launched with the shipped accelerate configs. Each runs the shortened demo through
both stages (stage 2 reloads stage 1's saved folder), saves stage folders that reload with `from_pretrained` /
`PeftModel.from_pretrained` (ZeRO-3 gathers the weights on save: `zero3_save_16bit_model: true`), evaluates every
example once, and trains full fine-tuning and LoRA exactly like one process (tolerances of tests/train/test_ddp.py).
QLoRA (bitsandbytes 4-bit on CPU) runs through both stages under both. Every launch runs recipes/run.py's main
through a probe that records what each rank built, evaluated and still held (a finished stage's engine must be gone
when the next evaluation starts); one ZeRO-3 launch adds eval_base and keep_best on the key stage.

The first DeepSpeed launch on a machine compiles DeepSpeed's shared-memory communication op (a C++ compiler, about
a minute, then cached in ~/.cache/torch_extensions)."""

from __future__ import annotations

import json
import math

import pytest
from real_launches import (
    LORA,
    ROOT,
    RUN,
    SHORT_DEMO,
    accelerate,
    assert_evaluated_everything,
    assert_trains_like_one_process,
    logged_losses,
    stages,
)

pytest.importorskip("deepspeed", reason="DeepSpeed is pinned in requirements.txt; pip install -r requirements.txt")

QLORA = (*LORA, "--load_in_4bit", "true")
pytestmark = [pytest.mark.e2e, pytest.mark.distributed]


# What a rank's process did, recorded around recipes/run.py's own main (the launch runs this instead of run.py):
# each stage's model as the trainer gets it (built partitioned by ZeRO-3: every base weight has a `ds_id`), the
# checkpointing the model's layers got, and at every evaluation outside training whether a finished stage's
# DeepSpeed engine or optimizer is still alive (before and after a garbage collection) and what the evaluation
# model is (whole: no `ds_id`).
PROBE = """
import gc, json, os, sys, weakref
from pathlib import Path
from sftkey_trl.run import pipeline
from sftkey_trl.run.cli import main
from sftkey_trl.train.trainer import SFTKeyTrainer

record = {"built": [], "reentrant": [], "evaluations": []}
finished, training = [], []
init, train, evaluate_model = SFTKeyTrainer.__init__, SFTKeyTrainer.train, pipeline.evaluate_model


def probed_init(self, *args, **kwargs):
    weights = [p for name, p in kwargs["model"].named_parameters() if "lora_" not in name]  # a loaded adapter: not yet
    partitioned = all(hasattr(p, "ds_id") for p in weights)
    record["built"].append({"stage": kwargs["stage"].name, "partitioned": partitioned})
    init(self, *args, **kwargs)


def probed_train(self, *args, **kwargs):
    training.append(True)
    try:
        return train(self, *args, **kwargs)
    finally:
        training.pop()
        finished.extend([weakref.ref(self.model_wrapped), weakref.ref(self.model_wrapped.optimizer)])
        layers = [m for m in self.model.modules() if hasattr(m, "_gradient_checkpointing_func")]  # set by train()
        reentrant = {m._gradient_checkpointing_func.keywords.get("use_reentrant") for m in layers}
        record["reentrant"].append(sorted(reentrant, key=str))


def probed_evaluate_model(model, *args, **kwargs):
    if not training:
        alive = sum(ref() is not None for ref in finished)
        gc.collect()
        alive_after_collection = sum(ref() is not None for ref in finished)
        whole = not any(hasattr(p, "ds_id") for p in model.parameters())
        record["evaluations"].append({"label": kwargs.get("label"), "alive": alive, "whole": whole,
                                      "alive_after_collection": alive_after_collection})
    return evaluate_model(model, *args, **kwargs)


SFTKeyTrainer.__init__, SFTKeyTrainer.train, pipeline.evaluate_model = probed_init, probed_train, probed_evaluate_model
try:
    code = main()
finally:
    out = Path(os.environ["PROBE_DIR"]) / f"rank{os.environ.get('RANK', '0')}.json"
    out.write_text(json.dumps(record))
sys.exit(code)
"""


def deepspeed(stage: int, output_dir, *args: str, demo: list[str] = SHORT_DEMO):
    """Two CPU processes under accelerate_configs/deepspeed_zero<stage>.yaml (its shipped settings), each running
    recipes/run.py's main through PROBE, which writes what it saw to `probed(output_dir)`."""
    config = str(ROOT / "accelerate_configs" / f"deepspeed_zero{stage}.yaml")
    probe, probes = output_dir.parent / f"{output_dir.name}-probe.py", output_dir.parent / f"{output_dir.name}-probes"
    probe.write_text(PROBE)
    probes.mkdir()
    done = accelerate("--config_file", config, "--num_processes", "2", str(probe), "--output_dir", str(output_dir),
                      *demo, "--ddp_backend", "gloo", *args, env={"PROBE_DIR": str(probes)})  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.count("SFTKey results") == 1  # only the main process reports
    return done


def probed(output_dir) -> list[dict]:
    """What PROBE recorded on each rank of the run in `output_dir`."""
    probes = output_dir.parent / f"{output_dir.name}-probes"
    return [json.loads((probes / f"rank{rank}.json").read_text()) for rank in (0, 1)]


def assert_engines_released(output_dir, evaluated: tuple[str, ...] = ("sft", "key")) -> None:
    """Each stage was evaluated on a whole model, with no finished stage's engine or optimizer alive, before a
    garbage collection as after one (ZeRO-2's engine stayed alive through hooks on the trained model, ZeRO-3's
    through DeepSpeed's own module-level state)."""
    for record in probed(output_dir):
        assert [evaluation["label"] for evaluation in record["evaluations"]] == list(evaluated), record
        for evaluation in record["evaluations"]:
            assert evaluation["whole"] and evaluation["alive"] == evaluation["alive_after_collection"] == 0, record


@pytest.mark.parametrize("zero", [2, 3])
def test_full_fine_tuning_trains_saves_and_evaluates_like_one_process(zero, reference_full, tmp_path):
    from transformers import AutoModelForCausalLM

    run = tmp_path / f"zero{zero}"
    deepspeed(zero, run)
    assert_trains_like_one_process(run, reference_full, world_size=2, weights="model.safetensors")
    assert_evaluated_everything(run)
    assert_engines_released(run)
    model = AutoModelForCausalLM.from_pretrained(run / "key")  # whole weights, not DeepSpeed shards
    assert sum(p.numel() for p in model.parameters()) > 0 and not list((run / "key").glob("global_step*"))


@pytest.mark.parametrize("zero", [2, 3])
def test_lora_trains_saves_and_evaluates_like_one_process(zero, reference_lora, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = tmp_path / f"zero{zero}"
    deepspeed(zero, run, *LORA)
    assert_trains_like_one_process(run, reference_lora, world_size=2, weights="adapter_model.safetensors")
    assert_evaluated_everything(run)
    assert_engines_released(run)
    config = json.loads((run / "key" / "adapter_config.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"])
    model = PeftModel.from_pretrained(base, run / "key")
    assert any("lora_B" in name and p.abs().sum() > 0 for name, p in model.named_parameters())


@pytest.mark.parametrize("zero", [2, 3])
def test_qlora_runs_both_stages(zero, reference_lora, tmp_path):
    """4-bit base + LoRA: both stages train and evaluate; the losses stay within 1% of the float32 LoRA run (nf4
    rounding of the frozen weights), so the sharded 4-bit weights are the model's (corrupted or unsharded storage
    would not train like this)."""
    run = tmp_path / f"zero{zero}"
    done = deepspeed(zero, run, *QLORA)
    if zero == 3:  # the storage rule of train/distributed.py, applied before loading
        assert "bnb_4bit_quant_storage: uint8 -> float32" in done.stderr
    for stage in ("sft", "key"):
        assert stages(run)[stage]["training"]["world_size"] == 2
        losses, lora = logged_losses(run / stage), logged_losses(reference_lora / stage)
        assert [step for step, _ in losses] == [1, 2, 3, 4]
        for (step, loss), (_, expected) in zip(losses, lora):
            assert math.isfinite(loss) and loss == pytest.approx(expected, rel=0.01), f"stage {stage}, step {step}"
        assert (run / stage / "adapter_model.safetensors").is_file()
    assert_evaluated_everything(run)


def test_without_gloo_the_cpu_launch_stops_with_one_line(tmp_path):
    """Without `ddp_backend: gloo` accelerate's state counts one process per job (DeepSpeed still all-reduces), so
    each rank would train and write as if alone; the real launch is refused before loading."""
    config = str(ROOT / "accelerate_configs" / "deepspeed_zero2.yaml")
    done = accelerate("--config_file", config, "--num_processes", "2", RUN, "--output_dir", str(tmp_path / "run"),
                      *SHORT_DEMO)  # fmt: skip
    assert done.returncode != 0
    errors = {line for line in done.stderr.splitlines() if line.startswith("error: ")}
    assert errors == {
        "error: DeepSpeed ZeRO-2 on CPU processes needs `ddp_backend: gloo` (without it accelerate counts one process "
        "per job and the ranks train apart); add `--ddp_backend gloo`"
    }
    assert not (tmp_path / "run" / "sft").exists()


KEEP_BEST_ON_KEY = (
    "[{name: sft, loss_on: completion, num_train_epochs: 1}, {name: key, loss_on: key, num_train_epochs: 1, "
    "keep_best: true}]"
)
# LoRA with activation checkpointing (the PEFT + ZeRO-3 case TRL needs reentrant checkpointing for), the base
# model evaluated, and keep_best on the key stage (its step-0 incoming weights are kept unless beaten)
KEEP_BEST_DEMO = [*SHORT_DEMO[:-2], "--stages", KEEP_BEST_ON_KEY, *LORA, "--eval_base", "true",
                  "--activation_checkpointing", "true"]  # fmt: skip


def results_of(run) -> dict:
    return json.loads((run / "results.json").read_text())


def test_zero3_with_eval_base_and_keep_best_builds_each_stage_partitioned_and_releases_its_engine(tmp_path):
    """Two CPU processes under deepspeed_zero3.yaml against one process, with eval_base and keep_best on the key
    stage: every evaluation (base, keep_best's, each stage's) runs on a whole model, each stage's model is built
    partitioned (stage 2's too, after stage 1's evaluation loaded a whole one), TRL's reentrant checkpointing
    reaches the layers, the finished stage's engine is gone when the next evaluation starts, and the run trains,
    keeps and scores like one process."""
    reference, run = tmp_path / "one", tmp_path / "zero3"
    done = accelerate("--num_processes", "1", "--cpu", RUN, "--output_dir", str(reference), *KEEP_BEST_DEMO,
                      "--use_cpu", "true")  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    deepspeed(3, run, demo=KEEP_BEST_DEMO)
    for record in probed(run):
        assert record["built"] == [{"stage": "sft", "partitioned": True}, {"stage": "key", "partitioned": True}]
        assert record["reentrant"] == [[True], [True]]
    assert_engines_released(run, ("base", "sft", "key"))

    assert_evaluated_everything(run)
    results, expected = results_of(run), results_of(reference)
    assert results["base"] == expected["base"] and results["base"]["num_examples"] == 40
    kept = results["stages"]["key"]["training"]["keep_best"]
    kept_alone = expected["stages"]["key"]["training"]["keep_best"]
    assert kept["history"] == kept_alone["history"] and len(kept["history"]) >= 2
    assert kept["best_step"] == kept_alone["best_step"]
    assert_trains_like_one_process(run, reference, world_size=2, weights="adapter_model.safetensors")
