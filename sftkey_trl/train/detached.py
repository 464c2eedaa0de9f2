"""`context: detached`: a key stage that treats the prompt and the reasoning as fixed context.

Per batch, each row's prefix (every token before the one predicting the first key token) runs forward under
`no_grad` into a `DynamicCache`; only the key span then runs forward and backward, against that cache, through TRL's
fused LM head. The loss is the ordinary key loss with the prefix's keys and values detached, so the answer loss no
longer reaches the reasoning.

Layout: prefixes right-aligned (left-padded) into `P` columns, key spans left-aligned into `K`, attention mask
`[prefix mask | key mask]`, `position_ids` each token's position in its own row. Right-aligning makes the distance
between two slots of a row the distance between their positions, which matters because transformers builds
sliding-window masks (Mistral, Gemma-2/3, Phi-3, Qwen2) from slot indices, not from `position_ids`.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass

import torch


@dataclass
class KeySplit:
    """One batch split into a no-grad prefix and a key span (see the module docstring)."""

    prefix_ids: torch.Tensor  # (B, P) right-aligned
    prefix_mask: torch.Tensor  # (B, P) 1 on real prefix tokens
    prefix_positions: torch.Tensor  # (B, P)
    key_ids: torch.Tensor  # (B, K)
    key_mask: torch.Tensor  # (B, K) 1 on real span tokens
    key_positions: torch.Tensor  # (B, K)
    weights: torch.Tensor  # (B, K) the original per-token loss weights of the span's tokens (0 on padding)
    labels: torch.Tensor  # (B, K) the token where its weight is > 0, -100 elsewhere


def split_at_key(input_ids: torch.Tensor, attention_mask: torch.Tensor, weights: torch.Tensor) -> KeySplit:
    """Split a padded batch at each row's first weighted token (`weights[:, t]` weighs predicting token t): the span
    runs from the position predicting it to the last weighted token; a row without weighted tokens is all prefix."""
    rows, length = input_ids.shape
    device = input_ids.device
    attention_mask = attention_mask.long()
    targets = weights[:, 1:] > 0  # targets[:, t]: position t predicts a weighted token
    has_targets = targets.any(1)
    first = targets.int().argmax(1)  # position predicting the first weighted token
    last = (length - 2) - targets.flip(1).int().argmax(1)  # position predicting the last one
    start = torch.where(has_targets, first, torch.full_like(first, length))
    span = torch.where(has_targets, last + 2 - first, torch.zeros_like(first))
    positions = (attention_mask.cumsum(1) - 1).clamp(min=0)

    prefix_width = int(start.max())
    # right-aligned: column c of row i holds its token c - (P - p_i); columns before that are padding
    source = torch.arange(prefix_width, device=device)[None] - (prefix_width - start[:, None])
    real = source >= 0
    source = source.clamp(min=0)
    prefix_mask = attention_mask.gather(1, source) * real

    key_width = max(int(span.max()), 1)
    offsets = torch.arange(key_width, device=device)
    index = (start[:, None] + offsets[None]).clamp(max=length - 1)
    key_mask = (offsets[None] < span[:, None]).long()
    key_ids = input_ids.gather(1, index)
    key_weights = weights.gather(1, index) * key_mask
    return KeySplit(
        prefix_ids=input_ids.gather(1, source),
        prefix_mask=prefix_mask,
        prefix_positions=positions.gather(1, source),
        key_ids=key_ids,
        key_mask=key_mask,
        key_positions=positions.gather(1, index),
        weights=key_weights,
        labels=key_ids.masked_fill(key_weights <= 0, -100),
    )


def _base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under DDP / PEFT wrappers."""
    model = getattr(model, "module", model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def cache_keyword(model: torch.nn.Module) -> str:
    """The forward keyword of the KV cache: `cache` in recent transformers, `past_key_values` before."""
    parameters = inspect.signature(type(_base_model(model)).forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


@contextlib.contextmanager
def checkpointing_off(model: torch.nn.Module):
    """Run layers without gradient checkpointing, which would drop the cache (transformers does, since replaying a
    layer would append to it twice). The key span is a few tokens per row, so its activations are small anyway."""
    layers = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True]
    for layer in layers:
        layer.gradient_checkpointing = False
    try:
        yield
    finally:
        for layer in layers:
            layer.gradient_checkpointing = True


def detached_forward(model: torch.nn.Module, split: KeySplit):
    """The prefix under `no_grad` into a `DynamicCache` (through the unwrapped model: no gradient sync), then the key
    span with gradient through the fused LM head; returns TRL's `FusedCausalLMOutput` for the key batch."""
    from transformers import DynamicCache

    unwrapped = getattr(model, "module", model)
    keyword = cache_keyword(model)
    cache = DynamicCache()
    with checkpointing_off(unwrapped):
        if split.prefix_ids.size(1):
            with torch.no_grad():
                unwrapped(
                    input_ids=split.prefix_ids,
                    attention_mask=split.prefix_mask,
                    position_ids=split.prefix_positions,
                    use_cache=True,
                    logits_to_keep=1,  # the cache is what is wanted: skip the LM head on the prefix
                    **{keyword: cache},
                )
        return model(
            input_ids=split.key_ids,
            attention_mask=torch.cat([split.prefix_mask, split.key_mask], dim=1),
            position_ids=split.key_positions,
            labels=split.labels,
            fused_lm_head=True,
            **{keyword: cache},
        )
