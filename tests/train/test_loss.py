"""The stage losses: fused-head loss equals a reference computed from full logits, padded equals padding-free,
the key stage learns only through key tokens, the normalisation/weight options give the documented weights, and
`loss_type: dft` rescales each token's nll by its own detached probability in any stage."""

from __future__ import annotations

import pytest
import torch
from conftest import script_args
from datasets import Dataset

from sftkey_trl.data.adapters import Triple
from sftkey_trl.data.formatting import Formatter
from sftkey_trl.data.masks import tokenize_rendered
from sftkey_trl.recipe.schema import SFTKeyConfig
from sftkey_trl.train.collator import SFTKeyCollator
from sftkey_trl.train.objectives import Stage
from sftkey_trl.train.trainer import SFTKeyTrainer

TRIPLES = [
    Triple("Start at 3, add 4.", "3 + 4 = 7", "7"),
    Triple("Start at 9, add 4, subtract 2.", "9 + 4 = 13\n13 - 2 = 11", "11"),
    Triple("Start at 5, subtract 5, add 8, add 9.", "5 - 5 = 0\n0 + 8 = 8\n8 + 9 = 17", "17"),
]


@pytest.fixture()
def examples(char_tokenizer):
    formatter = Formatter(char_tokenizer, script_args())
    columns = tokenize_rendered(char_tokenizer, [formatter.render(t) for t in TRIPLES])
    return [dict(zip(columns, values)) for values in zip(*columns.values())]


def key_stage(normalisation: str) -> Stage:
    return Stage(name="key", loss_on="key", loss_normalization=normalisation)


def make_trainer(tiny_model_dir, tokenizer, tmp_path, stage, **config):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    args = SFTKeyConfig(
        output_dir=str(tmp_path),
        use_cpu=True,
        report_to="none",
        gradient_checkpointing=False,
        max_length=None,
        **config,
    )
    dataset = Dataset.from_dict({"input_ids": [[1, 2, 3]], "completion_mask": [[0, 1, 1]], "key_mask": [[0, 0, 1]]})
    return SFTKeyTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, stage=stage)


def reference_loss(model, batch, weights, normaliser, loss_type="nll"):
    """Cross-entropy from the model's full logits (the slow path the fused head avoids), weighted per token; with
    `dft`, each token's nll times its own probability, detached (arXiv 2508.05629)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    nll = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.size(-1)), batch["input_ids"][:, 1:].reshape(-1), reduction="none"
    ).view(logits.shape[:2])
    if loss_type == "dft":
        probability = torch.softmax(logits, -1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
        nll = nll * probability.detach()
    return (nll * weights[:, 1:]).sum() / normaliser


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("loss_on", ["completion", "key"])
def test_fused_loss_matches_full_logits_and_learns_only_from_supervised_tokens(
    tiny_model_dir, char_tokenizer, tmp_path, examples, loss_on
):
    stage = Stage(name="s", loss_on=loss_on)
    trainer = make_trainer(tiny_model_dir, char_tokenizer, tmp_path, stage)
    collator = trainer.data_collator
    batch = collator(examples)
    mask = batch[f"{loss_on}_mask"]
    model = trainer.model
    loss = trainer.compute_loss(model, dict(batch))
    loss.backward()
    fused_grads = grads(model)
    model.zero_grad()
    ref = reference_loss(model, batch, mask.float(), mask[:, 1:].sum())
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    for name, grad in grads(model).items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    if loss_on == "key":  # the key loss ignores everything the reasoning tokens are trained to predict
        assert (batch["key_mask"].sum() < batch["completion_mask"].sum()) and loss.item() > 0


def test_padded_and_padding_free_give_the_same_loss(tiny_model_dir, char_tokenizer, tmp_path, examples):
    trainer = make_trainer(tiny_model_dir, char_tokenizer, tmp_path, Stage(name="s", loss_on="completion"))
    padded = SFTKeyCollator(char_tokenizer.pad_token_id, Stage(name="s"), pad_to_multiple_of=8)(examples)
    flat = SFTKeyCollator(char_tokenizer.pad_token_id, Stage(name="s"), padding_free=True)(examples)
    assert padded["input_ids"].shape[1] % 8 == 0 and flat["input_ids"].shape[0] == 1
    assert "attention_mask" not in flat and flat["position_ids"][0, 0] == 0
    loss_padded = trainer.compute_loss(trainer.model, dict(padded))
    loss_flat = trainer.compute_loss(trainer.model, dict(flat))
    torch.testing.assert_close(loss_padded, loss_flat, rtol=1e-5, atol=1e-6)


def test_normalisations_give_documented_weights(tiny_model_dir, char_tokenizer, tmp_path, examples):
    """supervised_tokens divides by the key tokens, completion_tokens by the response tokens."""
    losses = {}
    for normalisation in ("supervised_tokens", "completion_tokens"):
        stage = Stage(name="key", loss_on="key", loss_normalization=normalisation)
        trainer = make_trainer(tiny_model_dir, char_tokenizer, tmp_path, stage)
        batch = trainer.data_collator(examples)
        losses[normalisation] = trainer.compute_loss(trainer.model, dict(batch)).item()
        assert trainer._normaliser_mask(batch).sum() == (
            batch["key_mask"][:, 1:].sum()
            if normalisation == "supervised_tokens"
            else batch["completion_mask"][:, 1:].sum()
        )
    ratio = batch["key_mask"][:, 1:].sum().item() / batch["completion_mask"][:, 1:].sum().item()
    assert losses["completion_tokens"] == pytest.approx(losses["supervised_tokens"] * ratio, rel=1e-5)


def test_collator_weights_on_hand_built_batch():
    example = {"input_ids": [5, 6, 7, 8, 9, 10], "completion_mask": [0, 0, 1, 1, 1, 1], "key_mask": [0, 0, 0, 0, 1, 1]}
    key = SFTKeyCollator(0, Stage(name="k", loss_on="key", reasoning_weight=0.25), score_completion=False)([example])
    assert key["loss_weights"].tolist() == [[0, 0, 0.25, 0.25, 1, 1]]
    assert key["labels"].tolist() == [[-100, -100, 7, 8, 9, 10]]
    only_key = SFTKeyCollator(0, Stage(name="k", loss_on="key"), score_completion=False)([example])
    assert only_key["labels"].tolist() == [[-100, -100, -100, -100, 9, 10]]
    completion = SFTKeyCollator(0, Stage(name="c", loss_on="completion"))([example])
    assert completion["loss_weights"].tolist() == [[0, 0, 1, 1, 1, 1]]


def test_key_weight_emphasises_the_answer_over_the_response_tokens(tiny_model_dir, char_tokenizer, tmp_path, examples):
    """key_weight w: reasoning tokens weigh 1, key tokens w, divided by the number of response tokens; w = 1 is
    plain completion SFT."""
    example = {"input_ids": [5, 6, 7, 8, 9, 10], "completion_mask": [0, 0, 1, 1, 1, 1], "key_mask": [0, 0, 0, 0, 1, 1]}
    batch = SFTKeyCollator(0, Stage(name="c", loss_on="completion", key_weight=4))([example])
    assert batch["loss_weights"].tolist() == [[0, 0, 1, 1, 4, 4]]
    trainers = {
        w: make_trainer(tiny_model_dir, char_tokenizer, tmp_path, Stage(name="c", key_weight=w)) for w in (1, 4)
    }
    batches = {w: trainer.data_collator(examples) for w, trainer in trainers.items()}
    losses = {w: trainer.compute_loss(trainer.model, dict(batches[w])) for w, trainer in trainers.items()}
    plain = make_trainer(tiny_model_dir, char_tokenizer, tmp_path, Stage(name="plain"))
    torch.testing.assert_close(losses[1], plain.compute_loss(plain.model, dict(plain.data_collator(examples))))
    key = make_trainer(tiny_model_dir, char_tokenizer, tmp_path, Stage(name="k", loss_on="key"))
    key_loss = key.compute_loss(key.model, dict(key.data_collator(examples)))  # mean over key tokens
    counts = {name: batches[1][name][:, 1:].sum() for name in ("key_mask", "completion_mask")}
    expected = losses[1] + 3 * key_loss * counts["key_mask"] / counts["completion_mask"]
    torch.testing.assert_close(losses[4], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("weight, same_as", [(0.0, "key"), (1.0, "completion")])
def test_reasoning_weight_endpoints_reproduce_the_stages(
    tiny_model_dir, char_tokenizer, tmp_path, examples, weight, same_as
):
    mixed = make_trainer(
        tiny_model_dir, char_tokenizer, tmp_path, Stage(name="mix", loss_on="key", reasoning_weight=weight)
    )
    plain = make_trainer(tiny_model_dir, char_tokenizer, tmp_path, Stage(name="plain", loss_on=same_as))
    loss_mixed = mixed.compute_loss(mixed.model, dict(mixed.data_collator(examples)))
    loss_plain = plain.compute_loss(plain.model, dict(plain.data_collator(examples)))
    torch.testing.assert_close(loss_mixed, loss_plain)


def test_part_losses_are_logged(tiny_model_dir, char_tokenizer, tmp_path, examples):
    trainer = make_trainer(tiny_model_dir, char_tokenizer, tmp_path, Stage(name="key", loss_on="key"))
    trainer.model.train()
    trainer.compute_loss(trainer.model, dict(trainer.data_collator(examples)))
    metrics = trainer._metrics["train"]
    assert metrics["reasoning_loss"][0] > 0 and metrics["key_loss"][0] > 0


@pytest.mark.parametrize("normalisation", ["supervised_tokens", "completion_tokens"])
def test_gradient_accumulation_normaliser_counts_the_stage_tokens(
    tiny_model_dir, char_tokenizer, tmp_path, examples, normalisation
):
    """Trainer's `num_items_in_batch` (summed over accumulated micro-batches) counts the stage's normaliser."""
    trainer = make_trainer(
        tiny_model_dir, char_tokenizer, tmp_path, Stage(name="key", loss_on="key", loss_normalization=normalisation)
    )
    batches = [trainer.data_collator(examples[:2]), trainer.data_collator(examples[2:])]
    column = "key_mask" if normalisation == "supervised_tokens" else "completion_mask"
    expected = sum(int(b[column][:, 1:].sum()) for b in batches)
    assert int(trainer._get_num_items_in_batch(batches, torch.device("cpu"))) == expected
    # and the loss over the two micro-batches, each divided by that total, is the mean over all of them
    trainer.model.train()
    total = sum(trainer.compute_loss(trainer.model, dict(b), num_items_in_batch=expected) for b in batches)
    whole = trainer.compute_loss(trainer.model, dict(trainer.data_collator(examples)))
    torch.testing.assert_close(total, whole, rtol=1e-5, atol=1e-6)


# A hand-built batch: explicit token ids and masks (prompt, reasoning, key), two lengths so that padding is exercised
HAND_BUILT = [
    {"input_ids": [5, 6, 7, 8, 9, 10, 11, 12, 13], "completion_mask": [0, 0, 0, 1, 1, 1, 1, 1, 1],
     "key_mask": [0, 0, 0, 0, 0, 0, 1, 1, 1]},
    {"input_ids": [20, 21, 22, 23, 24, 25], "completion_mask": [0, 0, 1, 1, 1, 1], "key_mask": [0, 0, 0, 0, 1, 1]},
]  # fmt: skip


@pytest.mark.parametrize(
    "stage",
    [Stage(name="sft", loss_on="completion"), Stage(name="key", loss_on="key", reasoning_weight=0.25)],
    ids=["completion", "key_with_reasoning_weight"],
)
def test_dft_loss_equals_the_reference_formula(tiny_model_dir, char_tokenizer, tmp_path, stage):
    trainer = make_trainer(tiny_model_dir, char_tokenizer, tmp_path, stage, loss_type="dft")
    batch = trainer.data_collator(HAND_BUILT)
    weights, normaliser = batch["loss_weights"], trainer._normaliser_mask(batch).sum()
    model = trainer.model
    loss = trainer.compute_loss(model, dict(batch))
    loss.backward()
    fused_grads = grads(model)
    model.zero_grad()
    ref = reference_loss(model, batch, weights, normaliser, "dft")
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    for name, grad in grads(model).items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-4, atol=1e-7, msg=name)
    assert all(torch.isfinite(grad).all() for grad in fused_grads.values())
    with torch.no_grad():  # DFT is not the nll: p < 1 scales every token down
        assert loss < reference_loss(model, batch, weights, normaliser, "nll")


def test_dft_in_a_key_stage_only_touches_key_tokens(tiny_model_dir, char_tokenizer, tmp_path):
    trainer = make_trainer(tiny_model_dir, char_tokenizer, tmp_path, Stage(name="key", loss_on="key"), loss_type="dft")
    batch = trainer.data_collator(HAND_BUILT)
    key = batch["key_mask"]
    assert (batch["loss_weights"] > 0).equal(key) and key.sum() < batch["completion_mask"].sum()
    model = trainer.model
    loss = trainer.compute_loss(model, dict(batch))
    loss.backward()
    fused_grads = grads(model)
    model.zero_grad()
    ref = reference_loss(model, batch, key.float(), key[:, 1:].sum(), "dft")  # key tokens only
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    for name, grad in grads(model).items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-4, atol=1e-7, msg=name)
        assert torch.isfinite(fused_grads[name]).all(), name
    # reasoning tokens are scored (for the logged reasoning loss) but carry no weight
    completion_only = reference_loss(model, batch, batch["completion_mask"].float(), key[:, 1:].sum(), "dft")
    assert not torch.isclose(loss, completion_only)
    assert trainer._metrics["eval"]["reasoning_loss"] and trainer._metrics["eval"]["key_loss"]


def test_loss_type_can_be_set_per_stage(tmp_path):
    from sftkey_trl.recipe.parsing import parse_config
    from sftkey_trl.train.steps import stage_training_args

    stages = "[{name: sft, loss_on: completion}, {name: key, loss_on: key, loss_type: dft}]"
    recipe = parse_config(["--output_dir", str(tmp_path), "--stages", stages])
    training_args = recipe.training
    resolved = [stage_training_args(training_args, s, str(tmp_path / s.name)).loss_type for s in recipe.stages]
    assert training_args.loss_type == "nll" and resolved == ["nll", "dft"]
