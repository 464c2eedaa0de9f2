"""`SFTKeyTrainer`: TRL's `SFTTrainer` with per-token loss weights on top of its fused LM head.

The loss is `sum(weight * token_loss) / normaliser` over TRL's fused LM head (`fused_lm_head=True`: no
`(batch, seq, vocab)` logits), with the stage objective's token loss, weights and normaliser. The normaliser is
summed over micro-batches and ranks as `transformers.Trainer` counts `num_items_in_batch`; a Mixture-of-Experts
router loss is added as TRL adds it. TRL options this loss does not honour are refused in `recipe/options.py`.
Each optimizer step is watched (`watch.py`): a diverging stage stops with one line, and a resumed stage reports its
whole training.
"""

from __future__ import annotations

import logging

import torch
from transformers.trainer_utils import get_last_checkpoint
from trl import SFTTrainer

from .collator import SFTKeyCollator
from .detached import detached_forward, split_at_key
from .distributed import release_engine_state
from .engines import share_checkpointing_kwargs
from .modeling import require_router
from .objectives import Stage, token_losses
from .watch import StageWatch

logger = logging.getLogger(__name__)

MASK_COLUMNS = ["input_ids", "completion_mask", "key_mask"]


class SFTKeyTrainer(SFTTrainer):
    """SFTTrainer for one SFTKey stage. Takes the tokenised dataset (`input_ids`, `completion_mask`, `key_mask`)."""

    def __init__(self, *args, stage: Stage, log_part_losses: bool = True, **kwargs):
        training_args = kwargs["args"]
        if kwargs.get("model") is not None:  # check_recipe did when it found the model's config on this machine
            require_router(training_args.router_aux_loss_coef, kwargs["model"].config)
        self.stage = stage
        padding_free = training_args.padding_free
        training_args.padding_free = False  # TRL refuses a custom collator with padding_free; ours does it
        training_args.dataset_kwargs = {**(training_args.dataset_kwargs or {}), "skip_prepare_dataset": True}
        self.detached = stage.context == "detached"
        # A detached key stage never forwards the reasoning with labels, so it cannot score it
        self.scores_completion = (log_part_losses and not self.detached) or stage.loss_on == "completion"
        if self.detached and log_part_losses:
            logger.info("stage %s: `context: detached` logs key_loss only (no reasoning_loss)", stage.name)
        kwargs.setdefault(
            "data_collator",
            SFTKeyCollator(
                pad_token_id=kwargs["processing_class"].pad_token_id,
                stage=stage,
                score_completion=self.scores_completion,
                padding_free=padding_free,
                pad_to_multiple_of=training_args.pad_to_multiple_of,
            ),
        )
        release_engine_state(training_args)  # under DeepSpeed the previous stage's engine state blocks a new one
        share_checkpointing_kwargs(training_args)  # TRL's PEFT + ZeRO-3 checkpointing setting must reach the model
        super().__init__(*args, **kwargs)
        training_args.padding_free = padding_free
        self.watch = StageWatch(self, stage.name)
        self.add_callback(self.watch)  # before any the caller adds (keep_best): a diverged step stops first

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs):
        """`Trainer.train`, carrying on from the stage totals a resumed checkpoint holds (`watch.py`)."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
        self.watch.begin(resume_from_checkpoint or None)
        self._total_train_tokens = self.watch.totals.train_tokens  # TRL's count, logged as `num_tokens`
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.watch.add_loss(loss)  # the loss Trainer adds up for its logs, before its NaN filter
        return loss

    def _get_grad_norm(self, model, grad_norm=None):
        # Trainer's one call per optimizer step that sees the gradient norm (of the reduced gradients: every rank's)
        self.watch.grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        return self.watch.grad_norm

    def stage_summary(self) -> dict:
        """The whole stage's training: mean loss per optimizer step, steps, tokens and seconds (resumed or not)."""
        return self.watch.whole_stage()

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = list(MASK_COLUMNS)

    def _normaliser_mask(self, batch: dict) -> torch.Tensor:
        return self.stage.normaliser_mask(batch["completion_mask"][..., 1:], batch["loss_weights"][..., 1:])

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device):
        # Let Trainer gather and scale the count as it does for labels, but count the stage's normaliser tokens
        counted = [
            {"labels": batch["labels"], "shift_labels": torch.where(self._normaliser_mask(batch), 0, -100)}
            for batch in batch_samples
        ]
        return super()._get_num_items_in_batch(counted, device)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        normaliser = self._normaliser_mask(inputs).sum() if num_items_in_batch is None else num_items_in_batch
        loss_weights = inputs.pop("loss_weights")
        weights = loss_weights[:, 1:]
        completion = inputs.pop("completion_mask")[:, 1:]
        key = inputs.pop("key_mask")[:, 1:]
        if self.aux_loss_enabled:  # MoE: TRL's __init__ set this from `router_aux_loss_coef` and the model config
            inputs["output_router_logits"] = True
        if self.detached:
            split = split_at_key(inputs["input_ids"], inputs["attention_mask"], loss_weights)
            outputs = detached_forward(model, split)
            weights = split.weights[:, 1:]
            key, completion = weights > 0, torch.zeros_like(weights, dtype=torch.bool)  # reasoning_weight is 0
        else:
            outputs = model(**inputs, use_cache=False, fused_lm_head=True)
        losses = token_losses(outputs.log_probs, self.args.loss_type)  # zero wherever the label is -100
        loss = (losses * weights).sum() / torch.as_tensor(normaliser, device=losses.device).clamp(min=1)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        if self.aux_loss_enabled:
            # As TRL: the aux loss is a per-micro-batch mean that DDP averages across ranks; with
            # `num_items_in_batch` Trainer leaves accumulation to the loss, so it is averaged over the steps here
            steps = self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
            loss = loss + self.router_aux_loss_coef * outputs.aux_loss / steps
            aux = self.accelerator.gather_for_metrics(outputs.aux_loss.detach()[None]).mean().item()
            self._metrics[mode]["aux_loss"].append(aux)
        self._log_token_metrics(mode, inputs, outputs, -outputs.log_probs.detach(), completion & ~key, key)
        return (loss, outputs) if return_outputs else loss

    def _log_token_metrics(self, mode, inputs, outputs, nll, reasoning, key) -> None:
        """TRL's entropy / token accuracy / token count, plus the mean nll on reasoning and on key tokens."""
        sums = torch.stack(
            [
                outputs.label_mask.sum(),
                outputs.entropy.detach().sum(),
                outputs.is_top1.sum(),
                (nll * reasoning).sum(),
                reasoning.sum(),
                (nll * key).sum(),
                key.sum(),
            ]
        ).float()
        valid, entropy, correct, reasoning_nll, reasoning_count, key_nll, key_count = (
            self.accelerator.gather_for_metrics(sums[None]).sum(0).tolist()
        )
        metrics = self._metrics[mode]
        metrics["entropy"].append(entropy / valid if valid else 0.0)
        metrics["mean_token_accuracy"].append(correct / valid if valid else 0.0)
        if reasoning_count and self.scores_completion:
            metrics["reasoning_loss"].append(reasoning_nll / reasoning_count)
        if key_count:
            metrics["key_loss"].append(key_nll / key_count)
        if mode == "train":
            if "attention_mask" in inputs:
                local_tokens = inputs["attention_mask"].sum()
            else:
                local_tokens = torch.tensor(inputs["position_ids"].size(1), device=inputs["position_ids"].device)
            self._total_train_tokens += int(self.accelerator.gather_for_metrics(local_tokens[None]).sum())
        metrics["num_tokens"] = [self._total_train_tokens]
