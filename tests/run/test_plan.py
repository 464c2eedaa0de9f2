"""The stage plan: what a rerun may reuse. A stage is refused on another process count, which (without
`global_batch_size`) sets another global batch and whose checkpoints belong to their own count."""

from __future__ import annotations

import pytest
from trl import ModelConfig

from sftkey_trl.errors import SFTKeyError
from sftkey_trl.recipe.schema import Recipe, SFTKeyConfig, SFTKeyScriptArguments
from sftkey_trl.run.plan import Manifest, plan_stages
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
