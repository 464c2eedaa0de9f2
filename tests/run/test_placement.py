"""Every model that generates sits on the training device, through every entry point that evaluates: `eval_base`,
a stage evaluated in memory, keep_best's validation during training, a stage evaluated from disk (keep_best kept
an earlier snapshot, or a rerun evaluates a finished stage) and `--eval_only`. On a CPU every tensor is on the
CPU anyway, so the test records where each model was *put*: the `device_map` it was loaded with, or the device a
`.to()` moved it to (the Trainer's placement). A model that was put nowhere stays where `from_pretrained` leaves
it, the CPU, even on a GPU machine. A finished stage's optimizer must be gone when the next evaluation starts."""

from __future__ import annotations

import json
import weakref

import pytest
import torch
from conftest import ROOT
from transformers import AutoModelForCausalLM

from sftkey_trl.evaluation import generation
from sftkey_trl.run.cli import main
from sftkey_trl.train.trainer import SFTKeyTrainer

DEMO = str(ROOT / "recipes/demo/sftkey_tiny.yaml")
STAGES = (
    "[{name: sft, loss_on: completion, num_train_epochs: 1}, "
    "{name: key, loss_on: key, num_train_epochs: 1, keep_best: true}]"
)
pytestmark = pytest.mark.e2e


class Placements:
    """Where each module was put (`from_pretrained`'s device map or `.to(device)`), and what each generation saw."""

    def __init__(self):
        self.placed: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self.optimizers: list[weakref.ref] = []  # of finished stages
        self.training = False
        self.generations: list[dict] = []

    def put(self, model, device) -> None:
        for module in model.modules():
            self.placed[module] = str(torch.device(device))

    def saw(self, model, label: str) -> None:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        alive = sum(ref() is not None for ref in self.optimizers)  # no collection here: memory freed *now* counts
        self.generations.append(
            {"label": label, "placed": self.placed.get(base), "training": self.training, "live_optimizers": alive}
        )


@pytest.fixture()
def placements(monkeypatch) -> Placements:
    record = Placements()
    loader = AutoModelForCausalLM.from_pretrained.__func__

    def from_pretrained(cls, *args, **kwargs):
        model = loader(cls, *args, **kwargs)
        device_map = kwargs.get("device_map")
        if isinstance(device_map, dict) and set(device_map) == {""}:
            record.put(model, device_map[""])
        return model

    move = torch.nn.Module.to

    def to(self, *args, **kwargs):
        device = torch._C._nn._parse_to(*args, **kwargs)[0]
        moved = move(self, *args, **kwargs)
        if device is not None:
            record.put(self, device)
        return moved

    evaluate_model = generation.evaluate_model

    def recorded_evaluate_model(model, *args, **kwargs):
        if model is not None:
            record.saw(model, kwargs.get("label", "evaluation"))
        return evaluate_model(model, *args, **kwargs)

    train = SFTKeyTrainer.train

    def recorded_train(self, *args, **kwargs):
        record.training = True
        try:
            return train(self, *args, **kwargs)
        finally:
            record.training = False
            record.optimizers.append(weakref.ref(self.optimizer.optimizer))  # the torch optimizer accelerate wraps

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(from_pretrained))
    monkeypatch.setattr(torch.nn.Module, "to", to)
    monkeypatch.setattr("sftkey_trl.run.pipeline.evaluate_model", recorded_evaluate_model)
    monkeypatch.setattr(SFTKeyTrainer, "train", recorded_train)
    return record


def test_every_generating_model_is_on_the_training_device_and_finished_engines_are_gone(
    placements, tiny_model_dir, tmp_path
):
    out = tmp_path / "run"
    args = ["--config", DEMO, "--output_dir", str(out), "--use_peft", "true", "--eval_base", "true",
            "--max_train_samples", "32", "--max_eval_samples", "4", "--max_new_tokens", "8", "--eval_batch_size", "4",
            "--save_strategy", "no", "--stages", STAGES]  # fmt: skip
    assert main(args) == 0  # base, sft in memory, keep_best during key, key from disk or in memory
    results_path = out / "results.json"
    results = json.loads(results_path.read_text())
    results["stages"]["key"] = {"loss_on": "key", "training": results["stages"]["key"]["training"]}
    results_path.write_text(json.dumps(results))  # as if killed during key's evaluation: the rerun evaluates it
    assert main(args) == 0
    assert main([*args, "--eval_only", "--checkpoint", str(out / "sft")]) == 0  # a LoRA stage

    device = str(torch.device("cpu"))  # the training device here
    seen = placements.generations
    for generation_ in seen:
        assert generation_["placed"] == device, seen
        if not generation_["training"]:
            assert generation_["live_optimizers"] == 0, seen
    labels = [g["label"] for g in seen]
    assert {"base", "sft", "key", "keep_best", "eval_only/sft"} <= set(labels) and labels.count("key") == 2, labels
