"""Every model that generates sits on the training device, through every entry point that evaluates: `eval_base`,
a stage evaluated in memory, keep_best's validation during training, a stage evaluated from disk (keep_best kept
an earlier snapshot, or a rerun evaluates a finished stage) and `--eval_only`. On a CPU every tensor is on the
CPU anyway, so the test records where each model was *put*: the `device_map` it was loaded with, or the device a
`.to()` moved it to (the Trainer's placement). A model that was put nowhere stays where `from_pretrained` leaves
it, the CPU, even on a GPU machine. A finished stage's optimizer must be gone when the next evaluation starts."""

from __future__ import annotations

import json
import sys
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


class FakeLLM:
    """vLLM's `LLM` as generate_vllm uses it (vllm is not installed here): records what it was started with and
    which Hugging Face models were still in memory then (after a collection: only what something still holds)."""

    started: list[dict] = []

    def __init__(self, model: str, enable_lora: bool, gpu_memory_utilization: float):
        import gc

        from transformers import PreTrainedModel

        gc.collect()
        live = sum(isinstance(obj, PreTrainedModel) for obj in gc.get_objects())
        self.started.append({"model": model, "lora": enable_lora, "memory": gpu_memory_utilization, "live": live})

    def generate(self, prompts, params, lora_request=None):
        from types import SimpleNamespace

        answer = SimpleNamespace(text="<Thinking>1 + 1 = 2</Thinking>\n<Answer>2</Answer>", token_ids=[1] * 12)
        return [SimpleNamespace(outputs=[answer]) for _ in prompts]


@pytest.fixture()
def fake_vllm(monkeypatch):
    import importlib.machinery
    import types

    modules = {name: types.ModuleType(name) for name in ("vllm", "vllm.lora", "vllm.lora.request")}
    for name, module in modules.items():
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)  # found by the recipe check's find_spec
        monkeypatch.setitem(sys.modules, name, module)
    modules["vllm"].LLM, modules["vllm"].SamplingParams = FakeLLM, lambda **kwargs: kwargs
    modules["vllm.lora.request"].LoRARequest = lambda *args: args
    FakeLLM.started = []
    return FakeLLM.started


def test_vllm_starts_with_no_hugging_face_model_in_memory(fake_vllm, tiny_model_dir, tmp_path):
    """With `eval_backend: vllm` the stage is served from its saved folder: the trained model is freed before vLLM
    starts (it would otherwise hold the GPU memory vLLM is given), and no model is loaded just to be ignored."""
    out = tmp_path / "run"
    args = ["--config", DEMO, "--output_dir", str(out), "--use_peft", "true", "--eval_base", "true",
            "--eval_backend", "vllm", "--max_train_samples", "32", "--max_eval_samples", "4", "--max_new_tokens", "8",
            "--save_strategy", "no", "--stages", STAGES]  # fmt: skip
    assert main(args) == 0
    assert [started["model"] for started in fake_vllm] == [str(tiny_model_dir)] * 3  # base, then sft and key
    assert [started["lora"] for started in fake_vllm] == [False, True, True]  # each stage served as an adapter
    assert all(started["live"] == 0 for started in fake_vllm), fake_vllm
    assert all(started["memory"] == 0.9 for started in fake_vllm)  # vLLM's default without a GPU to measure
    results = json.loads((out / "results.json").read_text())
    assert [results["stages"][name]["num_examples"] for name in ("sft", "key")] == [4, 4]
