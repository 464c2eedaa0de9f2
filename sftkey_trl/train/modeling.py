"""Tokenizer and model loading for LoRA, QLoRA (4-bit nf4) and full fine-tuning, with stage chaining."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
from trl import get_peft_config, get_quantization_config

from ..errors import SFTKeyError, first_line
from ..files import cache_root
from ..models import DEMO_MODEL, LOCAL_NAME, check_model_name
from ..models.smollm2 import build_smollm2
from .distributed import built_for, device_map

logger = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "auto": "auto"}


def resolve_model_path(name: str) -> str:
    """`demo:tiny-llama` and `local:smollm2-135m-instruct` are built locally by the project's own code (once, in
    the cache); anything else is a hub id or a folder."""
    check_model_name(name)
    if name == LOCAL_NAME:
        return str(build_smollm2())
    if name == DEMO_MODEL:
        from ..models.tiny import build_tiny_model

        return str(build_tiny_model(cache_root() / "tiny-llama"))
    return name


def require_router(coef: float, config) -> None:
    """`router_aux_loss_coef` weights a Mixture-of-Experts router loss: the model (its config) must have a router."""
    if float(coef or 0) and not hasattr(config.get_text_config(), "output_router_logits"):  # a stage's "0" is off
        raise SFTKeyError(
            f"`router_aux_loss_coef: {coef}` weights a Mixture-of-Experts router loss, but the model "
            f"({config.model_type}) has no router; remove `router_aux_loss_coef`"
        )


def _hub_error(name: str, error: Exception) -> SFTKeyError:
    return SFTKeyError(
        f"model `{name}` could not be loaded ({first_line(error)}); if the Hugging Face Hub is unreachable, download "
        "the model and set `model_name_or_path` to the local folder"
    )


def load_tokenizer(model_args, training_args, offline: bool = False):
    """Load the model's fast tokenizer (offsets are needed for the masks) and make sure it can pad; `offline`:
    only from a local folder or the cache."""
    name = resolve_model_path(model_args.model_name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            name,
            revision=model_args.model_revision,
            trust_remote_code=training_args.trust_remote_code,
            local_files_only=offline,
        )
    except (OSError, ValueError) as error:
        raise _hub_error(model_args.model_name_or_path, error) from error
    if not tokenizer.is_fast:
        raise SFTKeyError(f"`{name}` has no fast tokenizer; SFTKey masks need offsets (a `tokenizer.json`)")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def quantization_config(model_args) -> BitsAndBytesConfig | None:
    """TRL's 4-bit/8-bit config, computing in bfloat16 unless the model loads in bfloat16 or float16 (TRL computes in
    `dtype`, which cannot be `auto` and is float32 by default; the QLoRA paper computes in bf16)."""
    compute = model_args.dtype if model_args.dtype in ("bfloat16", "float16") else "bfloat16"
    return get_quantization_config(dataclasses.replace(model_args, dtype=compute))


def lora_config(model_args) -> LoraConfig | None:
    """TRL's LoRA config, on every linear layer but the LM head when `lora_target_modules` is unset (`all-linear`
    excludes `lm_head`; peft's own default for Llama is q_proj and v_proj)."""
    targets = model_args.lora_target_modules or "all-linear"
    return get_peft_config(dataclasses.replace(model_args, lora_target_modules=targets))


def load_model(model_args, training_args, checkpoint: str | Path | None = None, *, purpose: str):
    """Load a model for `purpose` ("train", "evaluate" or "merge"; `distributed.device_map` says where each goes):
    the base model without `checkpoint` (for training TRL adds the LoRA adapter); with one, the saved weights, or
    for LoRA/QLoRA the (re-quantised) base model with the saved adapter, trainable only for training."""
    name = resolve_model_path(model_args.model_name_or_path)
    is_adapter = checkpoint is not None and (Path(checkpoint) / "adapter_config.json").exists()
    source = str(checkpoint) if checkpoint is not None and not is_adapter else name
    quantization = quantization_config(model_args)
    kwargs = {
        "revision": model_args.model_revision if source == name else "main",
        "dtype": DTYPES.get(model_args.dtype or "auto", "auto"),
        "trust_remote_code": training_args.trust_remote_code,
        "device_map": device_map(training_args, purpose, quantized=quantization is not None),
    }
    if model_args.attn_implementation:
        kwargs["attn_implementation"] = model_args.attn_implementation
    if quantization is not None:
        kwargs["quantization_config"] = quantization
    with built_for(training_args, purpose):  # ZeRO-3 partitions a model to train as it is built; no other
        try:
            model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
        except (OSError, ValueError) as error:
            raise _hub_error(source, error) from error
        if is_adapter:
            model = PeftModel.from_pretrained(model, str(checkpoint), is_trainable=purpose == "train")
    return model
