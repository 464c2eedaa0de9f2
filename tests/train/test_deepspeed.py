"""DeepSpeed ZeRO-2 and ZeRO-3 for real, on two CPU processes: DeepSpeed's CPU accelerator with gloo
(`ddp_backend: gloo`, no `use_cpu`), launched with the shipped accelerate configs. Each runs the shortened demo through
both stages (stage 2 reloads stage 1's saved folder), saves stage folders that reload with `from_pretrained` /
`PeftModel.from_pretrained` (ZeRO-3 gathers the weights on save: `zero3_save_16bit_model: true`), evaluates every
example once, and trains full fine-tuning and LoRA exactly like one process (tolerances of tests/train/test_ddp.py).
QLoRA (bitsandbytes 4-bit on CPU) runs through both stages under both.

The first DeepSpeed launch on a machine compiles DeepSpeed's shared-memory communication op (a C++ compiler, about
a minute, then cached in ~/.cache/torch_extensions)."""

from __future__ import annotations

import json
import math

import pytest
from real_launches import (
    LORA,
    ROOT,
    RUN,
    SHORT_DEMO,
    accelerate,
    assert_evaluated_everything,
    assert_trains_like_one_process,
    logged_losses,
    stages,
)

pytest.importorskip("deepspeed", reason="DeepSpeed is pinned in requirements.txt; pip install -r requirements.txt")

QLORA = (*LORA, "--load_in_4bit", "true")
pytestmark = [pytest.mark.e2e, pytest.mark.distributed]


def deepspeed(stage: int, output_dir, *args: str):
    """Two CPU processes under accelerate_configs/deepspeed_zero<stage>.yaml (its shipped settings)."""
    config = str(ROOT / "accelerate_configs" / f"deepspeed_zero{stage}.yaml")
    done = accelerate("--config_file", config, "--num_processes", "2", RUN, "--output_dir", str(output_dir),
                      *SHORT_DEMO, "--ddp_backend", "gloo", *args)  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.count("SFTKey results") == 1  # only the main process reports
    return done


@pytest.mark.parametrize("zero", [2, 3])
def test_full_fine_tuning_trains_saves_and_evaluates_like_one_process(zero, reference_full, tmp_path):
    from transformers import AutoModelForCausalLM

    run = tmp_path / f"zero{zero}"
    deepspeed(zero, run)
    assert_trains_like_one_process(run, reference_full, world_size=2, weights="model.safetensors")
    assert_evaluated_everything(run)
    model = AutoModelForCausalLM.from_pretrained(run / "key")  # whole weights, not DeepSpeed shards
    assert sum(p.numel() for p in model.parameters()) > 0 and not list((run / "key").glob("global_step*"))


@pytest.mark.parametrize("zero", [2, 3])
def test_lora_trains_saves_and_evaluates_like_one_process(zero, reference_lora, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run = tmp_path / f"zero{zero}"
    deepspeed(zero, run, *LORA)
    assert_trains_like_one_process(run, reference_lora, world_size=2, weights="adapter_model.safetensors")
    assert_evaluated_everything(run)
    config = json.loads((run / "key" / "adapter_config.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"])
    model = PeftModel.from_pretrained(base, run / "key")
    assert any("lora_B" in name and p.abs().sum() > 0 for name, p in model.named_parameters())


@pytest.mark.parametrize("zero", [2, 3])
def test_qlora_runs_both_stages(zero, reference_lora, tmp_path):
    """4-bit base + LoRA: both stages train and evaluate; the losses stay within 1% of the float32 LoRA run (nf4
    rounding of the frozen weights), so the sharded 4-bit weights are the model's (corrupted or unsharded storage
    would not train like this)."""
    run = tmp_path / f"zero{zero}"
    done = deepspeed(zero, run, *QLORA)
    if zero == 3:  # the storage rule of train/distributed.py, applied before loading
        assert "bnb_4bit_quant_storage: uint8 -> float32" in done.stderr
    for stage in ("sft", "key"):
        assert stages(run)[stage]["training"]["world_size"] == 2
        losses, lora = logged_losses(run / stage), logged_losses(reference_lora / stage)
        assert [step for step, _ in losses] == [1, 2, 3, 4]
        for (step, loss), (_, expected) in zip(losses, lora):
            assert math.isfinite(loss) and loss == pytest.approx(expected, rel=0.01), f"stage {stage}, step {step}"
        assert (run / stage / "adapter_model.safetensors").is_file()
    assert_evaluated_everything(run)


def test_without_gloo_the_cpu_launch_stops_with_one_line(tmp_path):
    """Without `ddp_backend: gloo` accelerate's state counts one process per job (DeepSpeed still all-reduces), so
    each rank would train and write as if alone; the real launch is refused before loading."""
    config = str(ROOT / "accelerate_configs" / "deepspeed_zero2.yaml")
    done = accelerate("--config_file", config, "--num_processes", "2", RUN, "--output_dir", str(tmp_path / "run"),
                      *SHORT_DEMO)  # fmt: skip
    assert done.returncode != 0
    errors = {line for line in done.stderr.splitlines() if line.startswith("error: ")}
    assert errors == {
        "error: DeepSpeed ZeRO-2 on CPU processes needs `ddp_backend: gloo` (without it accelerate counts one process "
        "per job and the ranks train apart); add `--ddp_backend gloo`"
    }
    assert not (tmp_path / "run" / "sft").exists()
