"""The command line's error contract: a user error is one line on stderr and exit status 2."""

from __future__ import annotations

import io

import pytest

from sftkey_trl.errors import SFTKeyError
from sftkey_trl.run.cli import user_errors


class Writes(io.StringIO):
    """A stderr that records each write call."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def write(self, text: str) -> int:
        self.calls.append(text)
        return super().write(text)


def test_a_user_error_is_written_as_one_whole_line(monkeypatch):
    """Every rank of a launch writes into one pipe; a line written in pieces (text, then newline) can run into
    another rank's line, so the line and its newline go out in a single write."""
    stderr = Writes()
    monkeypatch.setattr("sys.stderr", stderr)
    with pytest.raises(SystemExit) as stopped, user_errors(debug=False):
        raise SFTKeyError("`ddp_backend` is missing; add `--ddp_backend gloo`")
    assert stopped.value.code == 2
    assert [call for call in stderr.calls if call] == ["error: `ddp_backend` is missing; add `--ddp_backend gloo`\n"]


def test_inspect_marks_the_supervised_text_when_not_writing_to_a_terminal(capsys, tiny_model_dir):
    """Piped or in a CI log there are no colours: each run of supervised tokens is between [[ and ]], its weight in
    front when it is not 1 (before, the example was printed once per stage with nothing to tell them apart)."""
    from sftkey_trl.run import cli

    stages = "[{name: emph, loss_on: completion, key_weight: 5}, {name: key, loss_on: key}]"
    assert cli.main(["--config", "recipes/demo/sftkey_tiny.yaml", "--inspect", "1", "--stages", stages]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Supervised text is between [[ and ]], with its loss weight in front when it is")
    emph, key = out.split("stage `emph`")[1].split("stage `key`")
    assert "assistant\n[[<Thinking>7 - 5 = 2" in emph and "</Thinking>]][[x5: \n<Answer>8</Answer><|im_end|>]]" in emph
    assert "assistant\n<Thinking>7 - 5 = 2" in key and "0 + 8 = 8</Thinking>[[\n<Answer>8</Answer><|im_end|>]]" in key
    prompt = key.split("<|im_start|>user")[1].split("assistant")[0]
    assert "Compute 7 - 5 - 2 + 8." in prompt and "[[" not in prompt  # the prompt is context


def test_the_inspect_json_fields_are_documented():
    from sftkey_trl.run.cli import INSPECT_JSON

    for field in ("`index`", "`stage`", "`text`", "`supervised_text`", "`weights`"):
        assert field in INSPECT_JSON
