"""benchmarks/bench_detached.py runs at a tiny size and reports tokens/s and peak memory for each key stage."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from conftest import ROOT


@pytest.mark.slow
def test_bench_detached_reports_ratios(tmp_path):
    out = tmp_path / "bench.json"
    command = [sys.executable, str(ROOT / "benchmarks/bench_detached.py"), "--steps", "2", "--repeats", "1",
               "--batch", "2", "--hidden_size", "32", "--layers", "1", "--reasoning_steps", "3", "--no_warmup",
               "--json", str(out)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    table = [line.split() for line in done.stdout.splitlines()]
    rows = {cells[0]: cells[1:] for cells in table if len(cells) == 5}  # kind, tokens/s, ratio, peak MiB, ratio
    for kind in ("ordinary", "ordinary-no-part-losses", "detached"):
        assert float(rows[kind][0].replace(",", "")) > 0 and float(rows[kind][2]) >= 0, rows
    assert rows["ordinary"][1] == "1.00" and rows["ordinary"][3] == "1.00"
    assert re.search(r"^detached / ordinary: [\d.]+x tokens/s, [\d.]+x peak memory$", done.stdout, re.M)
    summary = json.loads(out.read_text())
    assert summary["detached"]["speed_ratio"] > 0 and summary["tokens_per_row"] > summary["key_tokens_per_row"] > 0
    assert len(summary["detached"]["runs"]) == 1
