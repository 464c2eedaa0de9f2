"""Atomic writes: a folder appears complete or not at all, and a copy another process finished first stays."""

from __future__ import annotations

import pytest

from sftkey_trl.files import write_folder


def test_a_folder_appears_only_complete(tmp_path):
    target = tmp_path / "model"
    with write_folder(target) as tmp:
        (tmp / "weights").write_text("1")
        assert not target.exists()  # nothing under the final name while it is written
    assert (target / "weights").read_text() == "1"
    assert [path.name for path in tmp_path.iterdir()] == ["model"]  # no temporary folder left


def test_an_error_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError), write_folder(tmp_path / "model") as tmp:
        (tmp / "weights").write_text("half")
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_a_copy_another_process_finished_first_stays(tmp_path):
    target = tmp_path / "model"
    with write_folder(target) as tmp:
        (tmp / "weights").write_text("mine")
        target.mkdir()
        (target / "weights").write_text("theirs")
    assert (target / "weights").read_text() == "theirs"
    assert [path.name for path in tmp_path.iterdir()] == ["model"]
