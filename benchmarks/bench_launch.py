"""Whole-process wall time of the two ways to start a run: `accelerate launch recipes/run.py` and
`python recipes/run.py`, alternated, each from a fresh output folder. Prints the medians and their ratio.

    python benchmarks/bench_launch.py [--repeats 2] [--config recipes/demo/sftkey_tiny.yaml] [-- extra recipe keys]

On a CPU, `accelerate launch` sets OMP_NUM_THREADS=1 for its one process; `run/process.py` gives torch the cores
back, so the ratio should be close to 1 (it was 1.55 before that).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORMS = {
    "accelerate launch": [sys.executable, "-m", "accelerate.commands.launch", "recipes/run.py"],
    "python": [sys.executable, "recipes/run.py"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--config", default="recipes/demo/sftkey_tiny.yaml")
    options, extra = parser.parse_known_args()
    extra = [arg for arg in extra if arg != "--"]
    env = {key: value for key, value in os.environ.items() if key != "OMP_NUM_THREADS"}  # as on a fresh shell
    times: dict[str, list[float]] = {form: [] for form in FORMS}
    with tempfile.TemporaryDirectory() as scratch:
        for repeat in range(options.repeats):
            order = list(FORMS) if repeat % 2 == 0 else list(reversed(FORMS))  # neither form always runs first
            for form in order:
                out = Path(scratch) / f"{form.replace(' ', '_')}-{repeat}"
                command = FORMS[form] + ["--config", options.config, "--output_dir", str(out), *extra]
                start = time.perf_counter()
                subprocess.run(command, cwd=ROOT, env=env, check=True, capture_output=True)
                times[form].append(time.perf_counter() - start)
                print(f"{form:>18}: {times[form][-1]:.1f} s", flush=True)
    launched, plain = (statistics.median(times[form]) for form in FORMS)
    print(f"median wall: accelerate launch {launched:.1f} s, python {plain:.1f} s, ratio {launched / plain:.2f}")


if __name__ == "__main__":
    main()
