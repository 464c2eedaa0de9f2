"""KeepBestCallback's decisions with a fake evaluate and a fake trainer (no model): what it keeps, when patience
stops a stage, and that its state saved with a checkpoint makes a resumed stage decide as an uninterrupted one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
from transformers import TrainerControl, TrainerState

from sftkey_trl.errors import SFTKeyError
from sftkey_trl.files import folder_marker, mark_folder
from sftkey_trl.run.plan import last_complete_checkpoint
from sftkey_trl.train.keep_best import STATE_KEY, KeepBestCallback, holds_keep_best_state


class FakeTrainer:
    """Saves 'weights' that say which step they come from; `step` is the step the model is at."""

    def __init__(self):
        self.step = 0

    def save_model(self, path: str) -> None:
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / "model.safetensors").write_text(f"step {self.step}")


def train(tmp_path: Path, scores: dict[int, float], max_steps: int, patience=None, resume=None, kill_at=None,
          save_steps: int = 2, every: int = 2, save_on_epoch_end: bool = True, incoming: Path | None = None,
          save_total_limit: int | None = None, kill_before_on_save: bool = False):  # fmt: skip
    """Drive the callback as Trainer does: on_train_begin, then per optimizer step the default flow's save/stop
    flags, on_step_end, a checkpoint (weights, then trainer_state.json with `stateful_callbacks`, then the deletion
    of checkpoints beyond `save_total_limit`: `Trainer._save_checkpoint`'s order) and on_save; on_epoch_end at the
    end. `kill_at`: stop dead after that step (with `kill_before_on_save`: after its checkpoint, before on_save)."""
    trainer, stage_dir = FakeTrainer(), tmp_path / "stage"
    checkpoints = stage_dir / "checkpoints"
    callback = KeepBestCallback(lambda model: {"accuracy": scores[trainer.step]}, "accuracy", stage_dir, every,
                                trainer, patience=patience, incoming=incoming)  # fmt: skip
    callback.start(resume)
    args = SimpleNamespace(should_save=True, output_dir=str(checkpoints))
    state, control = TrainerState(max_steps=max_steps), TrainerControl()
    if resume:  # Trainer loads the checkpoint's state, callbacks' entries included
        state = TrainerState.load_from_json(str(Path(resume) / "trainer_state.json"))
    trainer.step = state.global_step
    callback.on_train_begin(args, state, control, model=None)
    saved = []

    def save():
        checkpoint = checkpoints / f"checkpoint-{state.global_step}"
        trainer.save_model(str(checkpoint))
        state.save_to_json(str(checkpoint / "trainer_state.json"))
        if save_total_limit:
            for old in sorted(checkpoints.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))[
                :-save_total_limit
            ]:
                shutil.rmtree(old)
        if kill_before_on_save and state.global_step == kill_at:
            return
        callback.on_save(args, state, control)
        control.should_save = False
        saved.append(state.global_step)

    while state.global_step < max_steps:
        state.global_step += 1
        trainer.step = state.global_step
        control.should_save = state.global_step % save_steps == 0 or state.global_step == max_steps
        control.should_training_stop = state.global_step == max_steps
        callback.on_step_end(args, state, control, model=None)
        if control.should_save:
            save()
        if state.global_step == kill_at:
            return callback, saved
        if control.should_training_stop:
            break
    control.should_save = save_on_epoch_end
    callback.on_epoch_end(args, state, control)
    if control.should_save:
        save()
    trainer.save_model(str(stage_dir))  # as Pipeline.train_stage does before finalize
    report = callback.finalize(stage_dir, state.global_step)
    return callback, saved, report, (stage_dir / "model.safetensors").read_text()


def test_patience_stops_after_n_evaluations_without_improvement_and_does_not_checkpoint_the_stop(tmp_path):
    scores = {0: 0.1, 2: 0.3, 4: 0.3, 6: 0.2, 8: 0.9, 10: 0.9}
    callback, saved, report, kept = train(tmp_path, scores, max_steps=10, patience=2)
    assert [step for step, _ in report["history"]] == [0, 2, 4, 6]  # a tie (step 4) is no improvement
    assert report["stopped_early"] and report["stopped_at"] == 6 and report["steps_trained"] == 6
    assert saved == [2, 4]  # neither the stop step nor the epoch end is checkpointed
    assert report["best_step"] == 2 and kept == "step 2"


def test_an_improvement_resets_patience_and_the_last_step_is_no_early_stop(tmp_path):
    scores = {0: 0.1, 2: 0.1, 4: 0.2, 6: 0.2, 8: 0.3, 10: 0.3}
    _, _, report, kept = train(tmp_path, scores, max_steps=10, patience=2)
    assert not report["stopped_early"] and report["stopped_at"] is None and report["steps_trained"] == 10
    assert report["best_step"] == 8 and kept == "step 8"
    _, _, report, _ = train(tmp_path / "one", {0: 0.5, 2: 0.6, 4: 0.4}, max_steps=4, patience=1)
    assert not report["stopped_early"]  # the evaluation without improvement is the last step's


def test_without_patience_a_stage_trains_to_the_end(tmp_path):
    _, _, report, _ = train(tmp_path, {0: 0.1, 2: 0.3, 4: 0.2, 6: 0.5}, max_steps=6)
    assert report["steps_trained"] == 6 and not report["stopped_early"] and report["patience"] is None
    assert report["best_step"] == 6 and report["kept"] == "the final weights (step 6)"


def test_stage_1_keeps_the_base_model_when_it_scores_best(tmp_path):
    """Stage 1 has no incoming folder: its step-0 weights (the base model) are snapshotted and kept when no
    evaluation beats them, and the report names what was kept with its score."""
    _, _, report, kept = train(tmp_path, {0: 0.5, 2: 0.1, 4: 0.3, 6: 0.1}, max_steps=6)
    assert kept == "step 0"
    assert report["best_step"] == 0 and report["best_validation_accuracy"] == 0.5
    assert report["kept"].startswith("the incoming weights (step 0")
    *_, report, kept = train(tmp_path / "patience", {0: 0.5, 2: 0.1, 4: 0.1, 6: 0.9}, max_steps=6, patience=2)
    assert report["stopped_at"] == 4 and report["best_step"] == 0 and kept == "step 0"


def test_a_later_stage_keeps_its_incoming_folder_without_a_step_0_snapshot(tmp_path):
    incoming = tmp_path / "previous"
    incoming.mkdir()
    (incoming / "model.safetensors").write_text("previous stage")
    callback, _, report, kept = train(tmp_path, {0: 0.5, 2: 0.1, 4: 0.1}, max_steps=4, incoming=incoming)
    assert kept == "previous stage" and report["best_step"] == 0
    assert not callback.snapshot(0).exists()


def test_with_save_total_limit_1_a_kill_before_on_save_still_leaves_a_checkpoint_to_resume_from(tmp_path):
    """Trainer deletes the older checkpoint before callbacks' on_save: the state must already be in the new one
    (its trainer_state.json), or a kill in between leaves nothing to resume from."""
    scores = {0: 0.1, 2: 0.3, 4: 0.2, 6: 0.4, 8: 0.4, 10: 0.4, 12: 0.3}
    *_, expected, expected_kept = train(tmp_path / "reference", scores, max_steps=12, patience=2)
    out = tmp_path / "killed"
    train(out, scores, max_steps=12, patience=2, kill_at=6, save_total_limit=1, kill_before_on_save=True)
    checkpoints = out / "stage" / "checkpoints"
    assert [p.name for p in checkpoints.iterdir()] == ["checkpoint-6"]
    saved = json.loads((checkpoints / "checkpoint-6" / "trainer_state.json").read_text())["stateful_callbacks"]
    assert saved[STATE_KEY]["best_step"] == 6
    resume = last_complete_checkpoint(checkpoints, holds_keep_best_state)
    assert resume == str(checkpoints / "checkpoint-6")
    *_, report, kept = train(out, scores, max_steps=12, patience=2, resume=resume, save_total_limit=1)
    assert json.loads(json.dumps(report)) == json.loads(json.dumps(expected)) and kept == expected_kept


@pytest.mark.parametrize("kill_at", [2, 3, 4, 5, 7, 9])
def test_a_killed_stage_resumed_from_its_checkpoint_decides_as_an_uninterrupted_one(tmp_path, kill_at):
    scores = {0: 0.1, 2: 0.3, 4: 0.2, 6: 0.4, 8: 0.4, 10: 0.4, 12: 0.3}
    *_, expected, expected_kept = train(tmp_path / "reference", scores, max_steps=12, patience=2)
    assert expected["stopped_at"] == 10 and expected_kept == "step 6"
    out = tmp_path / "killed"
    train(out, scores, max_steps=12, patience=2, kill_at=kill_at)
    resume = last_complete_checkpoint(out / "stage" / "checkpoints", holds_keep_best_state)
    assert resume is not None
    *_, report, kept = train(out, scores, max_steps=12, patience=2, resume=resume)
    assert json.loads(json.dumps(report)) == json.loads(json.dumps(expected)) and kept == expected_kept


def test_a_best_snapshot_taken_after_the_last_checkpoint_does_not_replace_the_checkpoints_best(tmp_path):
    """Killed after step 3's new best was snapshotted but before a checkpoint recorded it; the resumed run scores
    step 3 lower (GPU non-determinism, say): the best stays step 2's, with step 2's weights."""
    train(tmp_path, {0: 0.1, 1: 0.1, 2: 0.5, 3: 0.8}, max_steps=4, save_steps=2, every=1, kill_at=3)
    assert {p.name for p in (tmp_path / "stage" / "best").glob("step-*")} == {"step-2", "step-3"}
    resume = last_complete_checkpoint(tmp_path / "stage" / "checkpoints", holds_keep_best_state)
    assert resume.endswith("checkpoint-2")
    _, _, report, kept = train(tmp_path, {3: 0.4, 4: 0.3}, max_steps=4, every=1, resume=resume)
    assert report["best_step"] == 2 and kept == "step 2"
    assert [step for step, _ in report["history"]] == [0, 1, 2, 3, 4]


def test_a_checkpoint_without_keep_best_state_is_not_resumed_from(tmp_path):
    train(tmp_path, {0: 0.1, 2: 0.5, 4: 0.6}, max_steps=4, kill_at=4)
    checkpoints = tmp_path / "stage" / "checkpoints"
    (checkpoints / "checkpoint-4" / "trainer_state.json").write_text("{}")  # e.g. a stage without keep_best
    assert last_complete_checkpoint(checkpoints) == str(checkpoints / "checkpoint-4")
    assert last_complete_checkpoint(checkpoints, holds_keep_best_state) == str(checkpoints / "checkpoint-2")


def test_resuming_without_the_best_snapshot_is_a_one_line_error(tmp_path):
    train(tmp_path, {0: 0.1, 2: 0.5, 4: 0.6}, max_steps=4, kill_at=2)
    resume = last_complete_checkpoint(tmp_path / "stage" / "checkpoints", holds_keep_best_state)
    shutil.rmtree(tmp_path / "stage" / "best" / "step-2")
    with pytest.raises(SFTKeyError, match=r"step 2\) are missing .*--restart_from stage") as error:
        train(tmp_path, {2: 0.5, 4: 0.6}, max_steps=4, resume=resume)
    assert "\n" not in str(error.value)


def test_a_fresh_start_drops_snapshots_of_a_run_killed_before_its_first_checkpoint(tmp_path):
    stale = tmp_path / "stage" / "best" / "step-1"
    mark_folder(stale.parent, "snapshots")
    mark_folder(stale, "snapshot")  # as the callback marks a snapshot before saving into it
    *_, report, _ = train(tmp_path, {0: 0.1, 2: 0.5}, max_steps=2)
    assert not stale.exists() and report["best_step"] == 2


def test_snapshots_are_marked_and_a_folder_keep_best_did_not_make_is_never_deleted(tmp_path):
    train(tmp_path, {0: 0.1, 2: 0.5, 4: 0.6}, max_steps=4, kill_at=2)
    best = tmp_path / "stage" / "best"
    assert folder_marker(best)["kind"] == "snapshots" and folder_marker(best / "step-2")["kind"] == "snapshot"
    foreign = best / "step-9"
    (foreign / "notes").mkdir(parents=True)  # not one of keep_best's: the fresh start's pruning must refuse it
    with pytest.raises(SFTKeyError, match=r"refusing to delete .*step-9: .*did not create.*--restart_from stage"):
        train(tmp_path, {0: 0.1, 2: 0.5}, max_steps=2)
    assert (foreign / "notes").is_dir() and (best / "step-2").is_dir()
