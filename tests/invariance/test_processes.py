"""Invariance across processes on the real model: SmolLM2-135M-Instruct with LoRA, through both stages with
keep-best and evaluation after each stage, in 2 CPU processes (gloo, 2 x batch 2) trains, selects and scores
exactly like 1 process (batch 2 x accumulation 2): the same global batch, so the same equivalence class.

Tolerances as in tests/real_launches.py: per-step losses within 1e-5 relative (float32 all-reduce sums in another
order than accumulation), adapter weights within 1e-4 of each tensor's largest value; the keep-best choices and
every evaluation metric equal.
"""

from __future__ import annotations

import json

import pytest
from real_launches import LORA, RUN, accelerate, assert_trains_like_one_process, free_port

pytestmark = [pytest.mark.invariance, pytest.mark.real_model, pytest.mark.distributed, pytest.mark.e2e]

SUMS = [(a, b) for a in range(1, 7) for b in range(1, 5)]  # 24 short problems: 20 to train/validate, 4 to test
STAGES = (
    "[{name: sft, loss_on: completion, num_train_epochs: 1, keep_best: true},"
    " {name: key, loss_on: key, num_train_epochs: 1, keep_best: true, learning_rate: 2.0e-4}]"
)


def write_rows(path, pairs) -> str:
    rows = [{"question": f"{a}+{b}?", "reasoning": f"{a}+{b}={a + b}", "answer": str(a + b)} for a, b in pairs]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def recipe(tmp_path, smollm2_dir) -> list[str]:
    train = write_rows(tmp_path / "train.jsonl", SUMS[:20])
    test = write_rows(tmp_path / "test.jsonl", SUMS[20:])
    # 16 training rows and 4 validation rows (eval_fraction 0.2): 4 optimizer steps of global batch 4 per stage
    return ["--model_name_or_path", str(smollm2_dir), "--dtype", "float32", *LORA, "--lora_r", "4",
            "--dataset_name", train, "--eval_dataset_name", test, "--eval_split", "train", "--eval_fraction", "0.2",
            "--max_new_tokens", "24", "--eval_batch_size", "4", "--per_device_train_batch_size", "2",
            "--global_batch_size", "4", "--learning_rate", "2.0e-3", "--lr_scheduler_type", "constant",
            "--eval_steps", "2", "--logging_steps", "1", "--save_strategy", "no", "--bf16", "false",
            "--use_cpu", "true", "--stages", STAGES]  # fmt: skip


def test_two_processes_train_select_and_score_like_one(tmp_path, smollm2_dir):
    flags = recipe(tmp_path, smollm2_dir)
    one, two = tmp_path / "one", tmp_path / "two"
    single = accelerate("--num_processes", "1", "--cpu", RUN, "--output_dir", str(one), *flags)
    assert single.returncode == 0, single.stderr[-4000:]
    double = accelerate("--multi_gpu", "--num_processes", "2", "--main_process_ip", "127.0.0.1",
                        "--main_process_port", str(free_port()), RUN, "--output_dir", str(two), *flags)  # fmt: skip
    assert double.returncode == 0, double.stderr[-4000:]
    assert_trains_like_one_process(two, one, world_size=2, weights="adapter_model.safetensors")
    results_one = json.loads((one / "results.json").read_text())["stages"]
    results_two = json.loads((two / "results.json").read_text())["stages"]
    for stage in ("sft", "key"):
        kept_one, kept_two = results_one[stage]["training"]["keep_best"], results_two[stage]["training"]["keep_best"]
        assert len(kept_one["history"]) >= 2  # the incoming weights and the snapshots were compared
        assert kept_two == kept_one, stage
        for metric, value in results_one[stage].items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                assert results_two[stage][metric] == pytest.approx(value, rel=1e-9, abs=1e-12), (stage, metric)
        assert results_one[stage]["num_examples"] == 4
