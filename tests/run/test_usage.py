"""`--help` of both entry points: this project's flags and keys first, with the dataclasses' defaults, exit 0."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import ROOT

from sftkey_trl.run.cli import main
from sftkey_trl.run.comparison import run_comparison


def test_run_help_shows_the_projects_flags_first_and_exits_0(capsys):
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    first = "\n".join(text.splitlines()[:60])
    for flag in ("--config", "--dry_run", "--inspect", "--json", "--eval_only", "--checkpoint", "--merge", "--debug"):
        assert flag in first, flag
    assert len(text.splitlines()) < 200  # not TRL's 950 lines of keys: those are behind --help-all


def test_run_help_shows_the_documented_defaults_not_the_demo_recipes(capsys):
    """The demo recipe sets eval_batch_size 100 and max_new_tokens 64; the help gives the keys' own defaults."""
    main(["--help"])
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("--")}
    assert lines["--eval_batch_size"].endswith("[32]") and lines["--max_new_tokens"].endswith("[512]")
    main(["-h"])
    text = capsys.readouterr().out
    for key in ("loss_on", "key_weight", "reasoning_weight", "context", "keep_best", "patience", "stages"):
        assert key in text, key


def test_help_all_lists_every_trl_key(capsys):
    assert main(["--help-all"]) == 0
    text = capsys.readouterr().out
    assert "--learning_rate" in text and "--lora_r" in text and "--max_length" in text


def test_compare_help_lists_the_variants_and_the_default_seeds(capsys):
    from sftkey_trl.run.variants import DEFAULT_VARIANTS, VARIANT_NAMES

    assert run_comparison(["--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "[3]" in text and "recipe key" in text
    assert all(name in text for name in VARIANT_NAMES)
    assert all(f"{name} *" in text for name in DEFAULT_VARIANTS)


@pytest.mark.slow
@pytest.mark.parametrize(("script", "flag"), [("recipes/run.py", "--dry_run"), ("recipes/compare.py", "--seeds")])
def test_the_scripts_help_exits_0_with_no_library_noise(script, flag):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, cwd=ROOT, env=env)
    assert done.returncode == 0 and flag in done.stdout
    assert done.stderr == "", done.stderr
