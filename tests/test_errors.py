"""The one-line error helpers every module builds its messages with."""

from __future__ import annotations

from sftkey_trl.errors import first_line


def test_first_line_of_an_error():
    assert first_line(ValueError("bad value\nTraceback detail\nmore")) == "bad value"
    assert first_line(OSError("\n  the file is gone\n(details)")) == "the file is gone"  # not an empty detail
    assert first_line(StopIteration()) == "StopIteration"
    assert first_line(IndexError()) == "IndexError"
