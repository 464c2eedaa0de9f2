"""Mixture-of-Experts: the router's load-balancing loss is added to the stage loss exactly as TRL adds it, with the
model's coefficient (or `router_aux_loss_coef`) and the same scaling under gradient accumulation."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset

from sftkey_trl.errors import SFTKeyError
from sftkey_trl.recipe.schema import SFTKeyConfig
from sftkey_trl.train.objectives import Stage
from sftkey_trl.train.trainer import SFTKeyTrainer

COEF = 0.05
BATCH = [
    {"input_ids": [5, 6, 7, 8, 9, 10, 11, 12, 13], "completion_mask": [0, 0, 0, 1, 1, 1, 1, 1, 1],
     "key_mask": [0, 0, 0, 0, 0, 0, 1, 1, 1]},
    {"input_ids": [20, 21, 22, 23, 24, 25], "completion_mask": [0, 0, 1, 1, 1, 1], "key_mask": [0, 0, 0, 0, 1, 1]},
]  # fmt: skip


def tiny_moe(tokenizer):
    """A randomly initialised two-layer Mixtral (4 experts, top-2) that returns its router logits."""
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=64,
        output_router_logits=True,
        router_aux_loss_coef=COEF,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    return MixtralForCausalLM(config).float()


def make_trainer(model, tokenizer, tmp_path, stage: Stage, **config) -> SFTKeyTrainer:
    args = SFTKeyConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", gradient_checkpointing=False,
                        max_length=None, **config)  # fmt: skip
    dataset = Dataset.from_dict({"input_ids": [[1, 2, 3]], "completion_mask": [[0, 1, 1]], "key_mask": [[0, 0, 1]]})
    return SFTKeyTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, stage=stage)


def reference(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(weighted nll summed over the batch, router aux loss), both from the model's own forward with full logits."""
    outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_router_logits=True)
    logits = outputs.logits[:, :-1]
    nll = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.size(-1)), batch["input_ids"][:, 1:].reshape(-1), reduction="none"
    ).view(logits.shape[:2])
    return (nll * batch["loss_weights"][:, 1:]).sum(), outputs.aux_loss


@pytest.mark.parametrize("loss_on", ["completion", "key"])
def test_router_aux_loss_is_added_with_the_models_coefficient(char_tokenizer, tmp_path, loss_on):
    trainer = make_trainer(tiny_moe(char_tokenizer), char_tokenizer, tmp_path, Stage(name="s", loss_on=loss_on))
    assert trainer.aux_loss_enabled and trainer.router_aux_loss_coef == COEF
    batch = trainer.data_collator(BATCH)
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, dict(batch))
    nll_sum, aux = reference(trainer.model, batch)
    assert aux.item() > 0
    expected = nll_sum / trainer._normaliser_mask(batch).sum() + COEF * aux
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(trainer._metrics["train"]["aux_loss"][0], aux.item(), rtol=1e-5, atol=1e-6)
    loss.backward()
    router = [p.grad for n, p in trainer.model.named_parameters() if "gate" in n and "proj" not in n]
    assert router and all(g is not None and torch.isfinite(g).all() for g in router)


def test_router_aux_loss_is_averaged_over_accumulated_micro_batches(char_tokenizer, tmp_path):
    """With `num_items_in_batch`, Trainer leaves accumulation to the loss: aux / steps, as TRL does."""
    trainer = make_trainer(
        tiny_moe(char_tokenizer), char_tokenizer, tmp_path, Stage(name="key", loss_on="key"), router_aux_loss_coef=0.2
    )
    assert trainer.router_aux_loss_coef == 0.2
    batch = trainer.data_collator(BATCH)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 4
    loss = trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=torch.tensor(40))
    nll_sum, aux = reference(trainer.model, batch)
    torch.testing.assert_close(loss, nll_sum / 40 + 0.2 * aux / 4, rtol=1e-5, atol=1e-6)


def test_router_aux_loss_coef_zero_turns_it_off(char_tokenizer, tmp_path):
    trainer = make_trainer(
        tiny_moe(char_tokenizer), char_tokenizer, tmp_path, Stage(name="s"), router_aux_loss_coef=0.0
    )
    assert not trainer.aux_loss_enabled
    batch = trainer.data_collator(BATCH)
    loss = trainer.compute_loss(trainer.model, dict(batch))
    nll_sum, _ = reference(trainer.model, batch)
    torch.testing.assert_close(loss, nll_sum / trainer._normaliser_mask(batch).sum(), rtol=1e-5, atol=1e-6)


def test_router_aux_loss_coef_on_a_dense_model_is_a_one_line_error(tiny_model_dir, char_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with pytest.raises(SFTKeyError, match=r"`router_aux_loss_coef: 0.1`.*has no router; remove"):
        make_trainer(model, char_tokenizer, tmp_path, Stage(name="s"), router_aux_loss_coef=0.1)
