"""Generation-based evaluation: batched greedy generation, answer extraction and scoring, sharded across ranks."""

from __future__ import annotations

import gc
import logging

import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from ..errors import SFTKeyError
from .metrics import score

logger = logging.getLogger(__name__)
VLLM_MISSING = "`eval_backend: vllm` needs vllm (`pip install vllm`); or set `eval_backend: hf`"  # also a recipe check


def stop_token_ids(tokenizer, end_of_turn: str) -> list[int]:
    """Token ids that end a generation: the end-of-turn token used in training, and the tokenizer's EOS."""
    ids = {tokenizer.convert_tokens_to_ids(end_of_turn), tokenizer.eos_token_id}
    return sorted(i for i in ids if i is not None and i != tokenizer.unk_token_id)


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: list[str],
    stop_ids: list[int],
    batch_size: int = 32,
    max_new_tokens: int = 512,
    show_progress: bool = True,
    synced_gpus: bool | None = None,
) -> list[tuple[str, int]]:
    """Greedy, KV-cached generation, longest prompts first (memory errors show at once), left-padded; returns (text,
    generated tokens) per prompt in input order. `synced_gpus` goes to `generate` (True for rank-sharded weights)."""
    if not prompts:
        return []
    was_training, padding_side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    results: list[tuple[str, int]] = [("", 0)] * len(prompts)
    settings = {"max_new_tokens": max_new_tokens, "do_sample": False, "eos_token_id": stop_ids, "use_cache": True}
    settings |= {"pad_token_id": tokenizer.pad_token_id, "synced_gpus": synced_gpus}
    try:
        bar = None if show_progress else True  # None: drawn on a terminal only, never into a pipe or a log file
        for start in tqdm(range(0, len(order), batch_size), desc="generating", disable=bar, leave=False):
            chunk = order[start : start + batch_size]
            encoded = tokenizer(
                [prompts[i] for i in chunk], return_tensors="pt", padding=True, add_special_tokens=False
            ).to(device)
            output = model.generate(**encoded, **settings)
            for row, index in zip(output[:, encoded["input_ids"].shape[1] :].tolist(), chunk):
                stop = next((k for k, token in enumerate(row) if token in stop_ids), len(row))
                results[index] = (tokenizer.decode(row[:stop], skip_special_tokens=True), stop + (stop < len(row)))
    finally:
        tokenizer.padding_side = padding_side
        model.train(was_training)
    return results


def vllm_memory_share(margin: float = 0.05, most: float = 0.9) -> float:
    """vLLM's `gpu_memory_utilization`: the share of the GPU's memory it takes for weights and KV cache, and it
    refuses to start when less than that is free. This process has freed its own model before (the pipeline
    evaluates the saved stage and keeps no copy), but its CUDA context and anything else it holds stay; so the
    share free now, less `margin` for vLLM's own start-up, at most vLLM's default `most`."""
    if not torch.cuda.is_available():
        return most
    gc.collect()
    torch.cuda.empty_cache()  # blocks the caching allocator kept after the trained model was freed
    free, total = torch.cuda.mem_get_info()
    return round(max(min(free / total - margin, most), 0.05), 3)


def generate_vllm(
    model_path: str, adapter_path: str | None, prompts: list[str], stop_ids: list[int], max_new_tokens: int
) -> list[tuple[str, int]]:
    """Greedy generation with vLLM (`eval_backend: vllm`); a LoRA stage is served as an adapter on its base."""
    try:
        from vllm import LLM, SamplingParams
        from vllm.lora.request import LoRARequest
    except ImportError:
        raise SFTKeyError(VLLM_MISSING) from None
    memory = vllm_memory_share()
    llm = LLM(model=model_path, enable_lora=adapter_path is not None, gpu_memory_utilization=memory)
    params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, stop_token_ids=stop_ids)
    lora = LoRARequest("stage", 1, adapter_path) if adapter_path else None
    outputs = llm.generate(prompts, params, lora_request=lora)
    return [(o.outputs[0].text, len(o.outputs[0].token_ids)) for o in outputs]


def evaluate_model(
    model,
    tokenizer,
    examples: list[dict],
    answer_type: str,
    script_args,
    formatter,
    vllm_source: tuple[str, str | None] | None = None,
    synced_gpus: bool | None = None,
    label: str = "evaluation",
) -> tuple[dict, list[dict]]:
    """Generate on the evaluation examples, sharded across processes and gathered, and score them (the same metrics
    on every rank). Shards are padded to equal length so every rank calls `generate` equally often (under ZeRO-3/FSDP
    an extra batch would hang). `eval_backend: vllm` serves `vllm_source` (model, adapter or None) instead. The main
    process logs where `label`'s answers are generated (the GPU check reads it)."""
    state = PartialState()
    stop_ids = stop_token_ids(tokenizer, formatter.end_of_turn)
    if script_args.eval_backend == "vllm":
        if vllm_source is None:
            raise SFTKeyError("`eval_backend: vllm` needs a saved model; evaluate a saved stage with --eval_only")
        if state.is_main_process:
            logger.info("%s: generating %d answers with vLLM", label, len(examples))
        texts = generate_vllm(*vllm_source, [e["prompt"] for e in examples], stop_ids, script_args.max_new_tokens)
        return score(examples, texts, answer_type, script_args, formatter.tags)
    indices = list(range(len(examples)))
    with state.split_between_processes(indices) as own:
        own = list(own)
    padded = own
    if indices and state.num_processes > 1:
        with state.split_between_processes(indices, apply_padding=True) as padded:  # `own`, then repeats
            padded = list(padded)
    prompts = [examples[i]["prompt"] for i in padded]
    if state.is_main_process:
        logger.info("%s: generating %d answers on %s", label, len(examples), next(model.parameters()).device)
    batch, budget = script_args.eval_batch_size, script_args.max_new_tokens
    local = generate(model, tokenizer, prompts, stop_ids, batch, budget, state.is_main_process, synced_gpus)
    pairs = list(zip(own, local[: len(own)]))
    if state.num_processes > 1:
        pairs = gather_object(pairs)
    generations = [text for _, text in sorted(dict(pairs).items())]
    return score(examples, generations, answer_type, script_args, formatter.tags)
