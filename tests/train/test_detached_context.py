"""`context: detached`: the key stage with the reasoning as fixed context. Its loss is the ordinary key-stage loss;
its gradient is the ordinary one with the prefix's keys and values detached (checked against a full-sequence
reference that detaches them with hooks, not through a cache), on a Llama and on a sliding-window Mistral whose
window is shorter than the prefixes; rows of different prefix lengths batch correctly; gradient checkpointing keeps
the cache; gradient accumulation normalises as elsewhere."""

from __future__ import annotations

import pytest
import torch
from conftest import SLIDING_WINDOW, script_args
from datasets import Dataset
from test_loss import TRIPLES, grads

from sftkey_trl.data.formatting import Formatter
from sftkey_trl.data.masks import tokenize_rendered
from sftkey_trl.recipe.schema import SFTKeyConfig
from sftkey_trl.run import cli
from sftkey_trl.train.detached import split_at_key
from sftkey_trl.train.objectives import Stage
from sftkey_trl.train.trainer import SFTKeyTrainer

DETACHED = Stage(name="key", loss_on="key", context="detached")
FULL = Stage(name="key", loss_on="key")


@pytest.fixture(params=["llama", "mistral"])
def model_dir(request, tiny_model_dir):
    """The tiny Llama, or the tiny sliding-window Mistral."""
    return tiny_model_dir if request.param == "llama" else request.getfixturevalue("mistral_dir")


@pytest.fixture()
def examples(char_tokenizer):
    formatter = Formatter(char_tokenizer, script_args())
    columns = tokenize_rendered(char_tokenizer, [formatter.render(t) for t in TRIPLES])
    return [dict(zip(columns, values)) for values in zip(*columns.values())]


def trainer_for(tiny_model_dir, char_tokenizer, tmp_path, stage, lora=False, **config) -> SFTKeyTrainer:
    """A trainer on the tiny Llama (float32, seeded: every call builds the same weights), optionally with LoRA."""
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    args = SFTKeyConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", gradient_checkpointing=False,
                        max_length=None, **config)  # fmt: skip
    # init_lora_weights=False: both LoRA matrices random, so every adapter weight gets a gradient
    peft = LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False, lora_dropout=0) if lora else None
    dataset = Dataset.from_dict({"input_ids": [[1, 2, 3]], "completion_mask": [[0, 1, 1]], "key_mask": [[0, 0, 1]]})
    return SFTKeyTrainer(model=model, args=args, train_dataset=dataset, processing_class=char_tokenizer, stage=stage,
                         peft_config=peft)  # fmt: skip


def prefix_detached_reference(model, batch) -> torch.Tensor:
    """The mean key-token loss from the full sequence's logits, with the key and value projections of every
    position before the one that predicts a row's first key token detached (forward hooks; no cache)."""
    key_mask = batch["key_mask"].bool()
    prefix = torch.zeros_like(key_mask)
    for row, mask in enumerate(key_mask.tolist()):
        prefix[row, : mask.index(True) - 1] = True

    def detach_prefix(module, args, output):
        return torch.where(prefix[..., None], output.detach(), output)

    hooks = [
        module.register_forward_hook(detach_prefix)
        for name, module in model.named_modules()
        if name.endswith(("self_attn.k_proj", "self_attn.v_proj"))
    ]
    assert len(hooks) == 2 * model.config.num_hidden_layers
    try:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    finally:
        for hook in hooks:
            hook.remove()
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), batch["input_ids"][:, 1:], reduction="none")
    targets = key_mask[:, 1:]
    return (nll * targets).sum() / targets.sum()


@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_loss_is_the_key_loss_and_gradient_is_the_prefix_detached_one(
    model_dir, char_tokenizer, tmp_path, examples, lora
):
    detached = trainer_for(model_dir, char_tokenizer, tmp_path, DETACHED, lora)
    ordinary = trainer_for(model_dir, char_tokenizer, tmp_path, FULL, lora)
    batch = detached.data_collator(examples)

    loss = detached.compute_loss(detached.model, dict(batch))
    loss.backward()
    ordinary_loss = ordinary.compute_loss(ordinary.model, dict(batch))
    ordinary_loss.backward()
    torch.testing.assert_close(loss, ordinary_loss, rtol=1e-5, atol=1e-6)  # same forward values

    ordinary_grads = grads(ordinary.model)
    ordinary.model.zero_grad()
    reference = prefix_detached_reference(ordinary.model, batch)
    reference.backward()
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-6)
    detached_grads, reference_grads = grads(detached.model), grads(ordinary.model)
    assert detached_grads.keys() == reference_grads.keys() and detached_grads
    for name, grad in reference_grads.items():
        torch.testing.assert_close(detached_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    # and the detachment matters: through the reasoning, the ordinary gradient is a different one
    assert any(not torch.allclose(ordinary_grads[n], g, rtol=1e-3, atol=1e-5) for n, g in reference_grads.items())


def test_rows_of_different_prefix_lengths_batch_like_each_row_alone(model_dir, char_tokenizer, tmp_path, examples):
    trainer = trainer_for(model_dir, char_tokenizer, tmp_path, DETACHED, pad_to_multiple_of=16)
    ordinary = trainer_for(model_dir, char_tokenizer, tmp_path, FULL)
    batch = trainer.data_collator(examples)
    split = split_at_key(batch["input_ids"], batch["attention_mask"], batch["loss_weights"])
    prefix_lengths = split.prefix_mask.sum(1).tolist()
    assert len(set(prefix_lengths)) == len(examples) and len(set(split.key_mask.sum(1).tolist())) > 1
    assert min(prefix_lengths) > SLIDING_WINDOW and max(prefix_lengths) - min(prefix_lengths) > SLIDING_WINDOW
    with torch.no_grad():
        _, outputs = trainer.compute_loss(trainer.model, dict(batch), return_outputs=True)
        batched = (-outputs.log_probs).sum(1)
        for row, example in enumerate(examples):
            alone = trainer.data_collator([example])
            _, outputs = trainer.compute_loss(trainer.model, dict(alone), return_outputs=True)
            _, full = ordinary.compute_loss(ordinary.model, dict(alone), return_outputs=True)
            torch.testing.assert_close(batched[row], (-outputs.log_probs).sum(), rtol=1e-5, atol=1e-5)
            key_nll = (-full.log_probs * alone["key_mask"][:, 1:]).sum()  # the ordinary pass's key tokens
            torch.testing.assert_close(batched[row], key_nll, rtol=1e-5, atol=1e-5)


def test_split_at_key_layout():
    """Right-padded rows with prefixes of 3 and 1 tokens: prefixes right-aligned (each ends at the last prefix slot,
    so slot distances are position distances), spans left-aligned, true positions, padded slots masked."""
    input_ids = torch.tensor([[10, 11, 12, 13, 14, 15, 0], [20, 21, 22, 23, 0, 0, 0]])
    attention = (input_ids != 0).long()
    weights = torch.tensor([[0, 0, 0, 0, 1, 1, 0], [0, 0, 1, 1, 0, 0, 0]], dtype=torch.float)
    split = split_at_key(input_ids, attention, weights)
    assert split.prefix_mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert split.prefix_ids[:, -1].tolist() == [12, 20] and split.prefix_ids[0].tolist() == [10, 11, 12]
    assert split.prefix_positions[split.prefix_mask.bool()].tolist() == [0, 1, 2, 0]
    assert split.key_ids[:, :3].tolist() == [[13, 14, 15], [21, 22, 23]] and split.key_mask.tolist() == [[1, 1, 1]] * 2
    assert split.key_positions.tolist() == [[3, 4, 5], [1, 2, 3]]
    assert split.labels.tolist() == [[-100, 14, 15], [-100, 22, 23]]


def test_gradient_checkpointing_keeps_the_cache(tiny_model_dir, char_tokenizer, tmp_path, examples):
    """Checkpointed layers drop a cache in training; the detached stage turns checkpointing off around its passes."""
    results = []
    for checkpointing in (False, True):
        trainer = trainer_for(tiny_model_dir, char_tokenizer, tmp_path, DETACHED)
        if checkpointing:
            trainer.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        trainer.model.train()
        loss = trainer.compute_loss(trainer.model, dict(trainer.data_collator(examples)))
        loss.backward()
        results.append((loss.detach(), grads(trainer.model)))
        layers = [m for m in trainer.model.modules() if hasattr(m, "gradient_checkpointing")]
        assert all(m.gradient_checkpointing == checkpointing for m in layers)  # restored afterwards
    torch.testing.assert_close(results[0][0], results[1][0])
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_gradient_accumulation_normalises_across_micro_batches(tiny_model_dir, char_tokenizer, tmp_path, examples):
    trainer = trainer_for(tiny_model_dir, char_tokenizer, tmp_path, DETACHED)
    batches = [trainer.data_collator(examples[:2]), trainer.data_collator(examples[2:])]
    total_items = trainer._get_num_items_in_batch(batches, torch.device("cpu"))
    assert int(total_items) == sum(int(b["key_mask"][:, 1:].sum()) for b in batches)
    trainer.model.train()
    total = sum(trainer.compute_loss(trainer.model, dict(b), num_items_in_batch=total_items) for b in batches)
    whole = trainer.compute_loss(trainer.model, dict(trainer.data_collator(examples)))
    torch.testing.assert_close(total, whole, rtol=1e-5, atol=1e-6)
    metrics = trainer._metrics["train"]
    assert metrics["key_loss"] and not metrics["reasoning_loss"]  # the reasoning is not scored


def test_inspect_says_what_detached_does(capsys):
    stages = "[{name: sft, loss_on: completion}, {name: key, loss_on: key, context: detached}]"
    assert cli.main(["--inspect", "1", "--stages", stages]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "`context: detached`: the prompt and reasoning are fixed context" in out
    assert out.count("fixed context") == 1  # only on the detached stage
