"""Masks from character offsets: what each stage supervises, for tags/plain, chat/plain layouts, tricky answers."""

from __future__ import annotations

import pytest
from conftest import script_args
from datasets import Dataset

from sftkey_trl.data.adapters import Triple
from sftkey_trl.data.formatting import Formatter
from sftkey_trl.data.loading import InvalidReport, _validate_lengths
from sftkey_trl.data.masks import supervised_text, tokenize_rendered
from sftkey_trl.errors import SFTKeyError
from sftkey_trl.train.objectives import Stage

TRIPLE = Triple("Start at 48, halve it, add it back.", "48 / 2 = 24\n48 + 24 = 72", "72")


def supervised(tokenizer, formatter, triple):
    rendered = formatter.render(triple)
    columns = tokenize_rendered(tokenizer, [rendered])
    ids = columns["input_ids"][0]
    completion = supervised_text(tokenizer, ids, columns["completion_mask"][0])
    key = supervised_text(tokenizer, ids, columns["key_mask"][0])
    return rendered, completion, key, columns


def test_tags_with_chat_template(char_tokenizer):
    formatter = Formatter(char_tokenizer, script_args(response_format="tags"))
    rendered, completion, key, columns = supervised(char_tokenizer, formatter, TRIPLE)
    assert completion == "<Thinking>48 / 2 = 24\n48 + 24 = 72</Thinking>\n<Answer>72</Answer><|im_end|>"
    assert key == "\n<Answer>72</Answer><|im_end|>"
    assert rendered.text.startswith("<|im_start|>user\nStart at 48")
    assert rendered.text[rendered.completion_end :] == "\n"  # the template's trailing newline is not trained
    assert all(c >= k for c, k in zip(columns["completion_mask"][0], columns["key_mask"][0]))


def test_plain_without_chat_template(char_tokenizer):
    char_tokenizer.chat_template = None
    formatter = Formatter(char_tokenizer, script_args(response_format="plain"))
    rendered, completion, key, _ = supervised(char_tokenizer, formatter, TRIPLE)
    assert rendered.text.startswith("### Question:\nStart at 48")
    assert completion == "48 / 2 = 24\n48 + 24 = 72\nThe answer is 72.<|im_end|>"
    assert key == "The answer is 72.<|im_end|>"


def test_system_prompt_and_custom_tags(char_tokenizer):
    args = script_args(system_prompt="Be brief.", thinking_open="<T>", thinking_close="</T>")
    formatter = Formatter(char_tokenizer, args)
    rendered, completion, key, _ = supervised(char_tokenizer, formatter, TRIPLE)
    assert "<|im_start|>system\nBe brief.<|im_end|>" in rendered.text
    assert completion.startswith("<T>48 / 2") and key == "\n<Answer>72</Answer><|im_end|>"


@pytest.mark.parametrize(
    "answer",
    ["72", "1,234", "-7", "3/4", r"\frac{3}{4}", "½ → ünïcødé ✓", "24"],  # "24" also appears in the reasoning
)
@pytest.mark.parametrize("response_format", ["tags", "plain"])
def test_tricky_answers_bpe(bpe_tokenizer, answer, response_format):
    formatter = Formatter(bpe_tokenizer, script_args(response_format=response_format))
    triple = Triple(TRIPLE.question, TRIPLE.reasoning, answer)
    rendered, completion, key, _ = supervised(bpe_tokenizer, formatter, triple)
    expected_key = rendered.text[rendered.key_start : rendered.completion_end]
    expected_completion = rendered.text[rendered.prompt_end : rendered.completion_end]
    assert key.endswith(expected_key) and completion.endswith(expected_completion)
    # Before the key comes only what the straddling `>\n` token brings in: `>` with tags; plain splits cleanly
    straddled = key[: len(key) - len(expected_key)]
    assert rendered.text[: rendered.key_start].endswith(straddled)
    assert straddled == (">" if response_format == "tags" else "")
    assert expected_key.endswith("<eos>")


def test_bpe_straddling_token_counts_as_key(bpe_tokenizer):
    """The token merging `</Thinking>`'s `>` with the newline after it is both completion and key."""
    formatter = Formatter(bpe_tokenizer, script_args())
    rendered, _, _, columns = supervised(bpe_tokenizer, formatter, TRIPLE)
    encoding = bpe_tokenizer(rendered.text, add_special_tokens=False, return_offsets_mapping=True)
    assert encoding["input_ids"] == columns["input_ids"][0]
    straddling = [i for i, (start, end) in enumerate(encoding["offset_mapping"]) if start < rendered.key_start < end]
    assert len(straddling) == 1, "the fixture tokenizer no longer merges `>` with the newline"
    index = straddling[0]
    text = bpe_tokenizer.decode([columns["input_ids"][0][index]])
    assert text == ">\n" and rendered.text[rendered.key_start - 1 : rendered.key_start + 1] == text
    assert columns["key_mask"][0][index] == 1 and columns["completion_mask"][0][index] == 1
    assert columns["key_mask"][0].index(1) == index  # the key starts at it, not at `</Thinking`


def test_chat_template_without_end_of_turn_is_refused(char_tokenizer):
    char_tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    formatter = Formatter(char_tokenizer, script_args())
    with pytest.raises(SFTKeyError, match="eos_token"):
        formatter.render(TRIPLE)


def _lengths_dataset(lengths):
    return Dataset.from_dict(
        {
            "input_ids": [[1] * n for n in lengths],
            "completion_mask": [[0] + [1] * (n - 1) for n in lengths],
            "key_mask": [[0] * (n - 2) + [1, 1] for n in lengths],
            "index": list(range(len(lengths))),
        }
    )


def test_key_at_max_length_boundary():
    stages = [Stage(name="sft", loss_on="completion"), Stage(name="key", loss_on="key")]
    report = InvalidReport()
    kept = _validate_lengths(_lengths_dataset([10, 11, 9]), 10, stages, report, 3)
    assert kept["index"] == [0, 2]  # exactly max_length is kept, one token over is reported
    assert report.counts == {"key_truncated": 1} and report.first_rows == {"key_truncated": [1]}


def test_max_length_cutting_most_examples_is_an_error():
    stages = [Stage(name="sft", loss_on="completion")]
    with pytest.raises(SFTKeyError, match="raise `max_length`"):
        _validate_lengths(_lengths_dataset([20, 20, 5]), 10, stages, InvalidReport(), 3)


def test_example_without_key_tokens_is_reported():
    data = _lengths_dataset([6, 6])
    data = data.map(lambda row: {"key_mask": [0] * 6} if row["index"] == 1 else {})
    report = InvalidReport()
    kept = _validate_lengths(data, None, [Stage(name="key", loss_on="key")], report, 2)
    assert kept["index"] == [0] and report.counts == {"no_key_tokens": 1}
