"""Every folder the project writes gets one line when it cannot be written: `output_dir` and the cache (`--dry_run`
and a real run alike, before anything is loaded; the dry run creates nothing), `--merge_dir` (a new folder or an
earlier merge's only) and compare.py's `--comparison_dir`."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest
from conftest import ROOT
from test_checks import run_both, write_recipe

from sftkey_trl.errors import SFTKeyError


def mark_folder(folder, kind: str) -> None:
    from sftkey_trl.files import mark_folder

    mark_folder(folder, kind)


def unwritable(monkeypatch, folder) -> None:
    """`folder` not writable: `os.access` says so (as root, permissions would not stop the test's own writes)."""
    real = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: str(path) != str(folder) and real(path, mode, **kw))


@pytest.mark.parametrize("case", ["a_file", "under_a_file", "not_writable", "a_stage_folder", "cache_a_file"])
def test_an_unusable_output_folder_is_one_line_in_the_dry_run_and_the_real_run(case, tmp_path, monkeypatch, capsys):
    out, parent = tmp_path / "outputs", tmp_path / "parent"  # the recipe's output_dir; a file
    message = {
        "a_file": rf"`output_dir: {out}` is a file, not a folder",
        "under_a_file": rf"`output_dir: {parent / 'run'}` cannot be created: {parent} is a file",
        "not_writable": rf"`output_dir: {out}` cannot be written: {tmp_path} is not writable",
        "a_stage_folder": rf"`output_dir: {out}` is a stage folder of an sftkey-trl run; a run writes its own folder",
        "cache_a_file": r"the cache .*cache-file \(SFTKEY_CACHE\) is a file, not a folder",
    }[case]
    output_dir = out
    if case == "a_file":
        out.write_text("not a folder")
    elif case == "under_a_file":
        parent.write_text("a file")
        output_dir = parent / "run"
    elif case == "not_writable":
        unwritable(monkeypatch, tmp_path)
    elif case == "a_stage_folder":
        mark_folder(out, "stage")
    else:
        (tmp_path / "cache-file").write_text("a file")
        monkeypatch.setenv("SFTKEY_CACHE", str(tmp_path / "cache-file"))
    recipe = write_recipe(tmp_path)
    Path(recipe).write_text(Path(recipe).read_text().replace(f"output_dir: {out}", f"output_dir: {output_dir}"))
    before = sorted(tmp_path.rglob("*"))
    dry, real = run_both(recipe, monkeypatch, capsys)
    assert dry == real and re.fullmatch(f"error: {message}.*", dry), dry
    assert sorted(tmp_path.rglob("*")) == before  # neither created a folder


def test_merge_writes_only_into_a_new_folder_or_an_earlier_merge(tmp_path):
    from sftkey_trl.recipe.folders import check_merge_folder

    check_merge_folder(tmp_path / "new" / "merged")
    mark_folder(tmp_path / "earlier", "merge")
    check_merge_folder(tmp_path / "earlier")
    for kind in ("run", "stage", "comparison"):
        mark_folder(tmp_path / kind, kind)
    (tmp_path / "mine").mkdir()
    (tmp_path / "file").write_text("x")
    for folder, words in [("run", "the output folder of an sftkey-trl run"), ("stage", "a stage folder"),
                          ("comparison", "a compare.py folder"), ("mine", "a folder sftkey-trl did not create"),
                          ("file", "a file, not a folder")]:  # fmt: skip
        with pytest.raises(SFTKeyError, match=f"`--merge_dir {tmp_path / folder}` is {words}") as error:
            check_merge_folder(tmp_path / folder)
        assert "\n" not in str(error.value)


@pytest.mark.parametrize("case", ["a_file", "a_run_folder"])
def test_an_unusable_comparison_folder_is_one_line_before_any_arm_runs(case, tmp_path, monkeypatch, capsys):
    sys.path.insert(0, str(ROOT / "recipes"))
    from compare import main

    def no_arm(*args, **kwargs):
        raise AssertionError("an arm ran before the comparison folder was checked")

    monkeypatch.setattr("sftkey_trl.run.variants.run_variant", no_arm)
    folder = tmp_path / "cmp"
    if case == "a_file":
        folder.write_text("x")
    else:
        mark_folder(folder, "run")
    with pytest.raises(SystemExit) as exit_:
        main(["--comparison_dir", str(folder), "--output_dir", str(tmp_path / "o"), "--variants", "sft_tag"])
    error = capsys.readouterr().err.strip()
    words = "is a file, not a folder" if case == "a_file" else "is the output folder of an sftkey-trl run"
    assert exit_.value.code == 2 and error.startswith(f"error: `--comparison_dir {folder}` {words}"), error
    assert "\n" not in error
