"""Atomic writes: a folder appears complete or not at all, and a copy another process finished first stays. Deletes:
only through `files.discard`, and only what this project made (its marker says so)."""

from __future__ import annotations

import ast
import time
from pathlib import Path

import pytest

import sftkey_trl
from sftkey_trl.errors import SFTKeyError
from sftkey_trl.files import created_for, discard, folder_marker, mark_folder, set_aside, write_folder


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


def test_a_folder_written_with_a_kind_carries_its_marker(tmp_path):
    with write_folder(tmp_path / "merged", kind="merge") as tmp:
        (tmp / "weights").write_text("1")
    assert folder_marker(tmp_path / "merged")["kind"] == "merge"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["merged"]


# What deletes, renames or replaces files: only files.py may call them (`discard`, the atomic writes, `set_aside`)
DELETING = {("shutil", "rmtree"), ("shutil", "move"), ("os", "remove"), ("os", "unlink"), ("os", "rmdir"),
            ("os", "removedirs"), ("os", "replace"), ("os", "rename"), ("os", "renames")}  # fmt: skip
PATH_METHODS = {"unlink", "rmdir", "rename", "rmtree"}  # `.replace(target)`, one argument, is Path.replace too
# Inside files.py: deleting only in `discard` (and `created_for`'s removal of the empty folders it made); renaming a
# file or folder the project wrote onto its name (or away)
FILES_PY = {
    "discard": {"rmtree", "unlink", "rmdir"},
    "write_text": {"replace"},
    "write_folder": {"replace"},
    "set_aside": {"rename"},
    "created_for": {"rmdir"},
}  # fmt: skip (rmdir: empty folders it made only)


def destructive_calls(source: str) -> list[tuple[int, str, str]]:
    """(line, the function it is in, what it calls) for every call that deletes, renames or replaces."""
    tree = ast.parse(source)
    found = []
    imported = {alias.asname or alias.name: (node.module, alias.name) for node in ast.walk(tree)
                if isinstance(node, ast.ImportFrom) for alias in node.names}  # fmt: skip

    def visit(node: ast.AST, function: str) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            function = node.name
        if isinstance(node, ast.Call):
            func, name = node.func, None
            if isinstance(func, ast.Attribute):
                owner = func.value.id if isinstance(func.value, ast.Name) else None
                one_argument = len(node.args) == 1 and not node.keywords
                if (
                    (owner, func.attr) in DELETING
                    or func.attr in PATH_METHODS
                    or func.attr == "replace"
                    and one_argument
                    and owner != "dataclasses"  # dataclasses.replace(obj) copies a dataclass
                ):
                    name = func.attr
            elif isinstance(func, ast.Name) and imported.get(func.id) in DELETING:
                name = imported[func.id][1]
            if name:
                found.append((node.lineno, function, name))
        for child in ast.iter_child_nodes(node):
            visit(child, function)

    visit(tree, "<module>")
    return found


def test_the_scan_finds_every_way_to_delete():
    source = (
        "import os, shutil\nfrom shutil import rmtree as gone\nfrom pathlib import Path\n"
        "def f(p):\n    shutil.rmtree(p)\n    os.remove(p)\n    Path(p).unlink()\n    p.rename('x')\n"
        "    os.replace(p, 'x')\n    p.replace('x')\n    gone(p)\n    'a'.replace('a', 'b')\n"
    )
    assert [name for _, _, name in destructive_calls(source)] == [
        "rmtree", "remove", "unlink", "rename", "replace", "replace", "rmtree"
    ]  # fmt: skip


def test_the_package_deletes_only_through_discard():
    """Every delete goes through `files.discard`, which checks the project made what it deletes (issue 38)."""
    package = Path(sftkey_trl.__file__).parent
    outside = []
    for path in sorted(package.rglob("*.py")):
        for line, function, name in destructive_calls(path.read_text()):
            if path.name == "files.py" and path.parent == package and name in FILES_PY.get(function, set()):
                continue
            outside.append(f"{path.relative_to(package.parent)}:{line} ({function}) calls {name}")
    assert not outside, "delete through sftkey_trl.files.discard:\n" + "\n".join(outside)


def test_discard_deletes_only_what_this_project_made(tmp_path):
    ours, theirs, other = tmp_path / "ours", tmp_path / "theirs", tmp_path / "other"
    mark_folder(ours, "stage")
    mark_folder(other, "run")
    (theirs / "data").mkdir(parents=True)
    (tmp_path / "link").symlink_to(ours)
    for path, words in [(theirs, "did not create"), (other, "the output folder of an sftkey-trl run"),
                        (tmp_path / "link", "a symbolic link"), (theirs / "data", "did not create")]:  # fmt: skip
        with pytest.raises(SFTKeyError, match=f"refusing to delete {path}: .*{words}.*nothing was deleted") as error:
            discard(ours, path, kinds=["stage"])
        assert "\n" not in str(error.value)
        assert ours.is_dir() and path.exists()  # all checked before any deletion
    discard(ours, tmp_path / "missing", kinds=["stage"])
    assert not ours.exists() and theirs.is_dir() and other.is_dir()
    (other / "results.json").write_text("{}")
    discard(other / "results.json", kinds=["run"])  # a file in a folder of the kind
    assert not (other / "results.json").exists()


def test_set_aside_renames_and_never_overwrites(tmp_path, monkeypatch):
    monkeypatch.setattr(time, "strftime", lambda *args: "20260101-000000")
    path = tmp_path / "manifest.json"
    path.write_text("{trunc")
    moved = set_aside(path, "cannot be read")
    assert (
        not path.exists() and moved.read_text() == "{trunc" and moved.name == "manifest.json.corrupt-20260101-000000"
    )
    path.write_text("{again")
    with pytest.raises(SFTKeyError, match="cannot be read and .*corrupt-20260101-000000 exists already"):
        set_aside(path, "cannot be read")
    assert path.read_text() == "{again" and moved.read_text() == "{trunc"


def test_a_folder_made_for_a_block_goes_only_if_the_block_left_it_empty(tmp_path):
    with created_for(tmp_path / "a" / "b") as folder:
        assert folder.is_dir()
    assert list(tmp_path.iterdir()) == []  # both levels it made, left empty
    with created_for(tmp_path / "a" / "b") as folder:
        (folder / "results.json").write_text("{}")
    assert (tmp_path / "a" / "b" / "results.json").exists()
    (tmp_path / "mine").mkdir()
    with created_for(tmp_path / "mine"):
        pass
    assert (tmp_path / "mine").is_dir()  # not made by the block: stays, empty or not


def test_a_delete_killed_midway_leaves_a_folder_the_gate_still_knows(tmp_path, monkeypatch):
    import shutil

    folder = tmp_path / "stage"
    mark_folder(folder, "stage")
    for name in ("a", "b", "c"):
        (folder / name).mkdir()
        (folder / name / "weights").write_text("w")
    real, calls = shutil.rmtree, []

    def killed(path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the process dies while deleting
        real(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        discard(folder, kinds=["stage"])
    assert folder_marker(folder)["kind"] == "stage"  # still this project's: the rerun may finish the job
    monkeypatch.setattr(shutil, "rmtree", real)
    discard(folder, kinds=["stage"])
    assert not folder.exists()
