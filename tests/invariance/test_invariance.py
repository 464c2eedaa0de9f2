"""Invariance suite: configurations in one equivalence class train identically.

In the manner of TRL's `tests/invariant`: each case trains the real `SFTKeyTrainer` (real `trl.SFTTrainer`
underneath) for a few optimiser steps from the same weights, data and seed, and compares the logged loss and
grad-norm trajectories. Tolerances (float32 on CPU): relative 1e-5 on the loss and 1e-4 on the grad norm, where
the two configurations sum the same terms in another order (accumulation, padding-free); exact-to-1e-6 where they
compute the same tensors (weights that reduce to another stage). Also here: stage 1 against bare `trl.SFTTrainer`
on SmolLM2, `context: detached` against full context before any update (Llama and sliding-window Mistral), and a
stage killed and resumed against an uninterrupted one (full and LoRA); across processes: test_processes.py. The
docs/development.md ("What is held equal") lists every case with its tolerance. Select with `-m invariance`.

Pinned losses: the first steps' (loss, grad norm) of a completion and a key stage on the tiny model and of a SmolLM2
LoRA stage 1 are stored in `pinned_losses.json` and checked to relative 1e-4 (float32 CPU arithmetic differs
between machines and thread counts in the order of its sums, about 1e-6 per step here; a change of the loss itself
moves them by far more). Regenerate with
`SFTKEY_REPIN=1 python -m pytest -m invariance tests/invariance`; a commit that changes them must say why.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import script_args
from datasets import Dataset
from real_launches import kill_when, run_to_end

from sftkey_trl.data.adapters import Triple
from sftkey_trl.data.formatting import Formatter
from sftkey_trl.data.masks import tokenize_rendered
from sftkey_trl.recipe.schema import SFTKeyConfig
from sftkey_trl.train.objectives import Stage
from sftkey_trl.train.trainer import SFTKeyTrainer

pytestmark = pytest.mark.invariance

STEPS = 3
LOSS_RTOL, GRAD_RTOL = 1e-5, 1e-4
TRIPLES = [
    Triple(f"Start at {a}, add {b}.", f"{a} + {b} = {a + b}", str(a + b))
    for a, b in [(3, 4), (9, 12), (5, 8), (17, 2), (1, 1), (40, 13), (6, 7), (25, 25)]
] + [
    Triple(
        f"Start at {a}, add {b}, subtract {c}.", f"{a} + {b} = {a + b}\n{a + b} - {c} = {a + b - c}", str(a + b - c)
    )
    for a, b, c in [(9, 4, 2), (30, 1, 7), (5, 5, 5), (12, 8, 3)]
]


@pytest.fixture()
def tiny_dataset(char_tokenizer) -> Dataset:
    formatter = Formatter(char_tokenizer, script_args())
    return Dataset.from_dict(tokenize_rendered(char_tokenizer, [formatter.render(t) for t in TRIPLES]))


def train(model_dir, tokenizer, dataset, tmp_path, stage: Stage, **config) -> list[tuple[float, float]]:
    """Train `STEPS` optimiser steps (global batch 4) and return each step's (loss, grad_norm)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    settings = dict(per_device_train_batch_size=4, gradient_accumulation_steps=1) | config
    args = SFTKeyConfig(
        output_dir=str(tmp_path / "out"),
        use_cpu=True,
        report_to="none",
        gradient_checkpointing=False,
        max_length=None,
        max_steps=STEPS,
        logging_steps=1,
        learning_rate=1e-3,
        lr_scheduler_type="constant",
        save_strategy="no",
        seed=0,
        **settings,
    )
    trainer = SFTKeyTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, stage=stage)
    trainer.train()
    steps = [(entry["loss"], entry["grad_norm"]) for entry in trainer.state.log_history if "loss" in entry]
    assert len(steps) == STEPS
    return steps


PINNED = Path(__file__).with_name("pinned_losses.json")
PINNED_RTOL = 1e-4


def check_pinned(name: str, trajectory: list[tuple[float, float]]) -> None:
    """Compare a trajectory with its pinned copy (or store it, with `SFTKEY_REPIN=1`)."""
    pinned = json.loads(PINNED.read_text()) if PINNED.exists() else {}
    if os.environ.get("SFTKEY_REPIN") == "1":
        pinned[name] = [list(step) for step in trajectory]
        PINNED.write_text(json.dumps(pinned, indent=1, sort_keys=True) + "\n")
    assert name in pinned, f"no pinned losses for {name}: run with SFTKEY_REPIN=1 and commit saying why"
    torch.testing.assert_close(torch.tensor(trajectory), torch.tensor(pinned[name]), rtol=PINNED_RTOL, atol=0)


def assert_same_trajectory(actual, expected, loss_rtol=LOSS_RTOL, grad_rtol=GRAD_RTOL) -> None:
    losses, norms = torch.tensor(actual).T
    expected_losses, expected_norms = torch.tensor(expected).T
    torch.testing.assert_close(losses, expected_losses, rtol=loss_rtol, atol=0)
    torch.testing.assert_close(norms, expected_norms, rtol=grad_rtol, atol=0)
    assert not torch.allclose(losses[0], losses[-1]), "the model did not train: the comparison would be vacuous"


@pytest.mark.parametrize("stage", [Stage(name="sft"), Stage(name="key", loss_on="key")], ids=["completion", "key"])
def test_global_batch_fixed_accumulation_and_padding_free_equal(
    tiny_model_dir, char_tokenizer, tiny_dataset, tmp_path, stage
):
    """batch 4 x accumulation 1 == batch 2 x accumulation 2 == batch 1 x accumulation 4 == padding-free."""
    reference = train(tiny_model_dir, char_tokenizer, tiny_dataset, tmp_path, stage)
    check_pinned(f"tiny-{stage.loss_on}", reference)
    for batch, accumulation in [(2, 2), (1, 4)]:
        accumulated = train(
            tiny_model_dir,
            char_tokenizer,
            tiny_dataset,
            tmp_path,
            stage,
            per_device_train_batch_size=batch,
            gradient_accumulation_steps=accumulation,
        )
        assert_same_trajectory(accumulated, reference)
    padding_free = train(tiny_model_dir, char_tokenizer, tiny_dataset, tmp_path, stage, padding_free=True)
    assert_same_trajectory(padding_free, reference)


def test_weights_that_reduce_to_another_stage_train_like_it(tiny_model_dir, char_tokenizer, tiny_dataset, tmp_path):
    """`key_weight: 1` == plain completion; `reasoning_weight: 1` in a key stage == a completion stage."""
    plain = train(tiny_model_dir, char_tokenizer, tiny_dataset, tmp_path, Stage(name="sft"))
    unit_key = train(tiny_model_dir, char_tokenizer, tiny_dataset, tmp_path, Stage(name="sft", key_weight=1.0))
    assert_same_trajectory(unit_key, plain, 1e-6, 1e-6)
    full_reasoning = Stage(name="key", loss_on="key", reasoning_weight=1.0)
    assert_same_trajectory(
        train(tiny_model_dir, char_tokenizer, tiny_dataset, tmp_path, full_reasoning), plain, 1e-6, 1e-6
    )


# --- stage 1 against bare trl.SFTTrainer, on SmolLM2-135M-Instruct's tokenizer and chat template -----------------

SHORT = [Triple(f"{a}+{b}?", f"{a}+{b}={a + b}", str(a + b)) for a, b in [(1, 2), (3, 4), (5, 6), (7, 1)]]


def lora_smollm2(model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"
    )
    return get_peft_model(model, config)


def trl_config(tmp_path, config_class=None, **config):
    """The same training arguments for TRL's `SFTConfig` and this project's `SFTKeyConfig`."""
    from trl import SFTConfig

    return (config_class or SFTConfig)(
        output_dir=str(tmp_path / "trl"),
        use_cpu=True,
        report_to="none",
        gradient_checkpointing=False,
        max_length=None,
        max_steps=STEPS,
        logging_steps=1,
        learning_rate=1e-3,
        lr_scheduler_type="constant",
        save_strategy="no",
        seed=0,
        per_device_train_batch_size=2,
        bf16=False,  # TRL's SFTConfig turns on bf16 autocast by default, even on CPU
        **config,
    )


def logged(trainer) -> list[tuple[float, float]]:
    torch.manual_seed(0)  # the sampler draws from the global generator, which building the trainers advanced apart
    trainer.train()
    return [(entry["loss"], entry["grad_norm"]) for entry in trainer.state.log_history if "loss" in entry]


@pytest.mark.real_model
@pytest.mark.parametrize("loss_type", ["nll", "dft"])
def test_completion_stage_equals_trl_sft_trainer(smollm2_dir, smollm2_tokenizer, tmp_path, loss_type):
    """Stage 1 == `trl.SFTTrainer(completion_only_loss=True)` given this project's tokens and completion mask; TRL's
    own conversational prompt-completion rows differ in exactly one supervised token per row: the newline the
    SmolLM2 template writes after `<|im_end|>`, which TRL trains and this project does not."""
    from trl import SFTTrainer

    tokenizer = smollm2_tokenizer
    formatter = Formatter(tokenizer, script_args())
    ours = Dataset.from_dict(tokenize_rendered(tokenizer, [formatter.render(t) for t in SHORT]))
    rows = Dataset.from_list(
        [
            {
                "prompt": [{"role": "user", "content": t.question}],
                "completion": [{"role": "assistant", "content": formatter.response(t)[0]}],
            }
            for t in SHORT
        ]
    )
    trl_own = SFTTrainer(
        model=lora_smollm2(smollm2_dir),
        args=trl_config(tmp_path, loss_type=loss_type, completion_only_loss=True),
        train_dataset=rows,
        processing_class=tokenizer,
    )
    newline = tokenizer.convert_tokens_to_ids("Ċ")
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for theirs, mine in zip(trl_own.train_dataset, ours):
        assert theirs["input_ids"] == mine["input_ids"]  # the same rendered text and tokens
        supervised = [int(label != -100) for label in theirs["labels"]]  # TRL 1.16 turns its mask into labels
        difference = [i for i, (a, b) in enumerate(zip(supervised, mine["completion_mask"])) if a != b]
        assert difference == [len(mine["input_ids"]) - 1], "TRL and this project differ in more than the last token"
        assert mine["input_ids"][-2:] == [end_of_turn, newline] and mine["completion_mask"][-2:] == [1, 0]

    stage = Stage(name="sft")
    args = trl_config(tmp_path / "ours", SFTKeyConfig, loss_type=loss_type)
    project = logged(
        SFTKeyTrainer(
            model=lora_smollm2(smollm2_dir), args=args, train_dataset=ours, processing_class=tokenizer, stage=stage
        )
    )
    given_our_masks = logged(
        SFTTrainer(
            model=lora_smollm2(smollm2_dir),
            args=trl_config(tmp_path, loss_type=loss_type, completion_only_loss=True),
            train_dataset=ours.remove_columns("key_mask"),
            processing_class=tokenizer,
        )
    )
    check_pinned(f"smollm2-lora-completion-{loss_type}", project)
    assert_same_trajectory(project, given_our_masks, 1e-5, 1e-4)
    trl_labels = logged(trl_own)
    assert not torch.allclose(torch.tensor(trl_labels)[0, 0], torch.tensor(project)[0, 0], rtol=1e-4, atol=0)


# --- detached context before any update, on a Llama and on a sliding-window Mistral --------------------------------


@pytest.mark.parametrize("model", ["llama", "mistral"])
def test_detached_context_equals_full_context_before_any_update(
    tiny_model_dir, char_tokenizer, tiny_dataset, tmp_path, request, model
):
    """The first step's loss (computed before the first update) of `context: detached` equals the ordinary key
    stage's on batched rows of different prefix lengths, also where the sliding window is shorter than every prefix;
    afterwards they train differently (no gradient through the prefix), so only that step is in this class."""
    model_dir = tiny_model_dir if model == "llama" else request.getfixturevalue("mistral_dir")
    full = train(model_dir, char_tokenizer, tiny_dataset, tmp_path, Stage(name="key", loss_on="key"))
    detached = train(model_dir, char_tokenizer, tiny_dataset, tmp_path, Stage(name="key", loss_on="key",
                                                                              context="detached"))  # fmt: skip
    assert detached[0][0] == pytest.approx(full[0][0], rel=LOSS_RTOL)
    assert detached[0][1] != pytest.approx(full[0][1], rel=1e-3)  # the gradients differ: the test can tell them apart


# --- a stage killed and resumed, LoRA and full fine-tuning --------------------------------------------------------

KILLED_STAGE = ["--max_train_samples", "64", "--per_device_train_batch_size", "8", "--logging_steps", "1",
                "--save_strategy", "steps", "--save_steps", "3", "--eval_after_stages", "false",
                "--stages", "[{name: sft, loss_on: completion, num_train_epochs: 1}]"]  # fmt: skip


def first_checkpoint(out: Path) -> bool:
    return bool(list((out / "sft" / "checkpoints").glob("checkpoint-*/trainer_state.json")))


@pytest.mark.e2e
@pytest.mark.parametrize("method", ["full", "lora"])
def test_a_stage_killed_and_resumed_trains_like_an_uninterrupted_one(tmp_path, method):
    """Every step's loss and grad norm, and the saved weights, equal the uninterrupted run's (relative 1e-6: the
    resumed run replays the same data order, RNG state and optimizer state from the checkpoint)."""
    from safetensors.torch import load_file

    flags = KILLED_STAGE + (["--use_peft", "true", "--lora_dropout", "0"] if method == "lora" else [])
    weights = "adapter_model.safetensors" if method == "lora" else "model.safetensors"
    uninterrupted, killed = tmp_path / "uninterrupted", tmp_path / "killed"
    run_to_end(uninterrupted, flags)
    kill_when(killed, first_checkpoint, flags)
    assert not (killed / "sft" / weights).exists()
    checkpoint = next((killed / "sft" / "checkpoints").glob("checkpoint-*/trainer_state.json"))
    before_kill = json.loads(checkpoint.read_text()).get("stateful_callbacks", {}).get("SFTKeyStageTotals", {})
    run_to_end(killed, flags)
    # The whole stage is reported, not the part after the resume
    whole, resumed = (json.loads((out / "results.json").read_text())["stages"]["sft"]["training"]
                      for out in (uninterrupted, killed))  # fmt: skip
    assert resumed["train_loss"] == pytest.approx(whole["train_loss"], rel=1e-6)
    assert (resumed["train_tokens"], resumed["optimizer_steps"]) == (whole["train_tokens"], whole["optimizer_steps"])
    assert resumed["train_seconds"] > before_kill["train_seconds"] > 0

    def trajectory(out: Path) -> list[tuple[int, float, float]]:
        history = json.loads((out / "sft" / "log_history.json").read_text())
        return [(e["step"], e["loss"], e["grad_norm"]) for e in history if "loss" in e]

    expected, resumed = trajectory(uninterrupted), trajectory(killed)
    assert [step for step, *_ in resumed] == [step for step, *_ in expected] == list(range(1, 9))
    torch.testing.assert_close(torch.tensor(resumed), torch.tensor(expected), rtol=1e-6, atol=0)
    assert json.loads((killed / "results.json").read_text())["stages"]["sft"]["training"]["resumed_from"]
    saved, reference = load_file(killed / "sft" / weights), load_file(uninterrupted / "sft" / weights)
    assert saved.keys() == reference.keys()
    for name, tensor in reference.items():
        torch.testing.assert_close(saved[name], tensor, rtol=1e-6, atol=1e-7)
