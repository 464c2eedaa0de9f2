"""Scoring and diagnostics on hand-written generations, and batched generation against one-at-a-time."""

from __future__ import annotations

import pytest
from conftest import script_args

from sftkey_trl.data.formatting import Tags
from sftkey_trl.evaluation.metrics import score


def example(gold: str, index: int = 0) -> dict:
    return {"index": index, "prompt": "p", "gold": gold}


GENERATIONS = [
    ("<Thinking>2 + 3 = 5\n5 - 1 = 4</Thinking>\n<Answer>4</Answer>", "4"),  # right, consistent
    ("<Thinking>2 + 3 = 5\n5 - 1 = 3</Thinking>\n<Answer>3</Answer>", "4"),  # reasoning wrong, answer follows
    ("<Thinking>2 + 3 = 5\n5 - 1 = 4</Thinking>\n<Answer>7</Answer>", "4"),  # reasoning right, answer does not
    ("the answer is 4", "4"),  # right only by the last-number fallback (no answer slot): lenient, not accurate
]


def test_diagnostics_separate_reasoning_errors_from_answer_errors():
    examples = [example(gold, i) for i, (_, gold) in enumerate(GENERATIONS)]
    generations = [(text, len(text)) for text, _ in GENERATIONS]
    metrics, predictions = score(examples, generations, "numeric", script_args(), Tags())
    assert [p["correct"] for p in predictions] == [True, False, False, False]
    assert [p["lenient_correct"] for p in predictions] == [True, False, False, True]
    assert [p["format_ok"] for p in predictions] == [True, True, True, False]
    assert [p["reasoning_final"] for p in predictions] == ["4", "3", "4", None]
    assert [p["consistent"] for p in predictions] == [True, True, False, False]
    assert metrics["accuracy"] == 0.25 and metrics["lenient_accuracy"] == 0.5 and metrics["format_accuracy"] == 0.75
    assert metrics["reasoning_final_accuracy"] == 0.5
    assert metrics["answer_reasoning_consistency"] == 0.5
    assert metrics["accuracy_given_format"] == pytest.approx(1 / 3)
    assert metrics["last_number_fallback_rate"] == 0.25 and metrics["strict_accuracy"] == 0.25
    assert metrics["composite"] == pytest.approx(0.7 * 0.25 + 0.3 * 0.75)
    assert metrics["mean_reasoning_length"] == pytest.approx((3 * len("2 + 3 = 5\n5 - 1 = 4")) / 4)


def test_reasoning_is_judged_against_the_reference_reasoning_where_the_answer_transforms_it():
    """`Compute (2 + 3 + 4) mod 4.`: the reference reasoning ends at 9 and the gold answer is 1, so the gold-based
    diagnostic cannot tell right reasoning from wrong; the reference-based one can."""
    reference = {"index": 0, "prompt": "p", "gold": "1", "reasoning": "2 + 3 = 5\n5 + 4 = 9"}
    generations = [
        "<Thinking>2 + 3 = 5\n5 + 4 = 9</Thinking>\n<Answer>1</Answer>",  # right reasoning, right remainder
        "<Thinking>2 + 3 = 5\n5 + 4 = 9</Thinking>\n<Answer>2</Answer>",  # right reasoning, wrong remainder
        "<Thinking>2 + 3 = 5\n5 + 4 = 8</Thinking>\n<Answer>0</Answer>",  # wrong reasoning
    ]
    examples = [{**reference, "index": i} for i in range(3)] + [example("4", 3)]  # no reference: not judged
    texts = [(text, len(text)) for text in generations] + [(GENERATIONS[0][0], 10)]
    metrics, predictions = score(examples, texts, "numeric", script_args(), Tags())
    assert [p["reasoning_matches_reference"] for p in predictions] == [True, True, False, None]
    assert metrics["reasoning_reference_accuracy"] == pytest.approx(2 / 3)
    assert metrics["reasoning_final_accuracy"] == 0.25  # only the last row, whose answer is its reasoning's value
    assert metrics["accuracy"] == 0.5


def test_a_format_collapsed_generation_scores_zero_accuracy():
    """No answer slot at all: the last number is right by chance, so only the lenient figure counts it."""
    metrics, _ = score([example("5")], [("5 - 1 = 4\n4 + 1 = 5", 9)], "numeric", script_args(), Tags())
    assert metrics["accuracy"] == 0.0 and metrics["lenient_accuracy"] == 1.0 and metrics["format_accuracy"] == 0.0


def test_unparseable_gold_is_counted_and_never_correct():
    metrics, predictions = score([example("N/A")], [("<Thinking>x</Thinking>\n<Answer>N/A</Answer>", 5)],
                                 "numeric", script_args(), Tags())  # fmt: skip
    assert metrics["unparseable_gold"] == 1 and not predictions[0]["correct"]


@pytest.mark.slow
def test_batched_generation_equals_one_at_a_time(tiny_model_dir, char_tokenizer):
    import torch
    from transformers import AutoModelForCausalLM

    from sftkey_trl.evaluation.generation import generate

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    prompts = [f"<|im_start|>user\nCompute {i} + {i}.<|im_end|>\n<|im_start|>assistant\n" for i in range(1, 12)]
    prompts[3] += "<Thinking>"  # different lengths, so left padding matters
    stop = [char_tokenizer.eos_token_id]
    batched = generate(model, char_tokenizer, prompts, stop, batch_size=4, max_new_tokens=12, show_progress=False)
    single = [generate(model, char_tokenizer, [p], stop, 1, 12, show_progress=False)[0] for p in prompts]
    assert batched == single


def test_vllm_backend_without_vllm_is_a_clear_error(monkeypatch):
    import sys

    from sftkey_trl.errors import SFTKeyError
    from sftkey_trl.evaluation.generation import generate_vllm

    monkeypatch.setitem(sys.modules, "vllm", None)  # as if vllm were not installed
    with pytest.raises(SFTKeyError, match=r"needs vllm \(`pip install vllm`\); or set `eval_backend: hf`"):
        generate_vllm("model", None, ["prompt"], [0], 8)


@pytest.mark.slow
@pytest.mark.parametrize(("free_gib", "share"), [(60.0, 0.7), (79.5, 0.9), (1.0, 0.05)])
def test_vllm_takes_the_gpu_memory_that_is_free(monkeypatch, free_gib, share):
    """vLLM refuses to start with less free memory than its `gpu_memory_utilization` share: it gets what is free
    when it starts (less a margin), at most its own default 0.9 (a faked 80 GiB GPU)."""
    import torch

    from sftkey_trl.evaluation.generation import vllm_memory_share

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda: (int(free_gib * 2**30), 80 * 2**30))
    assert vllm_memory_share() == pytest.approx(share)
