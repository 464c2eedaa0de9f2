"""The run folder after a user's mistake or bad luck (issue 38): nothing the project did not write is deleted, the
files on disk win over the manifest, an unreadable manifest or results file is set aside with one line, and a
folder holds one run's stages. Each test starts from a copy of one finished tiny LoRA run (no evaluation)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file

from sftkey_trl.run.cli import main

pytestmark = pytest.mark.e2e

STAGES = "[{name: sft, loss_on: completion, num_train_epochs: 1}, {name: key, loss_on: key, num_train_epochs: 1}]"
TINY = [
    "--max_train_samples", "8", "--max_eval_samples", "4", "--max_new_tokens", "8", "--eval_fraction", "0",
    "--eval_after_stages", "false", "--save_strategy", "no", "--per_device_train_batch_size", "8",
    "--use_peft", "true", "--logging_steps", "1",
]  # fmt: skip


def run(out: Path, *extra: str, stages: str = STAGES) -> int:
    """recipes/run.py's main in this process; its exit status."""
    try:
        return main(["--output_dir", str(out), *TINY, "--stages", stages, *extra])
    except SystemExit as exit_:
        return exit_.code


def files(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under `folder` with its modification time and size: what a refusal must leave as it was."""
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.stat().st_size) for p in folder.rglob("*")}


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: "), err
    return err[-1]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finished") / "run"
    assert run(out) == 0
    return out


@pytest.fixture()
def copy(finished, tmp_path) -> Path:
    """A copy of the finished run to break."""
    return Path(shutil.copytree(finished, tmp_path / "run", symlinks=True))


@pytest.mark.parametrize("target", ["output_dir", "stage", "user_folder"])
def test_merge_dir_at_the_run_a_stage_or_a_users_folder_is_refused_and_deletes_nothing(target, copy, capsys):
    """Before the fix `--merge_dir <output_dir>` wiped the manifest, results and every stage, then exited 0."""
    folder = {"output_dir": copy, "stage": copy / "sft", "user_folder": copy.parent / "mine"}[target]
    if target == "user_folder":
        folder.mkdir()
        (folder / "notes.txt").write_text("mine")
    before, theirs = files(copy), files(folder)
    assert run(copy, "--merge", "key", "--merge_dir", str(folder)) == 2
    error = one_error_line(capsys)
    assert error.startswith(f"error: `--merge_dir {folder}` is ") and "nothing was deleted" in error
    assert files(copy) == before and files(folder) == theirs


def test_a_merge_goes_into_a_new_folder_and_replaces_an_earlier_merge(copy, capsys):
    merged = copy.parent / "merged"
    assert run(copy, "--merge", "key", "--merge_dir", str(merged)) == 0
    weights = load_file(merged / "model.safetensors")
    (merged / "stray.txt").write_text("left by the earlier merge")
    assert run(copy, "--merge", "key", "--merge_dir", str(merged)) == 0  # replaced, not merged into
    assert not (merged / "stray.txt").exists()
    assert load_file(merged / "model.safetensors").keys() == weights.keys()


@pytest.mark.parametrize("flag", [["--overwrite_output_dir", "true"], ["--restart_from", "key"]])
def test_a_users_folder_where_a_stage_goes_is_never_deleted(flag, copy, capsys):
    """Before the fix both flags deleted `<output_dir>/key` whatever it held."""
    shutil.rmtree(copy / "key")
    (copy / "key").mkdir()
    (copy / "key" / "notes.txt").write_text("mine")
    assert run(copy, *flag) == 2
    error = one_error_line(capsys)
    assert f"{copy / 'key'}" in error and "sftkey-trl did not create" in error and "nothing was deleted" in error
    assert (copy / "key" / "notes.txt").read_text() == "mine"


def set_status(out: Path, stage: str, status: str) -> None:
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["stages"][stage]["status"] = status
    (out / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("case", ["stage_deleted", "next_stage_running", "weights_truncated"])
def test_a_stage_whose_weights_are_gone_is_trained_again_with_the_stages_after_it(case, copy, caplog):
    """Before the fix: "stage sft is done ... skipped", exit 0 and no weights; with the next stage running, a Hub error
    (its start_from folder read as a Hub id); a truncated weights file was never noticed."""
    caplog.set_level(logging.INFO)
    if case in ("stage_deleted", "next_stage_running"):
        shutil.rmtree(copy / "sft")
    if case == "next_stage_running":
        shutil.rmtree(copy / "key")
        set_status(copy, "key", "running")
    retrained = "key" if case == "weights_truncated" else "sft"
    if case == "weights_truncated":
        weights = copy / "key" / "adapter_model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert run(copy) == 0
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith(f"stage {retrained} is done")]
    assert len(said) == 1 and "training it again" in said[0], said
    assert ("the stages after it" in said[0]) == (retrained == "sft")
    for stage in ("sft", "key"):
        assert load_file(copy / stage / "adapter_model.safetensors")  # complete again
    manifest = json.loads((copy / "manifest.json").read_text())
    assert [manifest["stages"][stage]["status"] for stage in ("sft", "key")] == ["done", "done"]
    assert not any("skipped" in r.getMessage() and retrained in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("name", ["manifest.json", "results.json"])
def test_a_run_over_an_unreadable_manifest_or_results_file_refuses_or_trains_again(name, copy, capsys, caplog):
    """Before the fix: a traceback (JSONDecodeError). An unreadable manifest cannot vouch for the stages on disk:
    refused with the fix; lost results lose the stages' training records: they are trained again."""
    path = copy / name
    path.write_text(path.read_text()[:60])
    code = run(copy)
    assert len(list(copy.glob(f"{name}.corrupt-*"))) == 1  # set aside
    if name == "results.json":
        assert code == 0 and json.loads(path.read_text())["stages"].keys() == {"sft", "key"}
        said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("stage sft is done")]
        assert said == [
            "stage sft is done in the manifest but results.json has no record of its training: training it again "
            "(and the stages after it: their input changes)"
        ]
    else:
        assert code == 2
        error = one_error_line(capsys)
        assert f"{path} could not be read (set aside)" in error and "--overwrite_output_dir true" in error
        assert run(copy, "--overwrite_output_dir", "true") == 0
        assert json.loads(path.read_text())["stages"]["key"]["status"] == "done"


def test_other_stage_names_in_a_run_folder_are_refused_in_one_line(copy, capsys):
    """Before the fix the folder's results then held `sft`, `key` and `answer`: two runs mixed."""
    before = files(copy)
    other = "[{name: sft, loss_on: completion, num_train_epochs: 1}, {name: answer, loss_on: key}]"
    assert run(copy, stages=other) == 2
    error = one_error_line(capsys)
    assert error == (
        f"error: {copy} holds a run of the stages ['sft', 'key'], this recipe's are ['sft', 'answer']: a folder "
        "holds one run, never a mix; use another output_dir, or pass --overwrite_output_dir true to replace that run"
    )
    assert files(copy) == before


class Killed(Exception):
    """A SIGKILL right after a deletion, simulated: nothing after it runs."""


@pytest.mark.parametrize("flag", [["--overwrite_output_dir", "true"], ["--restart_from", "sft"]])
def test_a_kill_right_after_a_stage_is_deleted_leaves_no_record_of_it_and_the_rerun_finishes(flag, copy, monkeypatch):
    """Found by the adversarial suite (tests/run/test_adversarial.py): both flags deleted the stage folders first and
    their records after, so a kill in between left a manifest calling `sft` done, and results.json reporting it, with
    no weights. The records go first now, and the next run finishes the deletion and trains the stages again."""
    from sftkey_trl.run import pipeline, plan

    real = plan.discard

    def discard_then_killed(*paths, kinds, **options):
        real(*paths, kinds=kinds, **options)
        if "stage" in kinds and any(Path(path).name in ("sft", "key") for path in paths):
            raise Killed

    monkeypatch.setattr(plan, "discard", discard_then_killed)
    monkeypatch.setattr(pipeline, "discard", discard_then_killed)
    with pytest.raises(Killed):
        run(copy, *flag)
    monkeypatch.undo()
    manifest = json.loads((copy / "manifest.json").read_text()) if (copy / "manifest.json").exists() else {}
    results = json.loads((copy / "results.json").read_text()) if (copy / "results.json").exists() else {}
    for stage in ("sft", "key"):
        if not (copy / stage / "adapter_model.safetensors").exists():
            assert manifest.get("stages", {}).get(stage, {}).get("status") not in ("trained", "done"), stage
            assert stage not in results.get("stages", {}), stage
    assert run(copy) == 0
    manifest = json.loads((copy / "manifest.json").read_text())
    assert [manifest["stages"][stage]["status"] for stage in ("sft", "key")] == ["done", "done"]
    assert json.loads((copy / "results.json").read_text())["stages"].keys() == {"sft", "key"}
    for stage in ("sft", "key"):
        assert load_file(copy / stage / "adapter_model.safetensors")


@pytest.mark.parametrize("name", ["manifest.json", "results.json"])
def test_a_merge_over_an_unreadable_record_writes_its_card_without_it_and_says_so(name, copy, capsys, caplog):
    """Found by the adversarial suite: `--merge` over a truncated manifest.json (or results.json) was a traceback
    from the model card, which reads them; the weights it merges are whole."""
    path = copy / name
    path.write_text(path.read_text()[:60])
    broken = path.read_text()
    assert run(copy, "--merge", "key", "--merge_dir", str(copy.parent / "merged")) == 0
    assert "Traceback" not in capsys.readouterr().err
    said = [r.getMessage() for r in caplog.records if str(path) in r.getMessage()]
    assert len(said) == 1 and "cannot be read" in said[0] and "the model card goes on without it" in said[0], said
    assert (copy.parent / "merged" / "README.md").is_file() and path.read_text() == broken  # left as it was


def test_a_merge_of_a_stage_whose_tokenizer_cannot_be_read_is_one_line(copy, capsys):
    """Was a traceback from transformers (a JSONDecodeError) after the model had been loaded and merged."""
    path = copy / "key" / "tokenizer_config.json"
    path.write_text(path.read_text()[:60])
    assert run(copy, "--merge", "key", "--merge_dir", str(copy.parent / "merged")) == 2
    error = one_error_line(capsys)
    assert error.startswith(f"error: stage `key` cannot be merged: its tokenizer in {copy / 'key'} cannot be read (")
    assert error.endswith("restore the stage folder, or rerun with `--restart_from key`")
    assert not (copy.parent / "merged").exists()


def test_a_rerun_over_an_unreadable_log_history_reports_without_its_curve_and_says_so(copy, capsys, caplog):
    """Found by the adversarial suite: a rerun of a finished run whose `sft/log_history.json` was truncated ended in
    a traceback from the training-curves plot, after the run had done everything else."""
    history = copy / "sft" / "log_history.json"
    history.write_text(history.read_text()[:50])
    assert run(copy) == 0
    said = [r.getMessage() for r in caplog.records if str(history) in r.getMessage()]
    assert len(said) == 1 and "cannot be read" in said[0] and "plot" in said[0], said
    assert (copy / "training_curves.png").is_file()  # the key stage's curve
