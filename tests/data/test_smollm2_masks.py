"""Masks and prompts on the real SmolLM2 tokenizer and its own chat template (default system prompt, `<|im_end|>`):
each stage supervises exactly its span, and the generation prompt tokenises as a prefix of the training text."""

from __future__ import annotations

import pytest
from conftest import script_args

from sftkey_trl.data.adapters import Triple
from sftkey_trl.data.formatting import Formatter
from sftkey_trl.data.masks import supervised_text, tokenize_rendered
from sftkey_trl.evaluation.generation import stop_token_ids

pytestmark = pytest.mark.real_model

QUESTION = "Start at 48, halve it, add it back."
REASONING = "48 / 2 = 24\n48 + 24 = 72"
CASES = {
    "plain number": (REASONING, "72"),
    "answer repeated in the reasoning": (REASONING, "24"),
    "thousands separator": ("1,000 + 234 = 1,234", "1,234"),
    "negative": ("3 - 10 = -7", "-7"),
    "latex": (r"Half of $\frac{3}{2}$ is $\frac{3}{4}$", r"\frac{3}{4}"),
    "unicode": ("½ → ünïcødé ✓ 数学", "½ → ünïcødé ✓"),
}


def masks_of(tokenizer, formatter, triple):
    rendered = formatter.render(triple)
    columns = tokenize_rendered(tokenizer, [rendered])
    return rendered, columns["input_ids"][0], columns["completion_mask"][0], columns["key_mask"][0]


def one_run(mask: list[int]) -> tuple[int, int]:
    """(first, last + 1) of the mask's ones, which must be contiguous."""
    first, last = mask.index(1), len(mask) - mask[::-1].index(1)
    assert all(mask[first:last]) and not any(mask[:first]) and not any(mask[last:])
    return first, last


@pytest.mark.parametrize("case", list(CASES))
def test_masks_cover_exactly_the_response_and_the_key(smollm2_tokenizer, case):
    tokenizer = smollm2_tokenizer
    reasoning, answer = CASES[case]
    formatter = Formatter(tokenizer, script_args())
    rendered, ids, completion, key = masks_of(tokenizer, formatter, Triple(QUESTION, reasoning, answer))
    assert "You are a helpful AI assistant named SmolLM" in rendered.text[: rendered.prompt_end]  # the default
    expected_key = f"\n<Answer>{answer}</Answer><|im_end|>"
    assert supervised_text(tokenizer, ids, completion) == f"<Thinking>{reasoning}</Thinking>{expected_key}"
    assert supervised_text(tokenizer, ids, key) == expected_key
    start, end = one_run(completion)
    key_start, key_end = one_run(key)
    assert key_end == end and start < key_start
    assert ids[end - 1] == tokenizer.convert_tokens_to_ids("<|im_end|>")  # the end-of-turn token is trained
    assert tokenizer.decode(ids[end:]) == "\n"  # the template's trailing newline is not
    assert tokenizer.decode(ids[:start]) == rendered.text[: rendered.prompt_end]
    # No token straddles `</Thinking>` and the newline: the byte-level pre-tokenizer always splits them
    assert tokenizer.decode(ids[:key_start]).endswith(f"{reasoning}</Thinking>")


def test_plain_response_format(smollm2_tokenizer):
    tokenizer = smollm2_tokenizer
    formatter = Formatter(tokenizer, script_args(response_format="plain"))
    rendered, ids, completion, key = masks_of(tokenizer, formatter, Triple(QUESTION, REASONING, "-1,234"))
    assert supervised_text(tokenizer, ids, completion) == f"{REASONING}\nThe answer is -1,234.<|im_end|>"
    assert supervised_text(tokenizer, ids, key) == "The answer is -1,234.<|im_end|>"


def test_token_straddling_the_prompt_boundary_counts_as_completion(smollm2_tokenizer):
    """A prompt layout ending in a space: BPE merges it with the response's first `<` into one token (`Ġ<`), which
    belongs to both sides; it is trained (completion mask), the rest of the prompt is not."""
    tokenizer = smollm2_tokenizer
    tokenizer.chat_template = None
    formatter = Formatter(tokenizer, script_args(prompt_template="Question: {question}\nAnswer: "))
    rendered, ids, completion, key = masks_of(tokenizer, formatter, Triple(QUESTION, REASONING, "72"))
    offsets = tokenizer(rendered.text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    start, _ = one_run(completion)
    assert offsets[start][0] < rendered.prompt_end < offsets[start][1]  # the first trained token straddles
    assert tokenizer.convert_ids_to_tokens(ids[start]) == "Ġ<"
    response = f"<Thinking>{REASONING}</Thinking>\n<Answer>72</Answer><|im_end|>"
    assert supervised_text(tokenizer, ids, completion) == " " + response
    assert supervised_text(tokenizer, ids, key) == "\n<Answer>72</Answer><|im_end|>"


@pytest.mark.parametrize("system_prompt", [None, "Answer in the tags."], ids=["default-system", "own-system"])
@pytest.mark.parametrize(
    "question",
    [QUESTION, "Combien font ½ + ¼ ?\n(réponse: 0,75)", "  spaced  ", "x" * 300],
    ids=["plain", "unicode-multiline", "spaces", "long"],
)
def test_generation_prompt_ids_are_a_prefix_of_the_training_ids(smollm2_tokenizer, system_prompt, question):
    tokenizer = smollm2_tokenizer
    formatter = Formatter(tokenizer, script_args(system_prompt=system_prompt))
    rendered = formatter.render(Triple(question, REASONING, "72"))
    prompt = formatter.prompt(question)
    assert prompt.endswith("<|im_start|>assistant\n") and rendered.text.startswith(prompt)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]  # exactly as generation tokenises it
    columns = tokenize_rendered(tokenizer, [rendered])
    assert columns["input_ids"][0][: len(prompt_ids)] == prompt_ids
    assert columns["completion_mask"][0].index(1) == len(prompt_ids)  # training starts at the first generated token


def test_generation_stops_at_im_end(smollm2_tokenizer):
    formatter = Formatter(smollm2_tokenizer, script_args())
    im_end = smollm2_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert formatter.end_of_turn == "<|im_end|>"
    assert stop_token_ids(smollm2_tokenizer, formatter.end_of_turn) == [im_end]
