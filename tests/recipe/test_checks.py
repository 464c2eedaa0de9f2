"""Recipe checks on users' recipes (temporary recipe trees: <tmp>/recipes/x.yaml and <tmp>/accelerate_configs/):
each refusal stops `--dry_run` and a real run alike with one line, before anything is loaded; options without
effect are noted; the global batch is checked against the launch's process count."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from sftkey_trl.errors import SFTKeyError
from sftkey_trl.recipe.checks import check_model
from sftkey_trl.recipe.dryrun import dry_run
from sftkey_trl.run import cli

BODY = """\
model_name_or_path: Qwen/Qwen2.5-1.5B
dataset_format: gsm8k
eval_split: test
output_dir: {tmp}/outputs
activation_checkpointing: false
"""


def write_recipe(tmp_path: Path, body: str = "", header: str | None = None, name: str = "x.yaml") -> str:
    (tmp_path / "accelerate_configs").mkdir(exist_ok=True)
    (tmp_path / "accelerate_configs" / "single_gpu.yaml").write_text("num_processes: 1\n")
    (tmp_path / "accelerate_configs" / "two_gpus.yaml").write_text("num_processes: 2\n")
    (tmp_path / "recipes").mkdir(exist_ok=True)
    if header is None:
        header = (
            "# Hardware: anything\n"
            "# Launch: accelerate launch --config_file accelerate_configs/single_gpu.yaml recipes/run.py "
            f"--config recipes/{name}\n"
        )
    path = tmp_path / "recipes" / name
    given = {line.split(":")[0] for line in body.splitlines()}  # a recipe gives each key once: `body`'s replace BODY's
    base = "".join(line for line in BODY.format(tmp=tmp_path).splitlines(True) if line.split(":")[0] not in given)
    path.write_text(header + base + body)
    return str(path)


def run_dry(path: str) -> str:
    return dry_run(cli.load_checked_recipe(["--config", path], dry_run=True)[0], [])


def run_both(path: str, monkeypatch, capsys) -> tuple[str, str]:
    """The one-line errors of `--dry_run` and of a real run on the same recipe; the real run must stop before the
    pipeline (and so before any model or dataset) is loaded."""

    class NoPipeline:
        def __init__(self, *args, **kwargs):
            raise AssertionError("the real run reached the pipeline: a check that --dry_run applies did not stop it")

    monkeypatch.setattr("sftkey_trl.run.pipeline.Pipeline", NoPipeline)
    messages = []
    for flags in (["--dry_run"], []):
        with pytest.raises(SystemExit) as exit_:
            cli.main(["--config", path, *flags])
        assert exit_.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err
        messages.append(err)
    return messages[0], messages[1]


def test_dry_run_accepts_the_minimal_recipe(tmp_path):
    report = run_dry(write_recipe(tmp_path))
    assert "every check passed" in report


def test_a_users_recipe_without_header_passes_dry_run(tmp_path, capsys):
    """Header lines are this repository's convention for its own recipes, not a rule for users' recipes."""
    path = tmp_path / "elsewhere" / "mine.yaml"
    path.parent.mkdir()
    path.write_text(BODY.format(tmp=tmp_path))
    assert cli.main(["--config", str(path), "--dry_run"]) == 0
    assert "every check passed" in capsys.readouterr().out


@pytest.mark.parametrize(
    "body, message",
    [
        ("load_in_4bit: true\nuse_peft: false\n", r"`load_in_4bit: true` needs `use_peft: true`"),
        ("use_peft: true\nlora_target_modules: [q_proj, lm_head]\n", r"must not contain `lm_head`"),
        (
            "use_peft: true\nlora_dropout: 0\nlora_target_parameters: [lm_head.weight]\n",
            r"`lora_target_parameters` must not contain `lm_head`",
        ),
        ("per_device_train_batch_size: 4\nglobal_batch_size: 10\n", r"`global_batch_size: 10` is not a multiple"),
        ("dataset_format: openr1_math\neval_split: test\n", r"has only a `train` split.*eval_fraction"),
        ("response_format: plain\nanswer_template: '{answer}'\n", r"`answer_template` needs words"),
        ("answer_open: <A>\nanswer_close: </A>\nthinking_open: <A\n", r"`thinking_open: <A` is the same as or part"),
        ("dataset_name: missing/file.jsonl\n", r"file `missing/file.jsonl` does not exist"),
        (
            "chat_template: \"{% for m in messages %}{{ m['content'] }}{% endfor %}\"\neos_token: <|im_end|>\n",
            r"does not close the assistant turn",
        ),
        ("stages: [{name: a, loss_on: key, keep_best: true}]\neval_split: null\n", r"keep_best but there is no"),
        ("stages: [{name: a, loss_on: key, patience: 2}]\n", r"`patience: 2` but not `keep_best: true`"),
        ("restart_from: nope\n", r"`restart_from: nope` is not a stage"),
        ("stages: [{name: a, loss_on: key, keep_best: true}]\n", r"validation data is the evaluation set"),
        (
            "stages: [{name: a, loss_on: key, keep_best: true}]\neval_fraction: 0.1\neval_split: null\n",
            r"would be selected on test.*select_on_test: true",
        ),
        (
            "stages: [{name: a, loss_on: key, keep_best: true}]\neval_fraction: 0.1\nmetric_for_best_model: loss\n",
            r"`metric_for_best_model: loss` is not an evaluation metric",
        ),
        # keep-best's keys, in a stage too: a metric it can select on for the answer type, or refused
        (
            "stages: [{name: a, loss_on: key, keep_best: true, metric_for_best_model: acuracy}]\neval_fraction: 0.1\n",
            r"stage `a`: `metric_for_best_model: acuracy` is not an evaluation metric .*did you mean `accuracy`",
        ),
        ("stages: [{name: a, loss_on: key, eval_steps: 0.25}]\n", r"stage `a`: `eval_steps` only applies with `kee"),
        (
            "stages: [{name: a, loss_on: key, keep_best: true}]\neval_fraction: 0.1\n"
            "metric_for_best_model: mean_reasoning_length\n",
            r"`metric_for_best_model: mean_reasoning_length` has no direction .*use one of accuracy",
        ),
        (
            "stages: [{name: a, loss_on: key, keep_best: true, metric_for_best_model: mean_generated_tokens}]\n"
            "eval_fraction: 0.1\n",
            r"stage `a`: `metric_for_best_model: mean_generated_tokens` is better lower",
        ),
        (
            "stages: [{name: a, loss_on: key, keep_best: true}]\neval_fraction: 0.1\nanswer_type: text\n"
            "metric_for_best_model: reasoning_final_accuracy\n",
            r"`metric_for_best_model: reasoning_final_accuracy` is not defined for `answer_type: text` \(only num",
        ),
        (
            "stages: [{name: a, loss_on: key, keep_best: true, greater_is_better: false}]\neval_fraction: 0.1\n",
            r"stage `a`: `greater_is_better: false`: keep_best keeps the highest `accuracy`",
        ),
        ("stages: [{name: a, loss_on: completion, reasoning_weight: 0.1}]\n", r"applies to `loss_on: key`"),
        ("stages: [{name: a, loss_on: key, key_weight: 3}]\n", r"`key_weight` applies to `loss_on: completion`"),
        ("stages: [{name: a, loss_on: completion, key_weight: 0.5}]\n", r"from 1 \(no emphasis\) to 100"),
        # TRL / transformers options that SFTKey's data path or loss would drop (options.UNSUPPORTED_OPTIONS)
        ("label_smoothing_factor: 0.1\n", r"^error: `label_smoothing_factor: 0.1` is not supported: .*set it to 0"),
        ("stages: [{name: a, loss_on: key, loss_type: focal}]\n", r"stage `a`: `loss_type: focal` is not supported"),
        ("stages: [{name: a, loss_on: key, label_smoothing_factor: 0.2}]\n", r"stage `a`: `label_smoothing_f"),
        ("packing: true\n", r"`packing: True` is not supported: .*`padding_free: true`"),
        ("completion_only_loss: false\n", r"`completion_only_loss: False` is not supported"),
        ("assistant_only_loss: true\n", r"`assistant_only_loss: True` is not supported"),
        ("dataset_text_field: body\n", r"`dataset_text_field: body` is not supported.*`question_field`"),
        ("chat_template_path: t.jinja\n", r"`chat_template_path: t.jinja` is not supported.*set `chat_template`"),
        ("truncation_mode: keep_end\n", r"`truncation_mode: keep_end` is not supported.*raise `max_length`"),
        ("model_init_kwargs: {attn_implementation: sdpa}\n", r"`model_init_kwargs: .*` is not supported"),
        ("eval_strategy: steps\n", r"`eval_strategy: steps` is not supported: .*by generating answers"),
        ("eval_on_start: true\n", r"`eval_on_start: True` is not supported"),
        ("liger_kernel_config: {fused_linear_cross_entropy: true}\n", r"`liger_kernel_config: .*replaces the forward"),
        ("stages: [{name: a, loss_on: completion, context: detached}]\n", r"`context` applies to `loss_on: key`"),
        ("stages: [{name: a, loss_on: key, context: frozen}]\n", r"`context: frozen` is not valid: use one of"),
        (
            "stages: [{name: a, loss_on: key, context: detached, reasoning_weight: 0.1}]\n",
            r"holds the reasoning fixed, so `reasoning_weight: 0.1` cannot train it",
        ),
        ("padding_free: true\nstages: [{name: a, loss_on: key, context: detached}]\n", r"needs padded batches"),
        ("stages: [{name: a, loss_on: key, hub_token: hf_x}]\n", r"stage `a`: `hub_token` cannot be set in a stage"),
        ("fsdp: full_shard\nstages: [{name: a, loss_on: key, context: detached}]\n", r"not supported under FSDP"),
    ],
)
def test_checks_stop_dry_run_and_real_run_alike(tmp_path, body, message, monkeypatch, capsys):
    dry, real = run_both(write_recipe(tmp_path, body), monkeypatch, capsys)
    assert re.search(message, dry), dry
    assert dry == real


def test_detached_context_is_refused_under_zero3(monkeypatch):
    from sftkey_trl.recipe.checks import check_detached_context
    from sftkey_trl.train.objectives import Stage

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    args = SimpleNamespace(padding_free=False, log_part_losses=False, deepspeed=None)
    with pytest.raises(SFTKeyError, match=r"not supported under DeepSpeed ZeRO-3"):
        check_detached_context(args, [Stage(name="k", loss_on="key", context="detached")])
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    assert check_detached_context(args, [Stage(name="k", loss_on="key", context="detached")]) == []


def test_selection_on_test_is_an_explicit_opt_in(tmp_path):
    body = "stages: [{name: a, loss_on: key, keep_best: true}]\neval_fraction: 0.1\neval_split: null\n"
    assert "every check passed" in run_dry(write_recipe(tmp_path, body + "select_on_test: true\n"))
    body = "stages: [{name: a, loss_on: key, keep_best: true}]\neval_fraction: 0.1\n"  # validation + test
    assert "every check passed" in run_dry(write_recipe(tmp_path, body + "metric_for_best_model: strict_accuracy\n"))


@pytest.mark.parametrize(
    "case, message",
    [
        ("liger_missing", r"`use_liger_kernel: true` needs liger-kernel: `pip install liger-kernel`"),
        ("sequence_parallel", r"`sp_size: 2` splits each sequence across GPUs.*launch without"),
    ],
)
def test_checks_refuse_the_launch_environment_alike(tmp_path, case, message, monkeypatch, capsys):
    """Options whose failure depends on the environment: Liger not installed, an accelerate launch with sequence
    parallelism (its config reaches the process as environment variables)."""
    import importlib.util

    body = ""
    if case == "liger_missing":
        real = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "liger_kernel" else real(name))
        body = "use_liger_kernel: true\n"
    else:
        monkeypatch.setenv("ACCELERATE_USE_PARALLELISM_CONFIG", "true")
        monkeypatch.setenv("PARALLELISM_CONFIG_SP_SIZE", "2")
    dry, real_run = run_both(write_recipe(tmp_path, body), monkeypatch, capsys)
    assert re.search(message, dry), dry
    assert dry == real_run


def test_options_without_effect_are_noted_not_refused(tmp_path):
    path = write_recipe(tmp_path, "dataset_num_proc: 4\nshuffle_dataset: true\nloss_type: dft\n")
    report = yaml.safe_load(dry_run(*cli.load_checked_recipe(["--config", path], dry_run=True)))
    assert any(note.startswith("`dataset_num_proc` has no effect") for note in report["notes"])
    assert any(note.startswith("`shuffle_dataset` has no effect") for note in report["notes"])
    assert [stage["effective"]["loss_type"] for stage in report["stages"]] == ["dft", "dft"]


def test_dry_run_rejects_both_quantisations():
    args = SimpleNamespace(load_in_4bit=True, load_in_8bit=True, use_peft=True, lora_target_modules=None)
    with pytest.raises(SFTKeyError, match="both true"):
        check_model(args)


def test_dry_run_checks_global_batch_against_the_accelerate_process_count(tmp_path):
    header = (
        "# Hardware: two GPUs\n"
        "# Launch: accelerate launch --config_file accelerate_configs/two_gpus.yaml recipes/run.py "
        "--config recipes/x.yaml\n"
    )
    path = write_recipe(tmp_path, "per_device_train_batch_size: 4\nglobal_batch_size: 12\n", header)
    with pytest.raises(SFTKeyError, match=r"4 x 2 processes = 8"):
        run_dry(path)


def test_router_coefficient_is_checked_from_the_models_config_alone(tmp_path, monkeypatch, capsys):
    """`router_aux_loss_coef` needs a Mixture-of-Experts router, told by the model's config before it loads: a
    stage's coefficient on a dense model is refused both ways, an MoE config folder passes, and a hub id whose
    config is not on this machine is a note (the trainer checks the loaded model)."""
    from transformers import MixtralConfig

    body = "model_name_or_path: demo:tiny-llama\nstages: [{name: a, loss_on: key, router_aux_loss_coef: 0.1}]\n"
    dry, real = run_both(write_recipe(tmp_path, body), monkeypatch, capsys)
    assert dry == real and re.search(r"`router_aux_loss_coef: 0.1` .* \(llama\) has no router; remove", dry), dry
    MixtralConfig(num_hidden_layers=1).save_pretrained(tmp_path / "moe")
    for model, noted in ((tmp_path / "moe", False), ("Qwen/Qwen2.5-1.5B", True)):
        path = write_recipe(tmp_path, f"model_name_or_path: {model}\nrouter_aux_loss_coef: 0.1\n")
        notes = cli.load_checked_recipe(["--config", path], dry_run=True)[1]
        expected = f"`router_aux_loss_coef` is set and the config of `{model}` is not on this machine: checked on load"
        assert (expected in notes) == noted, notes
