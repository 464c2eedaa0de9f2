"""The demo's tiny model: a character-level tokenizer with ChatML tokens and a randomly initialised Llama, built
locally so that the demo and the tests never touch the Hugging Face Hub."""

from __future__ import annotations

import string
from pathlib import Path

from ..errors import SFTKeyError
from ..files import write_folder

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<pad>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TAG_TOKENS = ["<Thinking>", "</Thinking>", "<Answer>", "</Answer>"]
TINY_MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json")  # what it builds
ALPHABET = string.digits + string.ascii_letters + " \n.,:;?!+-*/=()%$#<>'\"_|[]{}"


def build_tiny_tokenizer():
    """A character-level fast tokenizer with ChatML special tokens and the SFTKey tags as single tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(dict.fromkeys([*SPECIAL_TOKENS, "<unk>", *ALPHABET]))}
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
    from safetensors.torch import save_model
    from transformers import LlamaConfig, LlamaForCausalLM

    directory = Path(directory)
    missing = [name for name in TINY_MODEL_FILES if not (directory / name).is_file()]
    if not missing:
        return directory
    if directory.exists() and any(directory.iterdir()):  # built whole (write_folder): damaged since
        raise SFTKeyError(
            f"`{directory}` is not a complete demo model ({', '.join(missing)} missing); delete that folder and it "
            "is built again"
        )
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
    with write_folder(directory) as tmp:  # several ranks may build it at once: identical copies (same seed)
        # Not `model.save_pretrained`: under torch.distributed it writes nothing off rank 0, and such a copy may win
        save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        model.config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return directory
