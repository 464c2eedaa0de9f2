"""The demo's tiny model: built once, complete whichever process builds it."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from sftkey_trl.models.tiny import build_tiny_model


def test_tiny_model_built_on_a_non_zero_rank_is_complete(tmp_path, monkeypatch):
    """Under torch.distributed, transformers' `save_pretrained` writes nothing on ranks other than 0; a build on such
    a rank must still leave a loadable model (any rank may be the one whose copy lands in the cache)."""
    monkeypatch.setattr(LlamaForCausalLM, "should_save_on_this_rank", lambda self, is_main_process: False)
    directory = build_tiny_model(tmp_path / "tiny-llama", hidden_size=16, num_layers=1, seed=3)
    model = AutoModelForCausalLM.from_pretrained(directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    assert model.config.eos_token_id == tokenizer.eos_token_id == model.generation_config.eos_token_id
    torch.manual_seed(3)
    fresh = LlamaForCausalLM(model.config)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied, as built
    loaded, expected = model.state_dict(), fresh.state_dict()
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[name], expected[name]) for name in expected)


def test_an_incomplete_demo_model_folder_is_named_in_one_line(tmp_path):
    """The build writes the folder whole; a damaged one was kept as it was, and loading it blamed the Hub."""
    from sftkey_trl.errors import SFTKeyError
    from sftkey_trl.models.tiny import build_tiny_model

    folder = build_tiny_model(tmp_path / "tiny", hidden_size=32, num_layers=1)
    (folder / "model.safetensors").unlink()
    with pytest.raises(SFTKeyError, match=r"is not a complete demo model \(model.safetensors missing\); delete"):
        build_tiny_model(folder, hidden_size=32, num_layers=1)
