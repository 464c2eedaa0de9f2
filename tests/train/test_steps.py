"""Batch arithmetic against `transformers.Trainer`: steps per epoch rounded up as Trainer rounds them, and keep_best's
evaluation interval (`eval_steps`, a fraction of the stage read as Trainer reads it, or twice an epoch)."""

from __future__ import annotations

import pytest
import torch
from transformers import Trainer
from trl import SFTConfig

from sftkey_trl.train.steps import keep_best_interval, optimizer_steps, steps_per_epoch


def args(tmp_path, **values) -> SFTConfig:
    values = {"per_device_train_batch_size": 16, "num_train_epochs": 1, "use_cpu": True, "bf16": False,
              "report_to": "none", "save_strategy": "no", "logging_strategy": "no", "activation_checkpointing": False,
              **values}  # fmt: skip
    return SFTConfig(output_dir=str(tmp_path / "out"), **values)


class Regression(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x, labels=None):
        return {"loss": ((self.weight * x - labels) ** 2).mean()}


def trainer_steps(training_args: SFTConfig, rows: int) -> int:
    """Optimizer steps a real `transformers.Trainer` takes over `rows` rows."""
    data = [{"x": torch.tensor([float(i)]), "labels": torch.tensor([1.0])} for i in range(rows)]
    trainer = Trainer(model=Regression(), args=training_args, train_dataset=data)
    trainer.train()
    return trainer.state.global_step


@pytest.mark.parametrize("rows, batch, accumulation", [(60, 16, 1), (100, 8, 3), (64, 16, 1)])
def test_steps_per_epoch_are_trainers(tmp_path, rows, batch, accumulation):
    training = args(tmp_path, per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation)
    assert steps_per_epoch(training, rows) == optimizer_steps(training, rows) == trainer_steps(training, rows)


def test_twice_an_epoch_halves_trainers_steps_per_epoch(tmp_path):
    # 60 rows in batches of 16: Trainer takes 4 steps an epoch (the last batch is short), so twice an epoch is every
    # 2 steps; flooring 60 // 16 = 3 steps per epoch gave an evaluation after every step
    assert keep_best_interval(args(tmp_path), 60) == 2
    assert keep_best_interval(args(tmp_path, per_device_train_batch_size=8), 100, processes=2) == 3  # 7 steps


def test_fractional_eval_steps_is_a_fraction_of_the_stage_as_trainer_reads_it(tmp_path):
    training = args(tmp_path, num_train_epochs=2, eval_steps=0.25)  # 2 x 4 = 8 steps
    assert keep_best_interval(training, 60) == 2
    assert keep_best_interval(args(tmp_path, eval_steps=0.3), 60) == 2  # ceil(4 x 0.3), as TrainerState rounds
    assert keep_best_interval(args(tmp_path, eval_steps=5), 60) == 5
    assert keep_best_interval(args(tmp_path, max_steps=20, eval_steps=0.1), 60) == 2
