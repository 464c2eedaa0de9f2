"""`--dry_run` refuses every recipe a real run refuses before loading the model, and every training row a real run
refuses before training, with the same one line: each refusal is run both ways on the tiny demo recipe, the dry run
in this process and the real run as `recipes/run.py` in a separate `sys.executable` process (one process for all
cases, each case run as the program `recipes/run.py` is, so the import of the ML stack is paid once)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest
from conftest import ROOT

from sftkey_trl.run import cli

DEMO = str(ROOT / "recipes/demo/sftkey_tiny.yaml")
TWO_STAGES = "[{name: sft, loss_on: completion, %s}, {name: key, loss_on: key}]"
FSDP = {"ACCELERATE_USE_FSDP": "true"}
# (name, command-line keys over the demo recipe, environment of the launch, the error line's pattern)
CASES = [
    ("stage_push_key", ["--stages", TWO_STAGES % "push_to_hub: true"], {}, r"stage `sft` sets `push_to_hub`.*top"),
    ("unknown_hub_stage", ["--push_to_hub", "true", "--hub_stage", "nope"], {}, r"`hub_stage: nope` is not a stage"),
    ("hub_strategy", ["--push_to_hub", "true", "--hub_strategy", "checkpoint"], {}, r"remove `hub_strategy`$"),
    ("no_token", ["--push_to_hub", "true"], {}, r"`push_to_hub: true` needs a Hugging Face token"),
    ("key_weight", ["--stages", TWO_STAGES % "key_weight: 0.5"], {}, r"`key_weight: 0.5` is not valid: .*to 100$"),
    ("context", ["--stages", "[{name: k, loss_on: key, context: frozen}]"], {}, r"`context: frozen` is not valid"),
    ("zero3_json", ["--deepspeed", "{ds}"], {}, r"ZeRO-3 without `zero3_save_16bit_model: true`"),
    ("fsdp_8bit", ["--use_peft", "true", "--load_in_8bit", "true"], FSDP, r"`load_in_8bit` cannot be sharded by"),
    ("fsdp_qlora_fp16", ["--use_peft", "true", "--load_in_4bit", "true", "--dtype", "float16"], FSDP, r"float16 w"),
    ("global_batch", ["--per_device_train_batch_size", "4", "--global_batch_size", "10"], {}, r"not a multiple of"),
    ("demo_model", ["--model_name_or_path", "demo:huge"], {}, r"`model_name_or_path: demo:huge` is not a known"),
    ("local_model", ["--model_name_or_path", "local:no"], {}, r"`model_name_or_path: local:no` is not a known"),
    ("plain_empty_tag", ["--response_format", "plain", "--thinking_open", ""], {}, r"`thinking_open` is empty"),
    ("router_dense", ["--router_aux_loss_coef", "0.1"], {}, r"`router_aux_loss_coef: 0.1` .* \(llama\) has no router"),
    ("lora_task_type", ["--use_peft", "true", "--lora_task_type", "SEQ_CLS"], {}, r"`lora_task_type: SEQ_CLS` is not"),
    ("lora_parameters", ["--use_peft", "true", "--lora_target_parameters", "mlp.down_proj"], {}, r"`lora_dropout: 0`"),
]
if importlib.util.find_spec("vllm") is None:  # otherwise vllm is there and the recipe is fine
    CASES.append(("vllm_missing", ["--eval_backend", "vllm"], {}, r"`eval_backend: vllm` needs vllm"))

# Runs each case as `python recipes/run.py ...` would (argv from sys.argv, the program's process set-up), in turn;
# records the exit status, the `error:` lines, and whether the run got as far as the pipeline (which loads the
# tokenizer, the data and the model) or wrote into its output folder
DRIVER = """
import contextlib, io, json, os, runpy, sys
from pathlib import Path
cases, results = json.loads(sys.argv[1]), {}
for name, argv, env, out in cases:
    saved = dict(os.environ)
    os.environ.update(env)
    if sys.modules.get("bitsandbytes", 0) is None:  # hidden by the previous case's set-up, not by this one's
        del sys.modules["bitsandbytes"]
    sys.argv, err, code = ["recipes/run.py", *argv], io.StringIO(), 0
    try:
        with contextlib.redirect_stderr(err):
            runpy.run_path("recipes/run.py", run_name="__main__")
    except SystemExit as exit_:
        code = exit_.code
    os.environ.clear()
    os.environ.update(saved)
    errors = [line for line in err.getvalue().splitlines() if line.startswith(("error:", "Traceback"))]
    wrote = Path(out).exists() and any(Path(out).iterdir())
    results[name] = [code, errors, "sftkey_trl.run.pipeline" in sys.modules or wrote]
print("RESULTS " + json.dumps(results))
"""


def arguments(tmp_path, name: str, extra: list[str]) -> list[str]:
    extra = [item.replace("{ds}", str(tmp_path / "zero3.json")) for item in extra]
    return ["--config", DEMO, "--output_dir", str(tmp_path / name), *extra]


@pytest.fixture()
def real_run_env(tmp_path, monkeypatch) -> dict:
    """The real run's environment, and this process's: no Hugging Face token anywhere (HF_TOKEN unset, HF_HOME an
    empty folder), this checkout's code; plus the DeepSpeed JSON the `zero3_json` case names."""
    (tmp_path / "hf_home").mkdir()
    (tmp_path / "zero3.json").write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_TOKEN_PATH", str(tmp_path / "hf_home" / "token"))
    env = {key: value for key, value in os.environ.items() if key != "HF_TOKEN"}
    return {**env, "HF_HOME": str(tmp_path / "hf_home"), "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}


@pytest.mark.slow
def test_dry_run_and_real_run_refuse_alike(tmp_path, real_run_env, monkeypatch, capsys):
    dry = {}
    for name, extra, env, pattern in CASES:
        with monkeypatch.context() as patch:
            for key, value in env.items():
                patch.setenv(key, value)
            with pytest.raises(SystemExit) as exit_:
                cli.main([*arguments(tmp_path, name, extra), "--dry_run"])
        err = capsys.readouterr().err.strip()
        assert exit_.value.code == 2 and re.search(pattern, err), (name, exit_.value.code, err)
        assert err.startswith("error: ") and "\n" not in err, (name, err)
        dry[name] = err
    cases = [(name, arguments(tmp_path, name, extra), env, str(tmp_path / name)) for name, extra, env, _ in CASES]
    command = [sys.executable, "-c", DRIVER, json.dumps(cases)]
    run = subprocess.run(command, cwd=ROOT, env=real_run_env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(run.stdout.split("RESULTS ", 1)[1])
    for name, *_ in CASES:
        code, errors, reached = results[name]
        assert (code, errors) == (2, [dry[name]]), (name, code, errors, dry[name])
        assert not reached, f"{name}: the real run reached the pipeline before refusing the recipe"


def test_checking_never_changes_the_recipe_resolving_does(tmp_path, monkeypatch):
    """QLoRA under FSDP: `check_recipe` leaves the dtypes as parsed; `resolve_recipe` (which both paths call
    first) sets them, and the dry run shows the resolved values and the change."""
    import yaml

    from sftkey_trl.recipe.checks import check_recipe, resolve_recipe
    from sftkey_trl.recipe.dryrun import dry_run
    from sftkey_trl.recipe.parsing import parse_config

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    argv = arguments(tmp_path, "qlora", ["--use_peft", "true", "--load_in_4bit", "true", "--dtype", "auto"])
    recipe = parse_config(argv)
    parsed = dataclasses.asdict(recipe.model)
    check_recipe(recipe, [1])
    assert dataclasses.asdict(recipe.model) == parsed
    fixes = resolve_recipe(recipe)
    assert fixes == ["bnb_4bit_quant_storage: uint8 -> bfloat16", "dtype: auto -> bfloat16"]
    report = yaml.safe_load(dry_run(*cli.load_checked_recipe(argv, dry_run=True)))
    model = report["settings"]["model"]
    assert model["dtype"] == "bfloat16" == model["bnb_4bit_quant_storage"]
    assert set(fixes) <= set(report["notes"])


GOOD = {"question": "Compute 1 + 1.", "reasoning": "1 + 1 = 2", "answer": "2"}
OWN_DATA = ["--eval_fraction", "0", "--select_on_test", "true"]  # every row trains; the demo's test split evaluates
# (name, training rows, command-line keys, the error line's pattern): each a row check of `check_training_rows`
DATA_CASES = [
    ("contains_tags", [GOOD, {**GOOD, "answer": "<Answer>2</Answer>"}, GOOD], [],
     r"1 of 3 training rows are invalid: contains_tags x1 \(rows 1\); fix the data or set `on_invalid: skip`"),
    ("tags_everywhere", [{**GOOD, "reasoning": "<Thinking>1 + 1 = 2</Thinking>"}] * 2, ["--on_invalid", "skip"],
     r"2 of 2 training rows are invalid: contains_tags x2 \(rows 0, 1\), so no row is left to train on"),
    ("empty_answer", [GOOD, {**GOOD, "answer": ""}], [], r"1 of 2 training rows are invalid: empty_answer x1"),
    ("unknown_characters", [GOOD, {**GOOD, "question": "Compute ½ + ½."}], [],
     r"1 of 2 training rows are invalid: unknown_characters x1 \(rows 1\)"),
    ("key_truncated", [GOOD, {**GOOD, "reasoning": "1 + 1 = 2. " * 12}, GOOD], ["--max_length", "120"],
     r"1 of 3 training rows are invalid: key_truncated x1 \(rows 1\)"),
]  # fmt: skip


@pytest.fixture()
def no_progress_bars():
    """The error line is the dry run's whole stderr: `datasets` draws no progress bars there."""
    import datasets

    was_enabled = not datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    yield
    if was_enabled:
        datasets.enable_progress_bars()


@pytest.mark.slow
def test_dry_run_and_real_run_refuse_the_same_training_rows_alike(
    tmp_path, real_run_env, tiny_model_dir, no_progress_bars, capsys
):
    """A row a real run refuses before training (as the one a user met: `<Answer>` tags in the data, which passed
    `--dry_run`) is refused by `--dry_run` with the same line."""
    cases, dry = [], {}
    for name, rows, extra, pattern in DATA_CASES:
        data = tmp_path / f"{name}.jsonl"
        data.write_text("".join(json.dumps(row) + "\n" for row in rows))
        argv = arguments(tmp_path, name, ["--dataset_name", str(data), *OWN_DATA, *extra])
        with pytest.raises(SystemExit) as exit_:
            cli.main([*argv, "--dry_run"])
        err = capsys.readouterr().err.strip()
        assert exit_.value.code == 2 and re.search(pattern, err) and "\n" not in err, (name, exit_.value.code, err)
        dry[name] = err
        cases.append((name, argv, {}, str(tmp_path / name)))
    command = [sys.executable, "-c", DRIVER, json.dumps(cases)]
    run = subprocess.run(command, cwd=ROOT, env=real_run_env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(run.stdout.split("RESULTS ", 1)[1])
    for name, *_ in DATA_CASES:
        code, errors, _ = results[name]
        assert (code, errors) == (2, [dry[name]]), (name, code, errors, dry[name])
        assert not (tmp_path / name).exists(), f"{name}: the real run wrote before refusing the data"


def test_dry_run_says_what_the_row_checks_found(tmp_path, tiny_model_dir, no_progress_bars, capsys):
    import yaml

    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in [GOOD, {**GOOD, "answer": "<Answer>2</Answer>"}, GOOD]))
    argv = [
        *arguments(tmp_path, "skip", ["--dataset_name", str(data), *OWN_DATA, "--on_invalid", "skip"]),
        "--dry_run",
    ]
    assert cli.main(argv) == 0
    notes = yaml.safe_load(capsys.readouterr().out)["notes"]
    found = next(note for note in notes if note.startswith("training rows:"))
    assert found.startswith("training rows: 2 of 3 pass every check a real run applies (the adapter's, no response")
    assert found.endswith("; skipped, as `on_invalid: skip` says: contains_tags x1 (rows 1)")
