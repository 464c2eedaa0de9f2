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
