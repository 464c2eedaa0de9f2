"""The watch over a stage's optimizer steps (`train/watch.py`) on the real `SFTKeyTrainer`: a stage whose loss or
gradient norm turns NaN or infinite stops with one line at that step, before any checkpoint of it is written; a stage
resumed from a checkpoint reports the whole stage (loss, tokens, steps, seconds) as an uninterrupted one does."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import script_args
from datasets import Dataset
from transformers import AutoModelForCausalLM, TrainerControl, TrainerState

from sftkey_trl.data.adapters import Triple
from sftkey_trl.data.formatting import Formatter
from sftkey_trl.data.masks import tokenize_rendered
from sftkey_trl.errors import SFTKeyError
from sftkey_trl.recipe.schema import SFTKeyConfig
from sftkey_trl.train.objectives import Stage
from sftkey_trl.train.trainer import SFTKeyTrainer
from sftkey_trl.train.watch import TOTALS_KEY, StageWatch, saved_totals

TRIPLES = [Triple(f"Start at {a}, add {b}.", f"{a} + {b} = {a + b}", str(a + b)) for a in range(4) for b in range(4)]


@pytest.fixture()
def dataset(char_tokenizer) -> Dataset:
    formatter = Formatter(char_tokenizer, script_args())
    return Dataset.from_dict(tokenize_rendered(char_tokenizer, [formatter.render(t) for t in TRIPLES]))


def trainer_for(model_dir, tokenizer, dataset, out: Path, model=None, **config) -> SFTKeyTrainer:
    """A one-process stage over the 16 rows: batch 4, so 4 optimizer steps an epoch."""
    torch.manual_seed(0)
    model = model or AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    settings = dict(num_train_epochs=2, learning_rate=1e-3, save_strategy="no", logging_steps=1) | config
    args = SFTKeyConfig(output_dir=str(out), use_cpu=True, report_to="none", activation_checkpointing=False,
                        max_length=None, per_device_train_batch_size=4, lr_scheduler_type="constant", seed=0,
                        disable_tqdm=True, **settings)  # fmt: skip
    return SFTKeyTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                         stage=Stage(name="sft"))  # fmt: skip


def checkpoint_steps(out: Path) -> list[int]:
    return sorted(int(path.name.split("-")[1]) for path in out.glob("checkpoint-*"))


def test_a_diverging_stage_stops_at_that_step_with_one_line_and_no_checkpoint_of_it(
    tiny_model_dir, char_tokenizer, dataset, tmp_path
):
    trainer = trainer_for(tiny_model_dir, char_tokenizer, dataset, tmp_path, learning_rate=1e5,
                          save_strategy="steps", save_steps=1)  # fmt: skip
    with pytest.raises(SFTKeyError) as error:
        trainer.train()
    message = str(error.value)
    step = trainer.state.global_step
    assert f"stage `sft` diverged at step {step} of 8:" in message and "\n" not in message
    assert "lower `learning_rate` (100000 in this stage)" in message and "--restart_from sft" in message
    assert 1 < step < 8
    # every step before it was checkpointed, the diverged one never: a rerun resumes from finite weights
    assert checkpoint_steps(tmp_path) == list(range(1, step))
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["step"] for entry in logged] == list(range(1, step))
    assert all(entry["loss"] > 0 and entry["grad_norm"] == entry["grad_norm"] for entry in logged)  # no filtered 0


def test_a_loss_that_is_nan_from_the_start_blames_the_data_or_weights_not_the_learning_rate(
    tiny_model_dir, char_tokenizer, dataset, tmp_path
):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))
    trainer = trainer_for(tiny_model_dir, char_tokenizer, dataset, tmp_path, model=model)
    with pytest.raises(SFTKeyError, match=r"diverged at step 1 of 8: the loss is NaN.*before any update"):
        trainer.train()


def test_a_nan_gradient_with_a_finite_loss_stops_too(tiny_model_dir, char_tokenizer, dataset, tmp_path):
    trainer = trainer_for(tiny_model_dir, char_tokenizer, dataset, tmp_path, max_grad_norm=0.0)
    trainer.model.model.embed_tokens.weight.register_hook(lambda grad: grad * float("nan"))
    with pytest.raises(SFTKeyError, match=r"diverged at step 1 of 8: the gradient norm is nan"):
        trainer.train()


def fake_trainer(skipped: bool):
    accelerator = SimpleNamespace(device=torch.device("cpu"), optimizer_step_was_skipped=skipped, num_processes=1,
                                  reduce=lambda tensor, reduction: tensor)  # fmt: skip
    return SimpleNamespace(accelerator=accelerator, callback_handler=SimpleNamespace(callbacks=[]),
                           _total_train_tokens=0)  # fmt: skip


@pytest.mark.parametrize("skipped", [True, False])
def test_an_infinite_gradient_norm_of_a_step_the_fp16_scaler_skipped_is_no_divergence(skipped):
    """fp16 loss scaling meets infinite gradients on purpose: the scaler skips that step and lowers its scale."""
    watch = StageWatch(fake_trainer(skipped), "sft")
    watch.add_loss(torch.tensor(2.5))
    watch.grad_norm = torch.tensor(float("inf"))
    args = SimpleNamespace(learning_rate=1e-3, max_grad_norm=1.0, fp16=True)
    state = TrainerState(max_steps=4, global_step=2)
    if skipped:
        watch.on_step_end(args, state, TrainerControl())
        assert state.stateful_callbacks[TOTALS_KEY]["loss_sum"] == 2.5
    else:
        with pytest.raises(SFTKeyError, match="gradient norm is inf.*fp16 overflows: use bf16"):
            watch.on_step_end(args, state, TrainerControl())


@pytest.mark.slow
def test_a_resumed_stage_reports_the_whole_stage(tiny_model_dir, char_tokenizer, dataset, tmp_path):
    """A copy of an uninterrupted run's checkpoint at step 3 is where a kill just after it leaves a stage; logged
    every 2 steps, its step 3 is in no logged loss yet (the part Trainer's own `train_loss` would lose)."""
    flags = dict(save_strategy="steps", save_steps=3, logging_steps=2)
    uninterrupted = trainer_for(tiny_model_dir, char_tokenizer, dataset, tmp_path / "whole", **flags)
    output = uninterrupted.train()
    expected = uninterrupted.stage_summary()
    assert expected["train_loss"] == pytest.approx(output.training_loss, rel=1e-6)  # Trainer's own, unresumed
    assert expected["optimizer_steps"] == 8 and expected["train_tokens"] > 0

    resumed_dir = tmp_path / "resumed"
    shutil.copytree(tmp_path / "whole" / "checkpoint-3", resumed_dir / "checkpoint-3")
    earlier = saved_totals(resumed_dir / "checkpoint-3")
    assert earlier.steps == 3 and 0 < earlier.train_tokens < expected["train_tokens"]
    resumed = trainer_for(tiny_model_dir, char_tokenizer, dataset, resumed_dir, **flags)
    output = resumed.train(resume_from_checkpoint=str(resumed_dir / "checkpoint-3"))
    summary = resumed.stage_summary()
    assert summary["train_loss"] == pytest.approx(expected["train_loss"], rel=1e-6)
    assert summary["train_loss"] != pytest.approx(output.training_loss, rel=1e-3)  # Trainer's: after step 3 only
    assert (summary["optimizer_steps"], summary["train_tokens"]) == (8, expected["train_tokens"])
    assert summary["train_seconds"] > earlier.train_seconds > 0
    tokens = [[entry["num_tokens"] for entry in t.state.log_history if "num_tokens" in entry][-1]
              for t in (uninterrupted, resumed)]  # fmt: skip
    assert tokens[0] == tokens[1]


@pytest.mark.slow
def test_a_checkpoint_from_before_the_totals_says_what_its_numbers_cover(
    tiny_model_dir, char_tokenizer, dataset, tmp_path
):
    trainer = trainer_for(tiny_model_dir, char_tokenizer, dataset, tmp_path / "whole", save_strategy="steps",
                          save_steps=3)  # fmt: skip
    trainer.train()
    checkpoint = tmp_path / "old" / "checkpoint-3"
    shutil.copytree(tmp_path / "whole" / "checkpoint-3", checkpoint)
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    del state["stateful_callbacks"][TOTALS_KEY]
    (checkpoint / "trainer_state.json").write_text(json.dumps(state))
    resumed = trainer_for(tiny_model_dir, char_tokenizer, dataset, tmp_path / "old", save_strategy="steps",
                          save_steps=3)  # fmt: skip
    output = resumed.train(resume_from_checkpoint=str(checkpoint))
    summary = resumed.stage_summary()
    assert summary["resumed_totals_from_step"] == 3 and summary["optimizer_steps"] == 8
    assert summary["train_loss"] == pytest.approx(output.training_loss, rel=1e-6)
