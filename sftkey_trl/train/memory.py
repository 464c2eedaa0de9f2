"""Estimate the peak GPU memory of a training run (per GPU, in GiB) from the model's shape. An ESTIMATE only.

The figure is a sum of the usual terms, calibrated against three runs on one H200 (`MEASURED`; within about 5% of
each). It counts what PyTorch allocates (`torch.cuda.max_memory_allocated`); the CUDA context and fragmentation add
about 0.5-1 GiB. Generation during evaluation and DeepSpeed/NCCL buffers are not counted.

    weights     QLoRA: nf4 linear layers at 0.5 byte/param + absmax constants (1/16 byte, ~1/64 nested); embeddings
                and an untied LM head in bf16. LoRA: every weight in bf16. Full: ZeRO-3's 16 bytes/param sharded
                over the GPUs, plus about two gathered bf16 layers (or the embedding).
    adapter     LoRA rank r on q/k/v/o/gate/up/down: r x (fan_in + fan_out) params per matrix at 16 bytes.
    activations bf16, tokens = batch x seq_len. With checkpointing each layer keeps its input and one layer is
                recomputed in full (5 x hidden + 2 x kv_dim + 4 x intermediate per token, plus LoRA's dropout
                copies, 6 x hidden + intermediate); without it every layer keeps everything.
    LM head     not counted: TRL's fused LM head never materialises the (batch, seq, vocab) logits (measured: loss
                on 24 tokens or on 60% of 2048 gives the same peak).
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 1024**3
METHODS = ("qlora", "lora", "full")
NF4_BYTES = 0.5
NF4_ABSMAX_BYTES = 4 / 64  # one fp32 absmax per block of 64 weights
NF4_NESTED_ABSMAX_BYTES = 1 / 64 + 4 / (64 * 256)  # absmax in 8 bits, one fp32 constant per 256 blocks
BF16 = 2
ADAM_FP32_BYTES = 16  # fp32 weight + gradient + Adam m and v
ZERO3_BYTES = 16  # bf16 weight + bf16 gradient + fp32 master weight + Adam m and v


@dataclass(frozen=True)
class ModelShape:
    """The published shape of a model (its `config.json` on the Hub)."""

    params_b: float  # total parameters, billions
    hidden_size: int
    num_layers: int
    intermediate_size: int
    kv_dim: int  # num_key_value_heads x head_dim
    vocab_size: int
    tied_embeddings: bool


MODEL_SHAPES: dict[str, ModelShape] = {
    "Qwen/Qwen2.5-1.5B": ModelShape(1.54, 1536, 28, 8960, 2 * 128, 151936, True),
    "Qwen/Qwen2.5-3B": ModelShape(3.09, 2048, 36, 11008, 2 * 128, 151936, True),
    "Qwen/Qwen2.5-7B": ModelShape(7.62, 3584, 28, 18944, 4 * 128, 152064, False),
    "Qwen/Qwen3-8B-Base": ModelShape(8.19, 4096, 36, 12288, 8 * 128, 151936, False),
    "HuggingFaceTB/SmolLM3-3B-Base": ModelShape(3.08, 2048, 36, 11008, 4 * 128, 128256, True),
    "HuggingFaceTB/SmolLM2-135M-Instruct": ModelShape(0.135, 576, 30, 1536, 3 * 64, 49152, True),
}
MODEL_SHAPES["local:smollm2-135m-instruct"] = MODEL_SHAPES["HuggingFaceTB/SmolLM2-135M-Instruct"]  # built locally

# Peak GPU memory measured on one H200 (trl 1.16, random-init Qwen2.5-shaped models, LoRA r=16 on all linear
# layers, gradient checkpointing, seq 2048): (model, method, batch) -> GiB.
MEASURED: dict[tuple[str, str, int], float] = {
    ("Qwen/Qwen2.5-1.5B", "qlora", 4): 2.94,
    ("Qwen/Qwen2.5-1.5B", "lora", 4): 4.94,
    ("Qwen/Qwen2.5-7B", "qlora", 2): 7.36,
}
MEASURED_SEQ_LEN = 2048
MEASURED_LORA_R = 16


def estimate_memory_gib(
    num_params_b: float,
    method: str,
    lora_r: int,
    seq_len: int,
    batch: int,
    hidden_size: int,
    num_layers: int,
    gradient_checkpointing: bool,
    num_gpus: int = 1,
    *,
    intermediate_size: int | None = None,
    kv_dim: int | None = None,
    vocab_size: int = 151936,
    tied_embeddings: bool = True,
    nested_quant: bool = True,
) -> float:
    """Estimated peak training memory per GPU, in GiB, for `method` "qlora", "lora" or "full" (ZeRO-3 over
    `num_gpus`); `batch` is per device. Unset `intermediate_size`/`kv_dim` are derived from the parameter count."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if num_gpus < 1 or batch < 1 or seq_len < 1:
        raise ValueError("num_gpus, batch and seq_len must be positive")
    h, layers = hidden_size, num_layers
    total = num_params_b * 1e9
    embeddings = vocab_size * h * (1 if tied_embeddings else 2)
    body = max(total - embeddings, 0.0)
    kv = kv_dim if kv_dim is not None else h // 4
    inter = intermediate_size
    if inter is None:  # body per layer ~ q,o (h x h) + k,v (h x kv) + gate/up/down (h x intermediate)
        inter = max(int((body / layers - 2 * h * h - 2 * h * kv) / (3 * h)), h)

    if method == "qlora":
        constants = NF4_NESTED_ABSMAX_BYTES if nested_quant else NF4_ABSMAX_BYTES
        weights = body * (NF4_BYTES + constants) + embeddings * BF16
    elif method == "lora":
        weights = total * BF16
    else:
        weights = total * ZERO3_BYTES / num_gpus
        if num_gpus > 1:  # ZeRO-3 gathers a layer (and prefetches the next) or the embedding at a time
            weights += 2 * max(body / layers, vocab_size * h) * BF16

    adapter = 0.0
    if method != "full":
        adapter = lora_r * layers * (9 * h + 2 * kv + 3 * inter) * ADAM_FP32_BYTES

    tokens = batch * seq_len
    layer_input = tokens * h * BF16
    layer_full = tokens * (5 * h + 2 * kv + 4 * inter) * BF16
    if method != "full":
        layer_full += tokens * (6 * h + inter) * BF16  # LoRA dropout keeps a masked copy of each input
    if gradient_checkpointing:
        activations = layers * layer_input + layer_full
    else:
        activations = layers * (layer_input + layer_full)
    return (weights + adapter + activations) / GIB


def estimate_for_model(
    model: str,
    method: str,
    lora_r: int,
    seq_len: int,
    batch: int,
    gradient_checkpointing: bool,
    num_gpus: int = 1,
    nested_quant: bool = True,
) -> float | None:
    """`estimate_memory_gib` with the shape from `MODEL_SHAPES`; None for a model not in the table."""
    shape = MODEL_SHAPES.get(model)
    if shape is None:
        return None
    return estimate_memory_gib(
        shape.params_b,
        method,
        lora_r,
        seq_len,
        batch,
        shape.hidden_size,
        shape.num_layers,
        gradient_checkpointing,
        num_gpus,
        intermediate_size=shape.intermediate_size,
        kv_dim=shape.kv_dim,
        vocab_size=shape.vocab_size,
        tied_embeddings=shape.tied_embeddings,
        nested_quant=nested_quant,
    )


def calibration() -> list[tuple[str, str, int, float, float]]:
    """(model, method, batch, measured GiB, estimated GiB) for every measured run."""
    rows = []
    for (model, method, batch), measured in MEASURED.items():
        estimate = estimate_for_model(model, method, MEASURED_LORA_R, MEASURED_SEQ_LEN, batch, True)
        rows.append((model, method, batch, measured, estimate))
    return rows


def training_method(model_args) -> str:
    """`qlora`, `lora` or `full`, from a recipe's model arguments."""
    return "qlora" if model_args.load_in_4bit else "lora" if model_args.use_peft else "full"


def estimate_for_recipe(model_args, training_args, num_gpus: int) -> float | None:
    """`estimate_for_model` with every setting read from a parsed recipe (None: unknown model or no max_length)."""
    if training_args.max_length is None:
        return None
    return estimate_for_model(
        model_args.model_name_or_path,
        training_method(model_args),
        model_args.lora_r,
        training_args.max_length,
        training_args.per_device_train_batch_size,
        bool(training_args.activation_checkpointing),
        num_gpus,
        nested_quant=bool(model_args.use_bnb_nested_quant),
    )
