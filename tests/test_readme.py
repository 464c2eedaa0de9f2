"""The README's claims hold: every file it names exists, its quick-start commands are what CI runs, and its
cheap example commands (inspect, dry run) run as written."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys

import pytest
from conftest import ROOT

README = (ROOT / "README.md").read_text()
COMMANDS = [
    line.strip()
    for block in re.findall(r"```bash\n(.*?)```", README, re.S)
    for line in block.replace("\\\n", " ").splitlines()
    if line.strip() and not line.strip().startswith("#")
]


def test_named_files_exist():
    paths = set(re.findall(r"(?:recipes|accelerate_configs|benchmarks|scripts|docs|tests)/[\w./-]+\.(?:py|yaml|sh|md)",
                           README))  # fmt: skip
    assert paths
    missing = [p for p in paths if "<" not in p and not (ROOT / p).exists()]
    assert not missing, missing


def test_quick_start_is_what_ci_runs():
    assert "pip install -r requirements.txt && accelerate launch recipes/run.py" in README
    ci = (ROOT / ".ci/run").read_text()
    assert "python -m pytest" in README and "python -m pytest" in ci and "requirements.txt" in ci


CHEAP = [c for c in COMMANDS if c.startswith("python recipes/run.py") and ("--inspect" in c or "--dry_run" in c)]


@pytest.mark.parametrize("command", CHEAP)
def test_readme_example_runs(command, tmp_path):
    args = shlex.split(command.split("#")[0])[1:]
    args = [str(tmp_path / "my.jsonl") if a == "my.jsonl" else a for a in args]
    (tmp_path / "my.jsonl").write_text('{"question": "Compute 1 + 1.", "reasoning": "1 + 1 = 2", "answer": "2"}\n')
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip()


def test_there_are_cheap_examples():
    assert len(CHEAP) >= 2
