"""The completion-only collator of both stages: masks to labels and per-token loss weights, padded or padding-free."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from trl.trainer.utils import pad

from .objectives import Stage


@dataclass
class SFTKeyCollator:
    """Collate tokenised examples (`input_ids`, `completion_mask`, `key_mask`) for one stage, with the objective's
    `loss_weights`. `labels` marks what the fused LM head scores (weight > 0, or the whole response with
    `score_completion`, so reasoning and key losses can be logged apart). `padding_free`: one flattened row with
    `position_ids` and the `cu_seq_lens_*` that flash-attention reads; else right-padded rows and an attention mask."""

    pad_token_id: int
    stage: Stage
    score_completion: bool = True
    padding_free: bool = False
    pad_to_multiple_of: int | None = None

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        input_ids = [torch.as_tensor(example["input_ids"], dtype=torch.long) for example in examples]
        completion = [torch.as_tensor(example["completion_mask"], dtype=torch.bool) for example in examples]
        key = [torch.as_tensor(example["key_mask"], dtype=torch.bool) for example in examples]
        if self.padding_free:
            position_ids = [torch.cat([torch.arange(len(ids)) for ids in input_ids])]
            input_ids, completion, key = [torch.cat(input_ids)], [torch.cat(completion)], [torch.cat(key)]
        batch = {
            "input_ids": self._pad(input_ids, self.pad_token_id),
            "completion_mask": self._pad(completion, False),
            "key_mask": self._pad(key, False),
        }
        if self.padding_free:
            batch["position_ids"] = self._pad(position_ids, 0)
            # A sequence's first token is never a target: it would be predicted from the previous sequence
            batch["completion_mask"] &= batch["position_ids"] != 0
            batch["key_mask"] &= batch["position_ids"] != 0
            starts = (batch["position_ids"][0] == 0).nonzero().flatten()
            cu_seq_lens = torch.cat([starts, torch.tensor([batch["position_ids"].size(1)])]).to(torch.int32)
            batch["cu_seq_lens_q"] = batch["cu_seq_lens_k"] = cu_seq_lens
            batch["max_length_q"] = batch["max_length_k"] = int(cu_seq_lens.diff().max())
        else:
            batch["attention_mask"] = self._pad([torch.ones_like(ids) for ids in input_ids], 0)
        batch["loss_weights"] = self.stage.loss_weights(batch["completion_mask"], batch["key_mask"])
        scored = batch["loss_weights"] > 0
        if self.score_completion:
            scored |= batch["completion_mask"]
        batch["labels"] = batch["input_ids"].masked_fill(~scored, -100)
        return batch

    def _pad(self, tensors: list[torch.Tensor], value) -> torch.Tensor:
        return pad(tensors, padding_value=value, padding_side="right", pad_to_multiple_of=self.pad_to_multiple_of)
