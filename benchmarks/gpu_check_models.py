"""What the GPU check trains on, built locally with no network: a byte-level BPE tokenizer with ChatML tokens,
random-init Qwen2.5-shaped models from their published shapes, and long tokenised chain-of-thought examples."""

from __future__ import annotations

import random
from pathlib import Path

import torch

from sftkey_trl.data.adapters import Triple
from sftkey_trl.data.formatting import Formatter
from sftkey_trl.data.masks import tokenize_rendered
from sftkey_trl.data.synthetic import make_arithmetic_example
from sftkey_trl.models.tiny import CHAT_TEMPLATE, SPECIAL_TOKENS
from sftkey_trl.recipe.schema import SFTKeyScriptArguments
from sftkey_trl.train.memory import MODEL_SHAPES

HEAD_DIM = 128  # Qwen2.5-1.5B (1536 / 12 heads) and 7B (3584 / 28 heads)
SHAPES = {"1.5B": "Qwen/Qwen2.5-1.5B", "7B": "Qwen/Qwen2.5-7B"}
# Tiny stand-ins for CPU runs of the check's own logic: one tied (like 1.5B), one untied (like 7B)
TINY = {
    "1.5B": dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4,
                 num_key_value_heads=2, tie_word_embeddings=True),
    "7B": dict(hidden_size=96, num_hidden_layers=2, intermediate_size=192, num_attention_heads=6,
               num_key_value_heads=2, tie_word_embeddings=False),
}  # fmt: skip


def bpe_tokenizer(vocab_size: int = 2048, seed: int = 0):
    """A byte-level BPE tokenizer trained here on arithmetic chains of thought, with ChatML special tokens and
    chat template, EOS `<|im_end|>` and pad `<pad>`. Tags like `</Thinking>` stay several tokens, as in Qwen's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(seed)
    corpus = []
    for _ in range(2000):
        example = make_arithmetic_example(rng, steps=(2, 6), max_value=999)
        response = f"<Thinking>{example['reasoning']}</Thinking>\n<Answer>{example['answer']}"
        corpus.append(f"{example['question']}\n{response}")
    corpus += ["</Answer>", "user\n", "assistant\n", "system\n"] * 50
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        eos_token="<|im_end|>",
        additional_special_tokens=["<|endoftext|>", "<|im_start|>"],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def local_tokenizer(directory: str):
    """A tokenizer from a local folder (e.g. a real Qwen2.5 tokenizer copied there), made to pad and chat."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory)
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = CHAT_TEMPLATE
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def qwen_config(shape: str, tiny: bool, tokenizer):
    """A `Qwen2Config` with the published shape of Qwen2.5-`shape` (vocabulary included), or its tiny stand-in."""
    from transformers import Qwen2Config

    special = dict(
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None, use_cache=True
    )
    if tiny:
        return Qwen2Config(vocab_size=len(tokenizer), max_position_embeddings=4096, **TINY[shape], **special)
    published = MODEL_SHAPES[SHAPES[shape]]
    if len(tokenizer) > published.vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens, more than the model's {published.vocab_size}")
    return Qwen2Config(
        vocab_size=published.vocab_size,
        hidden_size=published.hidden_size,
        intermediate_size=published.intermediate_size,
        num_hidden_layers=published.num_layers,
        num_attention_heads=published.hidden_size // HEAD_DIM,
        num_key_value_heads=published.kv_dim // HEAD_DIM,
        tie_word_embeddings=published.tied_embeddings,
        max_position_embeddings=32768,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
        **special,
    )


def build_model(directory: Path, config, tokenizer, device: str) -> Path:
    """Save a random-init model of `config` (bf16 on a GPU, float32 on CPU) and the tokenizer; reuse a saved one."""
    from transformers import AutoModelForCausalLM

    if (directory / "config.json").exists():
        return directory
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device(device):  # initialising billions of weights on the GPU takes seconds, on CPU minutes
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    tmp = directory.with_name(directory.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    tmp.replace(directory)
    return directory


def count_tokens(tokenizer, formatter: Formatter, example: dict) -> int:
    rendered = formatter.render(Triple(**example))
    return len(tokenizer(rendered.text, add_special_tokens=False)["input_ids"])


def long_examples(tokenizer, count: int, seq_len: int, seed: int = 0) -> list[dict]:
    """`count` arithmetic chains of thought whose rendered length is just under `seq_len` tokens: the reasoning
    fills almost the whole response and the answer (the key) is a few tokens at its end."""
    formatter = Formatter(tokenizer, SFTKeyScriptArguments())
    rng = random.Random(seed)
    short = count_tokens(tokenizer, formatter, make_arithmetic_example(random.Random(seed), (1, 1), 999))
    longer = count_tokens(tokenizer, formatter, make_arithmetic_example(random.Random(seed), (41, 41), 999))
    per_step = max((longer - short) / 40, 1.0)
    steps = max(int((seq_len - short) / per_step * 0.95), 1)
    examples = []
    while len(examples) < count:
        example = make_arithmetic_example(rng, (steps, steps), 999)
        if count_tokens(tokenizer, formatter, example) <= seq_len:
            examples.append(example)
    return examples


def tokenised(tokenizer, examples: list[dict]) -> dict[str, list[list[int]]]:
    """`input_ids`, `completion_mask` and `key_mask` columns, rendered the way both stages see them."""
    formatter = Formatter(tokenizer, SFTKeyScriptArguments())
    return tokenize_rendered(tokenizer, [formatter.render(Triple(**example)) for example in examples])


def prompts(tokenizer, count: int, seed: int = 1) -> tuple[list[str], str]:
    """`count` generation prompts (short questions), and the end-of-turn token generation stops at."""
    formatter = Formatter(tokenizer, SFTKeyScriptArguments())
    rng = random.Random(seed)
    questions = [make_arithmetic_example(rng, (8, 12), 999)["question"] for _ in range(count)]
    return [formatter.prompt(question) for question in questions], formatter.end_of_turn
