"""The offline demo: a synthetic arithmetic reasoning task, a character-level tokenizer and a tiny Llama,
all built locally so that the demo and the tests never touch the Hugging Face Hub."""

from __future__ import annotations

import json
import os
import random
import shutil
import string
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<pad>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TAG_TOKENS = ["<Thinking>", "</Thinking>", "<Answer>", "</Answer>"]
ALPHABET = string.digits + string.ascii_letters + " \n.,:;?!+-*/=()%$#<>'\"_|[]{}"


def make_arithmetic_example(rng: random.Random, steps: tuple[int, int] = (2, 3), max_value: int = 9) -> dict[str, str]:
    """One multi-step problem such as `Compute 7 + 2 - 4.`, worked left to right, staying in [0, max_value]."""
    value = rng.randint(1, max_value - 1)
    expression = str(value)
    lines = []
    for _ in range(rng.randint(*steps)):
        if value == max_value or (value > 0 and rng.random() < 0.5):
            operand = rng.randint(1, value)
            result, op = value - operand, "-"
        else:
            operand = rng.randint(1, max_value - value)
            result, op = value + operand, "+"
        expression += f" {op} {operand}"
        lines.append(f"{value} {op} {operand} = {result}")
        value = result
    return {"question": f"Compute {expression}.", "reasoning": "\n".join(lines), "answer": str(value)}


def write_arithmetic_dataset(
    directory: str | Path, num_train: int = 2000, num_test: int = 200, seed: int = 0, max_value: int = 9
) -> Path:
    """Write `train.jsonl` and `test.jsonl` (columns question/reasoning/answer) deterministically; return the dir."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    seen: set[str] = set()
    splits = {"train": num_train, "test": num_test}
    for split, count in splits.items():
        rows = []
        while len(rows) < count:
            example = make_arithmetic_example(rng, max_value=max_value)
            if example["question"] in seen:  # keep test questions out of train
                continue
            seen.add(example["question"])
            rows.append(example)
        tmp = directory / f".{split}.jsonl.tmp-{os.getpid()}"  # several ranks may build it at once
        tmp.write_text("".join(json.dumps(row) + "\n" for row in rows))
        tmp.replace(directory / f"{split}.jsonl")
    return directory


def build_tiny_tokenizer():
    """A character-level fast tokenizer with ChatML special tokens and the SFTKey tags as single tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + ["<unk>"])}
    for char in ALPHABET:
        vocab.setdefault(char, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token=None,
        eos_token="<|im_end|>",
        additional_special_tokens=["<|endoftext|>", "<|im_start|>"],
    )
    tokenizer.add_tokens(TAG_TOKENS)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.padding_side = "right"
    return tokenizer


def build_tiny_model(directory: str | Path, hidden_size: int = 192, num_layers: int = 3, seed: int = 0) -> Path:
    """Save a randomly initialised tiny Llama and its tokenizer under `directory` (idempotent); return it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    directory = Path(directory)
    if (directory / "config.json").exists() and (directory / "tokenizer.json").exists():
        return directory
    tokenizer = build_tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    tmp = directory.with_name(f"{directory.name}.tmp-{os.getpid()}")  # several ranks may build it at once
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.replace(directory)
    except OSError:  # another process finished first: its copy is identical (same seed)
        shutil.rmtree(tmp, ignore_errors=True)
    return directory
