"""End-to-end runs of recipes/run.py: the offline demo under `accelerate launch`, QLoRA on CPU, `--inspect`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter

import pytest
import torch
from conftest import DIVERGING_RATE, ROOT
from transformers import TrainerCallback

from sftkey_trl.run.cli import main

DEMO = str(ROOT / "recipes/demo/sftkey_tiny.yaml")
SMALL = [
    "--max_train_samples", "64", "--max_eval_samples", "8", "--max_new_tokens", "48",
    "--stages", "[{name: sft, loss_on: completion, num_train_epochs: 1}, {name: key, loss_on: key}]",
]  # fmt: skip


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, str(ROOT / "recipes/run.py"), *args], capture_output=True, text=True, env=env, cwd=ROOT
    )


def majority_answer_rate(rows: list[dict]) -> float:
    """The accuracy of always answering the most common gold answer: what a model learns for free."""
    return Counter(row["answer"] for row in rows).most_common(1)[0][1] / len(rows)


# What the libraries print by habit and a run must not (issue 36): each a line that carries nothing for the user
NOISE = (
    "Generating train split", "Saving the dataset", "Loading weights", "Writing model shards",
    "Setting accelerator to CPU", "is deprecated", "FutureWarning", "UserWarning", "No artists with labels",
    "mtime may not be reliable", "were not passed to `accelerate launch`", "kernels-community", "{'",
)  # fmt: skip


def quick_start_launch() -> list[str]:
    """The README's quick-start demo command (after `pip install ... &&`), run through this interpreter."""
    from test_readme import COMMANDS

    launch = COMMANDS[0].split("#")[0].split("&&")[1].split()
    assert launch[:2] == ["accelerate", "launch"], launch
    return [sys.executable, "-m", "accelerate.commands.launch", *launch[2:]]


@pytest.mark.slow
def test_a_mistake_under_the_quick_start_launch_ends_on_its_one_line(tmp_path):
    """accelerate's launcher raises its own CalledProcessError on any non-zero exit, so a refused run's one line was
    followed by a traceback whose last line named no problem. The README's launch passes `-q`: the line is last."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [*quick_start_launch(), "--output_dir", str(tmp_path / "out"), "--learning_rate", "fast"]
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert done.returncode != 0
    assert "Traceback" not in done.stdout + done.stderr, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "learning_rate" in last, done.stderr[-2000:]


@pytest.mark.e2e
def test_demo_end_to_end(tmp_path):
    """The README's quick-start command: both stages train and are evaluated, stage 1 beats always giving the test
    set's most common answer (answers are single digits, so 0.1 would be chance), and the console carries none of the
    libraries' habitual noise. Its own cache, so that it builds the demo's model rather than reusing the smaller one
    the other tests share."""
    cache = tmp_path / "cache"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SFTKEY_CACHE": str(cache)}
    command = [*quick_start_launch(), "--output_dir", str(tmp_path / "demo")]
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    console = done.stdout + done.stderr
    assert not [noise for noise in NOISE if noise in console], console[-3000:]
    results = json.loads((tmp_path / "demo/results.json").read_text())
    assert list(results["stages"]) == ["sft", "key"]
    for name in ("sft", "key"):
        assert (tmp_path / "demo" / name / "model.safetensors").exists()
        assert results["stages"][name]["num_examples"] == 200
    # The test rows the run scored: the demo's test file, cut to the recipe's max_eval_samples (200)
    lines = (cache / "demo-arithmetic-v2" / "test.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines[:200]]
    predictions = [json.loads(line) for line in (tmp_path / "demo/sft/predictions.jsonl").read_text().splitlines()]
    assert sorted(p["index"] for p in predictions) == list(range(200))
    assert all(p["gold"] == rows[p["index"]]["answer"] for p in predictions)
    assert results["stages"]["sft"]["accuracy"] > majority_answer_rate(rows)
    # The key stage runs as the guide says (keep_best on the validation split) and the run reads its numbers back
    assert "keep_best" in results["stages"]["key"]["training"]
    assert results["summary"] and results["summary"][0].startswith("`key` against `sft`: accuracy ")
    assert all(line.split(" (n = ")[0][:60] in " ".join(done.stdout.split()) for line in results["summary"][:1])


class AdapterAtTrainBegin(TrainerCallback):
    """Copies the LoRA adapter each stage's training starts from, keyed by stage name (as saved on disk)."""

    def __init__(self, trainer, captured: dict):
        self.trainer, self.captured = trainer, captured

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        from peft import get_peft_model_state_dict

        tensors = get_peft_model_state_dict(model)
        self.captured[self.trainer.stage.name] = {
            name: tensor.detach().cpu().clone() for name, tensor in tensors.items()
        }


@pytest.mark.e2e
def test_qlora_two_stages_on_cpu(tmp_path, monkeypatch):
    """Real 4-bit nf4 base + LoRA: stage 2 reloads the 4-bit base with the stage-1 adapter and keeps training it."""
    from safetensors.torch import load_file

    from sftkey_trl.run import pipeline

    captured: dict[str, dict] = {}

    class CapturingTrainer(pipeline.SFTKeyTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.add_callback(AdapterAtTrainBegin(self, captured))

    monkeypatch.setattr(pipeline, "SFTKeyTrainer", CapturingTrainer)
    output = tmp_path / "qlora"
    args = ["--config", DEMO, "--output_dir", str(output), "--load_in_4bit", "true", "--use_peft", "true",
            "--use_bnb_nested_quant", "true", "--learning_rate", "1e-3", *SMALL]  # fmt: skip
    assert main(args) == 0
    adapters = [load_file(output / stage / "adapter_model.safetensors") for stage in ("sft", "key")]
    assert adapters[0].keys() == adapters[1].keys() and not any("lm_head" in k for k in adapters[0])
    # The key stage starts from exactly stage 1's saved adapter (same tensors, bit for bit) and trains it further
    start = captured["key"]
    assert start.keys() == adapters[0].keys()
    assert all(start[k].dtype == adapters[0][k].dtype and torch.equal(start[k], adapters[0][k]) for k in start)
    assert any(not torch.equal(captured["sft"][k], adapters[0][k]) for k in start)  # the capture sees training
    assert any(not torch.equal(adapters[0][k], adapters[1][k]) for k in adapters[0])
    results = json.loads((output / "results.json").read_text())
    assert set(results["stages"]) == {"sft", "key"}
    config = json.loads((output / "sft" / "adapter_config.json").read_text())
    assert config["r"] == 16
    # --eval_only on the saved adapter reproduces the stage's numbers
    assert main([*args, "--eval_only", "--checkpoint", str(output / "key")]) == 0
    reproduced = json.loads((output / "eval_only" / "key" / "metrics.json").read_text())
    stage = results["stages"]["key"]
    assert {k: reproduced[k] for k in reproduced} == {k: stage[k] for k in reproduced}
    # --merge: the adapter merged into the base loaded unquantised (float32 on a CPU), a standalone model
    from transformers import AutoModelForCausalLM

    assert main([*args, "--merge", "key"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(output / "key" / "merged")
    assert merged.dtype == torch.float32 and "quantization_config" not in merged.config.to_dict()
    assert not any("4bit" in type(module).__name__ or "lora" in name for name, module in merged.named_modules())


@pytest.mark.e2e
def test_keep_best_never_hides_a_diverged_stage_and_keeps_stage_1_weights_a_stage_2_never_beats(tmp_path, capsys):
    """At a diverging learning rate the key stage's loss turns NaN: keep_best used to evaluate the NaN model, tie
    at 0 and report 'kept the incoming weights' with exit 0; the stage now stops with one line. Retrained at a rate
    that never beats stage 1 on validation, keep-best copies stage 1's weights in as the stage's output."""
    from safetensors.torch import load_file

    output = tmp_path / "best"
    stages = ("[{name: sft, loss_on: completion, num_train_epochs: 2}, "
              "{name: key, loss_on: key, num_train_epochs: 1, learning_rate: RATE, keep_best: true}]")  # fmt: skip
    args = ["--config", DEMO, "--output_dir", str(output), "--max_train_samples", "160", "--eval_fraction", "0.2",
            "--max_eval_samples", "24", "--max_new_tokens", "40"]  # fmt: skip
    with pytest.raises(SystemExit) as stopped:
        main([*args, "--stages", stages.replace("RATE", DIVERGING_RATE)])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert stopped.value.code == 2 and error.startswith("error: stage `key` diverged at step "), error
    assert "key" not in json.loads((output / "results.json").read_text())["stages"]
    assert main([*args, "--stages", stages.replace("RATE", "2.0e-4"), "--restart_from", "key"]) == 0
    results = json.loads((output / "results.json").read_text())
    report = results["stages"]["key"]["training"]["keep_best"]
    assert report["best_step"] == 0 and "incoming" in report["kept"]
    assert [step for step, _ in report["history"]][0] == 0 and len(report["history"]) >= 2
    kept, stage_1 = load_file(output / "key" / "model.safetensors"), load_file(output / "sft" / "model.safetensors")
    assert all((kept[name] == stage_1[name]).all() for name in stage_1)
    assert results["stages"]["key"]["accuracy"] == results["stages"]["sft"]["accuracy"]
    assert "the incoming weights (step 0: never beaten)" in (output / "results.md").read_text()


@pytest.mark.e2e
def test_patience_stops_a_stage_whose_validation_metric_cannot_improve(tmp_path):
    """At learning rate 0 the weights never change, so the first evaluation after step 0 ties it: patience 1 stops
    the stage there, well before its epochs are done, and results.json says so."""
    output = tmp_path / "patience"
    stages = "[{name: sft, num_train_epochs: 3, learning_rate: 0.0, keep_best: true, patience: 1}]"
    args = ["--config", DEMO, "--output_dir", str(output), "--max_train_samples", "64", "--max_eval_samples", "8",
            "--max_new_tokens", "16", "--eval_steps", "2", "--eval_after_stages", "false",
            "--stages", stages]  # fmt: skip
    assert main(args) == 0
    training = json.loads((output / "results.json").read_text())["stages"]["sft"]["training"]
    report = training["keep_best"]
    assert report["stopped_early"] and report["stopped_at"] == 2 and report["steps_trained"] == 2
    assert [step for step, _ in report["history"]] == [0, 2] and report["patience"] == 1
    assert training["optimizer_steps"] == 2  # of 12 (64 rows / 16 per step x 3 epochs)
    assert [e["step"] for e in json.loads((output / "sft" / "log_history.json").read_text())][-1] == 2


@pytest.mark.slow
def test_detached_key_stage_with_qlora_and_gradient_checkpointing(tmp_path):
    """`context: detached` through run.py's main on the hardest path: a 4-bit base, LoRA and checkpointed layers."""
    from safetensors.torch import load_file

    output = tmp_path / "detached"
    stages = ("[{name: sft, loss_on: completion, num_train_epochs: 1}, "
              "{name: key, loss_on: key, num_train_epochs: 1, context: detached}]")  # fmt: skip
    args = ["--config", DEMO, "--output_dir", str(output), "--load_in_4bit", "true", "--use_peft", "true",
            "--gradient_checkpointing", "true", "--max_train_samples", "64", "--max_eval_samples", "8",
            "--max_new_tokens", "48", "--stages", stages]  # fmt: skip
    assert main(args) == 0
    adapters = [load_file(output / stage / "adapter_model.safetensors") for stage in ("sft", "key")]
    assert any((adapters[0][k] != adapters[1][k]).any() for k in adapters[0])  # the key stage trained the adapter
    results = json.loads((output / "results.json").read_text())
    assert results["stages"]["key"]["num_examples"] == 8 and results["stages"]["key"]["training"]["train_tokens"] > 0
    logs = json.loads((output / "key" / "log_history.json").read_text())
    losses = [entry for entry in logs if "key_loss" in entry]
    assert losses and all(entry["key_loss"] > 0 and "reasoning_loss" not in entry for entry in losses)


@pytest.mark.slow
def test_a_stages_own_log_part_losses_is_honoured(tmp_path):
    """It was recorded in the manifest and not applied: the recipe-wide value (true) decided."""
    output = tmp_path / "parts"
    stages = "[{name: key, loss_on: key, num_train_epochs: 1, log_part_losses: false}]"
    args = ["--config", DEMO, "--output_dir", str(output), "--max_train_samples", "32", "--eval_after_stages", "false",
            "--save_strategy", "no", "--logging_steps", "1", "--stages", stages]  # fmt: skip
    assert main(args) == 0
    logs = json.loads((output / "key" / "log_history.json").read_text())
    losses = [entry for entry in logs if "key_loss" in entry]
    assert losses and all("reasoning_loss" not in entry for entry in losses)


def test_qlora_model_is_really_4bit(tmp_path, tiny_model_dir):
    import bitsandbytes as bnb
    from trl import ModelConfig

    from sftkey_trl.recipe.schema import SFTKeyConfig
    from sftkey_trl.train.modeling import load_model

    model_args = ModelConfig(model_name_or_path=str(tiny_model_dir), load_in_4bit=True, use_peft=True,
                             use_bnb_nested_quant=True)  # fmt: skip
    model = load_model(model_args, SFTKeyConfig(output_dir=str(tmp_path), use_cpu=True), purpose="train")
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and layers[0].weight.quant_type == "nf4"
    assert model.config.quantization_config.bnb_4bit_use_double_quant


@pytest.mark.slow
def test_inspect_json_shows_supervised_text_per_stage():
    done = run_cli("--inspect", "2", "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    records = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert [(r["index"], r["stage"]) for r in records] == [(0, "sft"), (0, "key"), (1, "sft"), (1, "key")]
    sft, key = records[0], records[1]
    assert sft["supervised_text"].startswith("<Thinking>") and sft["supervised_text"].endswith("<|im_end|>")
    assert key["supervised_text"].startswith("\n<Answer>") and key["supervised_text"].endswith("</Answer><|im_end|>")
    assert sft["text"].endswith(sft["supervised_text"] + "\n") and sft["supervised_text"].endswith(
        key["supervised_text"]
    )


@pytest.mark.slow
def test_inspect_shows_each_stage_objectives_weights():
    stages = "[{name: emph, loss_on: completion, key_weight: 5}, {name: mix, loss_on: key, reasoning_weight: 0.1}]"
    done = run_cli("--inspect", "1", "--json", "--stages", stages)
    assert done.returncode == 0, done.stderr[-2000:]
    records = {r["stage"]: r for r in map(json.loads, (line for line in done.stdout.splitlines() if line[:1] == "{"))}
    assert records["emph"]["weights"] == [1.0, 5.0] and records["mix"]["weights"] == [0.1, 1.0]
    assert records["mix"]["supervised_text"] == records["emph"]["supervised_text"]  # both see the whole response


@pytest.mark.slow
def test_inspect_accepts_recipe_overrides(tmp_path):
    data = tmp_path / "my.jsonl"
    data.write_text(json.dumps({"q": "Start at 1, add 1.", "r": "1 + 1 = 2", "a": "2"}) + "\n")
    done = run_cli("--inspect", "1", "--json", "--dataset_name", str(data), "--question_field", "q",
                   "--reasoning_field", "r", "--answer_field", "a", "--response_format", "plain")  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    key = [json.loads(line) for line in done.stdout.splitlines() if '"stage": "key"' in line][0]
    assert key["supervised_text"] == "The answer is 2.<|im_end|>"


@pytest.mark.slow
def test_copied_recipe_and_script_work_outside_the_repo(tmp_path):
    """A user copies run.py and one YAML into their own project; the installed package does the rest."""
    import shutil

    shutil.copy(ROOT / "recipes/run.py", tmp_path / "run.py")
    shutil.copy(ROOT / "recipes/demo/sftkey_tiny.yaml", tmp_path / "my_recipe.yaml")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "run.py", "--config", "my_recipe.yaml", "--inspect", "1", "--json"],
                          capture_output=True, text=True, env=env, cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert '"stage": "key"' in done.stdout
