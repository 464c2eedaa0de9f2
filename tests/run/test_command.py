"""The `sftkey-trl` command: its subcommands are the scripts' modes, `python -m sftkey_trl` runs it, and a wheel of
the package carries it and the demo recipe, so that an installed package runs the demo with no checkout."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import ROOT

from sftkey_trl.run.command import SUBCOMMANDS, run_command


def test_usage_lists_every_subcommand(capsys):
    assert run_command([]) == 0
    text = capsys.readouterr().out
    assert all(f"  {name} " in text for name in SUBCOMMANDS)
    assert {"train", "compare", "inspect", "merge"} <= set(SUBCOMMANDS)


def test_an_unknown_subcommand_is_one_line(capsys):
    with pytest.raises(SystemExit) as exit_:
        run_command(["trian"])
    assert exit_.value.code == 2
    known = ", ".join(SUBCOMMANDS)
    assert capsys.readouterr().err == f"error: unknown command `trian` (did you mean `train`?); use one of {known}\n"


def test_a_subcommand_is_the_scripts_mode(monkeypatch):
    """`check`, `inspect N`, `eval` and `merge STAGE` reach run.py's main as its flags; `compare`, compare.py's."""
    from sftkey_trl.run import cli, comparison

    calls = []
    monkeypatch.setattr(cli, "main", lambda argv, as_program, prog: calls.append((argv, as_program, prog)) or 0)
    monkeypatch.setattr(comparison, "run_comparison", lambda argv, as_program, prog: calls.append((argv, prog)) or 0)
    run_command(["check", "--config", "r.yaml"])
    run_command(["inspect", "3", "--json"])
    run_command(["merge", "key", "--merge_dir", "out"])
    run_command(["train", "--learning_rate", "1e-4"])
    run_command(["compare", "--seeds", "1"])
    assert calls == [
        (["--dry_run", "--config", "r.yaml"], True, "sftkey-trl check"),
        (["--inspect", "3", "--json"], True, "sftkey-trl inspect"),
        (["--merge", "key", "--merge_dir", "out"], True, "sftkey-trl merge"),
        (["--learning_rate", "1e-4"], True, "sftkey-trl train"),
        (["--seeds", "1"], "sftkey-trl compare"),
    ]


def test_the_packages_list_names_every_package_folder():
    """pyproject lists the packages (the recipes folder is mapped into them): a new subpackage must be listed."""
    from setuptools.config.pyprojecttoml import read_configuration

    tool = read_configuration(ROOT / "pyproject.toml")["tool"]["setuptools"]
    folders = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "sftkey_trl").rglob("__init__.py")}
    assert set(tool["packages"]) == folders | {"sftkey_trl.recipes"}
    assert tool["package-dir"] == {"sftkey_trl.recipes": "recipes"}


@pytest.mark.slow
def test_an_installed_wheel_runs_the_demo_check_from_anywhere(tmp_path):
    """Built as a wheel and installed (no dependencies: they are this machine's), the package carries the console
    command and the demo recipe: `sftkey-trl check` with no --config, run outside any checkout, checks the demo."""
    wheels, target, elsewhere = tmp_path / "wheels", tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-w", str(wheels)], check=True)
    wheel = next(wheels.glob("sftkey_trl-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "sftkey_trl/recipes/demo/sftkey_tiny.yaml" in names and "sftkey_trl/__main__.py" in names
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert re.search(r"^sftkey-trl = sftkey_trl\.run\.command:run_command$", entry_points, re.M)
    subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)], check=True)
    env = {**os.environ, "PYTHONPATH": str(target), "HF_HUB_OFFLINE": "1"}
    command = [str(target / "bin" / "sftkey-trl"), "check", "--output_dir", str(tmp_path / "out")]
    done = subprocess.run(command, capture_output=True, text=True, cwd=elsewhere, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "every check passed" in done.stdout
    assert str(Path(target / "sftkey_trl" / "recipes" / "demo" / "sftkey_tiny.yaml")) in done.stdout


@pytest.mark.slow
def test_python_dash_m_runs_the_command():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "sftkey_trl", "--help"], capture_output=True, text=True, env=env)
    assert done.returncode == 0 and "commands:" in done.stdout
