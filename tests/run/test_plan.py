"""The stage plan: what a rerun may reuse. A stage is refused on another process count, which (without
`global_batch_size`) sets another global batch and whose checkpoints belong to their own count. A state file that
cannot be read is set aside, never deleted (the reruns over a broken run folder: tests/run/test_run_folder.py)."""

from __future__ import annotations

import json

import pytest
from trl import ModelConfig

from sftkey_trl.errors import SFTKeyError
from sftkey_trl.recipe.schema import Recipe, SFTKeyConfig, SFTKeyScriptArguments
from sftkey_trl.run.plan import Manifest, plan_stages, read_run_file
from sftkey_trl.train.objectives import Stage
from sftkey_trl.train.steps import global_batch, stage_training_args


def plan(tmp_path, manifest: Manifest, processes: int):
    base = SFTKeyConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, per_device_train_batch_size=4)

    def stage_args(stage: Stage):
        return stage_training_args(base, stage, str(tmp_path / stage.name / "checkpoints"), processes)

    stages = [Stage(name="sft"), Stage(name="key", loss_on="key")]
    recipe = Recipe(SFTKeyScriptArguments(), base, ModelConfig(model_name_or_path="m"), stages)
    return plan_stages(recipe, stage_args, "data", manifest, processes)


def test_a_stage_run_on_another_process_count_is_refused_in_one_line(tmp_path):
    manifest = Manifest(tmp_path)
    planned = plan(tmp_path, manifest, processes=1)
    manifest.update("sft", status="running", hash=planned[0].digest, config=planned[0].config)
    assert [p.digest for p in plan(tmp_path, manifest, processes=1)] == [p.digest for p in planned]
    two = plan(tmp_path / "other", Manifest(tmp_path / "other"), processes=2)
    assert global_batch(two[0].args, 2) != global_batch(planned[0].args, 1)  # without global_batch_size: 8 vs 4
    with pytest.raises(SFTKeyError, match=r"stage `sft` .* was run on 1 process\(es\), this launch has 2") as error:
        plan(tmp_path, manifest, processes=2)
    assert "\n" not in str(error.value) and "--restart_from sft" in str(error.value)


@pytest.mark.parametrize("name", ["manifest.json", "results.json"])
@pytest.mark.parametrize("damage", ["truncated", "not_json", "not_utf8", "wrong_shape", "a_folder"])
def test_an_unreadable_state_file_is_set_aside_never_deleted(name, damage, tmp_path, caplog):
    path = tmp_path / name
    text = {"truncated": '{"stages": {"sft": {"sta', "not_json": "garbage", "not_utf8": '{"\udcff"}',
            "wrong_shape": '{"stages": [1, 2]}', "a_folder": None}[damage]  # fmt: skip
    path.mkdir() if text is None else path.write_bytes(text.encode("utf-8", "surrogateescape"))
    assert read_run_file(path, set_aside_if_unreadable=False) is None and path.exists()  # another rank only reads
    assert read_run_file(path) is None and not path.exists()
    (aside,) = tmp_path.glob(f"{name}.corrupt-*")
    assert aside.is_dir() if text is None else aside.read_bytes() == text.encode("utf-8", "surrogateescape")
    (said,) = [r.getMessage() for r in caplog.records]
    assert said.startswith(f"{path} cannot be read (") and f"set aside as {aside.name}" in said


def saved(folder, *names: str, cut: bool = False) -> None:
    """A saved stage folder holding `names` (configs as {}, weights as real safetensors; `cut`: truncated)."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        if name.endswith(".safetensors"):
            save_file({"w": torch.zeros(64)}, str(folder / name))
            if cut:
                (folder / name).write_bytes((folder / name).read_bytes()[:-16])
        else:
            (folder / name).write_text("{}")


def test_what_a_saved_stage_folder_lacks_is_named(tmp_path):
    from sftkey_trl.run.plan import missing_weights

    assert missing_weights(tmp_path / "gone") == f"{tmp_path / 'gone'} is missing"
    saved(tmp_path / "adapter", "adapter_config.json", "adapter_model.safetensors")
    saved(tmp_path / "full", "config.json", "model.safetensors")
    assert missing_weights(tmp_path / "adapter") is None and missing_weights(tmp_path / "full") is None
    saved(tmp_path / "cut", "adapter_config.json", "adapter_model.safetensors", cut=True)
    assert missing_weights(tmp_path / "cut") == f"{tmp_path / 'cut' / 'adapter_model.safetensors'} is incomplete"
    saved(tmp_path / "shards", "config.json", "model-1.safetensors")
    index = {"weight_map": {"a": "model-1.safetensors", "b": "model-2.safetensors"}}
    (tmp_path / "shards" / "model.safetensors.index.json").write_text(json.dumps(index))
    assert missing_weights(tmp_path / "shards") == f"{tmp_path / 'shards'} has no model-2.safetensors"
    saved(tmp_path / "nothing", "tokenizer.json")
    assert "has no config.json or adapter_config.json" in missing_weights(tmp_path / "nothing")


def test_a_finished_stage_that_lost_its_weights_or_record_is_planned_again_with_the_later_ones(tmp_path, caplog):
    manifest = Manifest(tmp_path)
    planned = plan(tmp_path, manifest, processes=1)
    recorded = {}
    for entry in planned:
        manifest.update(entry.stage.name, status="done", hash=entry.digest, config=entry.config)
        saved(tmp_path / entry.stage.name, "config.json", "model.safetensors")
        recorded[entry.stage.name] = {"training": {}}
    manifest.record_stage_names(["sft", "key"])

    def restarting(**kwargs) -> list[bool]:
        base = SFTKeyConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, per_device_train_batch_size=4)
        recipe = Recipe(SFTKeyScriptArguments(), base, ModelConfig(model_name_or_path="m"),
                        [Stage(name="sft"), Stage(name="key", loss_on="key")])  # fmt: skip

        def stage_args(stage: Stage):
            return stage_training_args(base, stage, str(tmp_path / stage.name / "checkpoints"), 1)

        return [p.restarting for p in plan_stages(recipe, stage_args, "data", manifest, 1, **kwargs)]

    assert restarting(recorded=recorded) == [False, False]
    (tmp_path / "sft" / "model.safetensors").unlink()
    assert restarting(recorded=recorded) == [True, True]
    assert caplog.messages[-1] == (
        f"stage sft is done in the manifest but {tmp_path / 'sft'} has no model.safetensors: training it again "
        "(and the stages after it: their input changes)"
    )
    saved(tmp_path / "sft", "model.safetensors")
    assert restarting(recorded={"sft": recorded["sft"], "key": {"loss_on": "key"}}) == [False, True]
    assert caplog.messages[-1].endswith("but results.json has no record of its training: training it again")


def test_a_folder_holds_one_run_and_more_stages_may_follow_it(tmp_path):
    from sftkey_trl.run.plan import check_stage_names

    manifest = Manifest(tmp_path)
    manifest.record_stage_names(["sft", "key"])
    check_stage_names(manifest, ["sft", "key"])
    check_stage_names(manifest, ["sft", "key", "more"])
    for names in (["sft", "answer"], ["sft"], ["key", "sft"]):
        with pytest.raises(SFTKeyError, match=r"holds a run of the stages \['sft', 'key'\], this recipe's are"):
            check_stage_names(manifest, names)
    earlier = Manifest(tmp_path / "earlier")  # an earlier version's manifest: the stages that started
    earlier.update("sft", status="running")
    check_stage_names(earlier, ["sft", "key"])
    with pytest.raises(SFTKeyError, match=r"stages \['sft'\], this recipe's are \['first', 'key'\]"):
        check_stage_names(earlier, ["first", "key"])


def test_a_run_folder_an_earlier_version_wrote_is_adopted_through_its_manifest(tmp_path):
    """Folders from before the markers: the stages its manifest (sftkey-trl's) lists are this project's, so
    `overwrite_output_dir` may replace them; a folder the manifest does not list stays."""
    from sftkey_trl.files import folder_marker
    from sftkey_trl.run.plan import clear_run

    manifest = Manifest(tmp_path)
    manifest.update("sft", status="done")  # records library_versions, as every manifest does
    saved(tmp_path / "sft", "config.json", "model.safetensors")
    (tmp_path / "sft" / "best" / "step-2").mkdir(parents=True)
    (tmp_path / "mine").mkdir()
    (tmp_path / "results.json").write_text("{}")
    clear_run(tmp_path, ["sft"])
    assert folder_marker(tmp_path)["kind"] == "run" and (tmp_path / "mine").is_dir()
    assert not (tmp_path / "sft").exists() and not (tmp_path / "manifest.json").exists()
    assert not (tmp_path / "results.json").exists()
    (tmp_path / "key").mkdir()  # not the manifest's: refused, and nothing deleted
    Manifest(tmp_path).update("sft", status="done")
    with pytest.raises(SFTKeyError, match=r"refusing to delete .*key: .*did not create.*nothing was deleted"):
        clear_run(tmp_path, ["sft", "key"])
    assert (tmp_path / "manifest.json").exists() and (tmp_path / "key").is_dir()
