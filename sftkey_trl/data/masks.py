"""Tokenise rendered examples once, with offset mapping, into `input_ids` plus a completion mask and a key mask.

A token belongs to a span when its characters overlap it (a token straddling `</Thinking>` and the newline counts
as key too). Masks come from character offsets, never from matching a response template on token ids, which breaks
whenever the template tokenises differently in context.
"""

from __future__ import annotations

import numpy as np

from .formatting import Rendered


def span_mask(offsets: np.ndarray, start: int, end: int) -> np.ndarray:
    """1 for tokens whose character span [s, e) overlaps [start, end); zero-width tokens count by position."""
    token_start, token_end = offsets[:, 0], offsets[:, 1]
    overlaps = (token_end > start) & (token_start < end)
    zero_width = (token_end == token_start) & (token_start >= start) & (token_start < end)
    return (overlaps | zero_width).astype(np.int8)


def tokenize_rendered(tokenizer, rendered: list[Rendered]) -> dict[str, list[list[int]]]:
    """Tokenise rendered texts (a fast tokenizer is required for offsets) and build both masks."""
    encoding = tokenizer(
        [item.text for item in rendered],
        add_special_tokens=False,
        return_offsets_mapping=True,
        return_attention_mask=False,
    )
    completion_masks, key_masks = [], []
    for item, offsets in zip(rendered, encoding["offset_mapping"]):
        offsets = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
        completion_masks.append(span_mask(offsets, item.prompt_end, item.completion_end).tolist())
        key_masks.append(span_mask(offsets, item.key_start, item.completion_end).tolist())
    return {"input_ids": encoding["input_ids"], "completion_mask": completion_masks, "key_mask": key_masks}


def supervised_text(tokenizer, input_ids: list[int], mask: list[int]) -> str:
    """Decode the tokens a mask selects (what a stage trains on), for `--inspect`."""
    return tokenizer.decode([token for token, bit in zip(input_ids, mask) if bit], skip_special_tokens=False)
