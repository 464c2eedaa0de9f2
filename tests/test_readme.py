"""The README's claims hold: every file it names exists, its quick-start commands are what CI runs, and its
cheap example commands (inspect, dry run) run as written."""

from __future__ import annotations

import json
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


def test_what_users_read_points_at_docs_that_exist():
    """Console lines and recipe comments send users to a page and section (`docs/results.md: Guide`, "the README's
    Guide"): each page exists and holds the section. The README's reference sections moved to docs/, and pointers to
    `README: Guide` outlived them."""
    sources = [
        *(ROOT / "sftkey_trl").rglob("*.py"),
        *(ROOT / "recipes").rglob("*.py"),
        *(ROOT / "recipes").rglob("*.yaml"),
    ]
    pages = {page: (ROOT / page).read_text() if (ROOT / page).exists() else None for page in ["README.md"]}
    stale = []
    for source in sources:
        text = re.sub(r"\s+", " ", source.read_text())
        for page, section in re.findall(r"(README|docs/[\w-]+\.md)(?::| section) ([A-Z][\w -]*?)[)\],.]", text):
            page = "README.md" if page == "README" else page
            if page not in pages:
                pages[page] = (ROOT / page).read_text() if (ROOT / page).exists() else None
            headings = re.findall(r"^#+ (.*)$", pages[page] or "", re.M)
            if not any(heading.startswith(section.strip()) for heading in headings):
                stale.append(f"{source.relative_to(ROOT)}: {page}: {section}")
        if re.search(r"the README's guide", text, re.I):
            stale.append(f"{source.relative_to(ROOT)}: the README's guide")
    assert not stale, stale


def test_quick_start_is_what_ci_runs():
    """CI runs the README's quick-start lines verbatim and installs nothing else."""
    quick_start = [c.split("#")[0].strip() for c in COMMANDS[:2]]
    demo = "accelerate launch -q --config_file accelerate_configs/single_gpu.yaml recipes/run.py"
    assert quick_start == [f"pip install -r requirements.txt && {demo}", "python -m pytest"]
    ci_lines = [line.strip() for line in (ROOT / ".ci/run").read_text().splitlines()]
    assert all(line in ci_lines for line in quick_start)
    installs = [line for line in ci_lines if "pip install" in line]
    assert installs == [quick_start[0]], installs


def test_requirements_pin_the_tested_torch():
    """An unpinned torch pulls PyPI's multi-GB CUDA build on a CPU machine; the tested version must be pinned."""
    lines = [line.split("#")[0].strip() for line in (ROOT / "requirements.txt").read_text().splitlines()]
    assert "torch==2.13.0" in lines
    assert "https://download.pytorch.org/whl/cpu" in README


CHEAP = [c for c in COMMANDS if c.startswith("python recipes/run.py") and ("--inspect" in c or "--dry_run" in c)]
# The "Your own data" section's example rows: the `my.jsonl` its commands read
EXAMPLE_ROWS = re.findall(r"```jsonl\n(.*?)```", README, re.S)


def test_the_example_rows_are_valid_rows():
    assert len(EXAMPLE_ROWS) == 1
    rows = [json.loads(line) for line in EXAMPLE_ROWS[0].splitlines()]
    assert rows and all(set(row) == {"question", "reasoning", "answer"} for row in rows)


@pytest.mark.slow
@pytest.mark.parametrize("command", CHEAP)
def test_readme_example_runs(command, tmp_path):
    args = shlex.split(command.split("#")[0])[1:]
    args = [str(tmp_path / "my.jsonl") if a == "my.jsonl" else a for a in args]
    (tmp_path / "my.jsonl").write_text(EXAMPLE_ROWS[0])
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip()


def test_there_are_cheap_examples():
    assert len(CHEAP) >= 2
