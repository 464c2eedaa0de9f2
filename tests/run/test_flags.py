"""Every flag of both entry points, `recipes/run.py` (`cli.main`) and `recipes/compare.py` (`run_comparison`): a
value of the wrong type or range, or a flag without the one it applies to, is one `error:` line and exit status 2,
before any model or data is loaded; never argparse's usage text, a traceback or a silent exit 0. A bounded fuzz over
the flags (types, ranges, combinations) holds the same: exit 0 or one line."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sftkey_trl.run import cli
from sftkey_trl.run.comparison import run_comparison

ROOT = Path(__file__).resolve().parents[2]


class Reached(Exception):
    """What a stub raises where the entry point would load a model or data: every check passed."""


@pytest.fixture()
def stubs(monkeypatch):
    """The places where work starts are stubs: reaching one means the flags were accepted."""

    def reached(*args, **kwargs):
        raise Reached()

    monkeypatch.setattr("sftkey_trl.run.pipeline.Pipeline", reached)
    monkeypatch.setattr(cli, "inspect", reached)
    monkeypatch.setattr(cli, "export", reached)
    monkeypatch.setattr("sftkey_trl.recipe.dryrun.dry_run", reached)
    monkeypatch.setattr("sftkey_trl.data.checks.check_local_data", lambda *args: [])
    monkeypatch.setattr("sftkey_trl.run.variants.run_variant", reached)


def outcome(entry, argv: list[str], capsys) -> tuple[int | None, list[str]]:
    """(exit status, or None where the work would start; stderr's non-empty lines)."""
    try:
        code = entry(argv)
    except Reached:
        code = None
    except SystemExit as exit_:
        code = exit_.code
    return code, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def refused(entry, argv: list[str], capsys) -> str:
    code, lines = outcome(entry, argv, capsys)
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (code, lines[-5:])
    return lines[0]


RUN_CASES = [
    (["--inspect", "x"], r"`--inspect x` has the wrong type; give a whole number$"),
    (["--inspect"], r"`--inspect`: expected one argument"),
    (["--inspect", "0"], r"`--inspect 0`: give the number of examples to show, at least 1"),
    (["--inspect", "-3"], r"`--inspect -3`: give the number"),
    (["--json"], r"`--json` only applies with `--inspect`"),
    (["--json", "--dry_run"], r"`--json` only applies with `--inspect`"),
    (["--checkpoint", "."], r"`--checkpoint` only applies with `--eval_only`"),
    (["--merge_dir", "merged"], r"`--merge_dir` only applies with `--merge`"),
    (["--eval_only", "--merge", "key"], r"--eval_only and --merge are separate modes of run.py"),
    (["--dry_run", "--inspect", "2"], r"--inspect and --dry_run are separate modes"),
    (["--dry_run", "--eval_only"], r"--eval_only and --dry_run are separate modes"),
    (["--eval_only", "--checkpoint", "no/such/folder"], r"`--checkpoint no/such/folder` is not a folder"),
    (["--merge", " "], r"`--merge` needs the name of the stage"),
    (["--insp", "2"], r"unknown command-line option `--insp`"),  # never read as an abbreviation of --inspect
    (["--learning_rate", "abc"], r"`--learning_rate abc` has the wrong type; give a number$"),
    (["--num_train_epochs"], r"`--num_train_epochs`: expected one argument"),
    (["--learning_rate", "1", "2"], r"`2` on the command line belongs to no `--key`"),
    (["stray"], r"`stray` on the command line belongs to no `--key`"),
    (["--bf16", "maybe"], r"`--bf16`: Truthy value expected: got maybe"),
    (["--lr_scheduler_type", "sometimes"], r"`--lr_scheduler_type`: invalid choice: 'sometimes'"),
    (["--stages", "[{name: a"], r"`--stages` is not valid YAML at line 1"),
    (["--stages", "[{name: a, name: b}]"], r"`--stages`: key `name` is given twice \(lines 1 and 1\)"),
    (["--stages", "[{name: a}]", "--stages", "[{name: b}]"], r"`--stages` is given twice on the command line"),
    (["--resume_from_checkpoint", "x"], r"`resume_from_checkpoint: x` is not supported: SFTKey resumes"),
    (["--stages", "[{name: a, max_length: 64}]"], r"stage `a`: `max_length` cannot be set in a stage \(the data"),
    (["--stages", "[{name: a, eos_token: x}]"], r"stage `a`: `eos_token` cannot be set in a stage"),
    (["--stages", "[{name: a, output_dir: x}]"], r"stage `a`: `output_dir` cannot be set in a stage"),
]


@pytest.mark.parametrize("argv, message", RUN_CASES, ids=[" ".join(argv) for argv, _ in RUN_CASES])
def test_run_py_flags_are_one_line_before_anything_loads(stubs, capsys, tmp_path, argv, message):
    line = refused(cli.main, [*argv, "--output_dir", str(tmp_path / "out")], capsys)
    assert re.search(message, line), line


def test_a_checkpoint_folder_is_accepted_with_eval_only(stubs, capsys, tmp_path):
    assert outcome(cli.main, ["--eval_only", "--checkpoint", str(tmp_path)], capsys)[0] is None


COMPARE_CASES = [
    (["--seeds", "0"], r"`--seeds 0`: give the number of seeds to run, at least 1"),
    (["--seeds", "-2"], r"`--seeds -2`: give the number of seeds"),
    (["--seeds", "two"], r"`--seeds two` has the wrong type; give a whole number"),
    (["--metric", "acuracy"], r"`--metric acuracy` cannot rank the comparison \(did you mean `accuracy`\?\)"),
    (["--metric", "mean_generated_tokens"], r"`--metric mean_generated_tokens` cannot rank"),  # lower is better
    (["--metric", "lenient_accuracy"], r"`--metric lenient_accuracy` cannot rank"),  # not in the tables
    (["--variants", ""], r"`--variants` is empty"),
    (["--variants", "sft,,key_tag"], r"`--variants sft,,key_tag` has an empty name"),
    (["--variants", "sft,sft"], r"`--variants` names `sft` twice"),
    (["--variants", "sft,nope"], r"unknown variant `nope`"),
    (["--converged", "0"], r"`--converged 0`: give the patience in evaluations, at least 1"),
    (["--converged", "-1"], r"`--converged -1`"),
    (["--converged_epochs", "3"], r"`--converged_epochs` only applies with `--converged`"),
    (["--converged", "2", "--converged_epochs", "-1"], r"`--converged_epochs -1`: give the epoch cap, above 0"),
    (["--converged", "2", "--converged_epochs", "nan"], r"`--converged_epochs nan`: give the epoch cap"),
    (["--seed", "3"], r"compare.py runs the seeds 0 to N-1 of `--seeds N`; remove `--seed`"),  # was read as --seeds
    (["--json"], r"`--json` is a flag of recipes/run.py, not compare.py"),
    (["--learning_rate", "fast"], r"`--learning_rate fast` has the wrong type; give a number"),
]


@pytest.mark.parametrize("argv, message", COMPARE_CASES, ids=[" ".join(argv) for argv, _ in COMPARE_CASES])
def test_compare_py_flags_are_one_line_before_anything_trains(stubs, capsys, tmp_path, argv, message):
    line = refused(run_comparison, [*argv, "--output_dir", str(tmp_path / "out")], capsys)
    assert re.search(message, line), line


@pytest.mark.slow
def test_a_recipe_that_is_not_utf8_is_one_line_from_the_program(tmp_path):
    """The process set-up read the recipe first (to see whether it quantises) and raised UnicodeDecodeError."""
    recipe = tmp_path / "latin1.yaml"
    recipe.write_bytes(b"model_name_or_path: demo:tiny-llama\n# caf\xe9\n")
    env = {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    for script in ("recipes/run.py", "recipes/compare.py"):
        done = subprocess.run([sys.executable, script, "--config", str(recipe)], capture_output=True, text=True,
                              cwd=ROOT, env=env, timeout=300)  # fmt: skip
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        assert done.returncode == 2 and lines[-1:] == [
            f"error: recipe `{recipe}` is not UTF-8 text (byte 0xe9 on line 2); save it as UTF-8"
        ], done.stderr[-2000:]


# --- the fuzz: both entry points' flags drawn together ---------------------------------------------------------

FUZZ = settings(max_examples=80, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])  # fmt: skip
NUMBERS = st.one_of(st.integers(-3, 4).map(str), st.sampled_from(["x", "", "1.5", "nan", "inf", "-0", "1e3"]))
FOLDERS = st.sampled_from([".", "no/such/folder", "recipes", "README.md"])


def flag(name: str, values=None) -> st.SearchStrategy[list[str]]:
    return st.just([name]) if values is None else values.map(lambda value: [name, value])


RUN_FLAGS = [
    flag("--inspect", NUMBERS), flag("--json"), flag("--eval_only"), flag("--checkpoint", FOLDERS),
    flag("--dry_run"), flag("--merge", st.sampled_from(["sft", "key", "", "nope"])), flag("--merge_dir", FOLDERS),
    flag("--learning_rate", NUMBERS), flag("--num_train_epochs", NUMBERS), flag("--max_length", NUMBERS),
    st.sampled_from([["stray"], ["-x"], ["--"], ["--dry_run=1"]]),
    flag("--bf16", st.sampled_from(["true", "false", "maybe", "1"])), flag("--stages", st.sampled_from(
        ["[{name: a}]", "[{name: a", "[]", "[{name: a, max_length: 8}]", "{name: a}", "[{name: a, name: a}]"])),
]  # fmt: skip
COMPARE_FLAGS = [
    flag("--seeds", NUMBERS), flag("--metric", st.sampled_from(["accuracy", "composite", "nope", "num_examples"])),
    flag("--variants", st.sampled_from(["sft", "sft,sft_tag", "", ",", "sft,sft", "nope"])),
    flag("--converged", NUMBERS), flag("--converged_epochs", NUMBERS), flag("--seed", NUMBERS),
    flag("--learning_rate", NUMBERS), flag("--inspect", NUMBERS),
]  # fmt: skip


def drawn_flags(flags: list) -> st.SearchStrategy[list[str]]:
    return st.lists(st.sampled_from(range(len(flags))), max_size=4, unique=True).flatmap(
        lambda picked: st.tuples(*[flags[index] for index in picked]).map(lambda parts: sum(parts, []))
    )


@pytest.mark.slow
@FUZZ
@given(run=drawn_flags(RUN_FLAGS), compare=drawn_flags(COMPARE_FLAGS))
def test_any_flags_give_exit_0_or_one_line(stubs, capsys, tmp_path, run, compare):
    for entry, argv in ((cli.main, run), (run_comparison, compare)):
        code, lines = outcome(entry, [*argv, "--output_dir", str(tmp_path / "out")], capsys)
        assert code in (None, 0) or (code == 2 and len(lines) == 1 and lines[0].startswith("error: ")), (
            argv,
            code,
            lines[-5:],
        )
