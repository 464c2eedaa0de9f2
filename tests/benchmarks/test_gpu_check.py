"""benchmarks/gpu_check.py: its pure helpers, a reused base model left as it was after a run, how a launch is
judged (results, and the device every evaluation generated on), the time budget and the second call, and the whole
check in its tiny CPU mode (the table and the JSON file it writes, with eval_base, keep_best and --eval_only)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_check  # noqa: E402
import gpu_check_launches as launching  # noqa: E402
import gpu_check_report as report  # noqa: E402
import gpu_check_runs  # noqa: E402
from gpu_check_runs import Measured  # noqa: E402


def test_ratio_is_none_without_a_usable_baseline():
    assert report.ratio(9.0, 10.0) == pytest.approx(0.9)
    assert report.ratio(None, 10.0) is None
    assert report.ratio(9.0, None) is None
    assert report.ratio(9.0, 0.0) is None


@pytest.mark.parametrize(
    ("speed", "memory", "baseline", "expected"),
    [
        (0.96, 2.94, 2.94, "meets target"),
        (0.95, 2.945, 2.94, "meets target"),  # within the allocator's granularity
        (0.94, 2.94, 2.94, "MISSES target: slower than 0.95x"),
        (1.10, 3.10, 2.94, "MISSES target: more memory"),
        (0.90, 3.10, 2.94, "MISSES target: slower than 0.95x, more memory"),
        (0.99, None, None, "meets speed target (memory not measured on CPU)"),
        (None, 2.94, 2.94, "n/a"),
    ],
)
def test_verdict_applies_the_speed_and_memory_targets(speed, memory, baseline, expected):
    assert report.verdict(speed, memory, baseline) == expected


def test_training_rows_compare_median_speed_and_largest_peak_with_the_bare_trainer():
    by_kind = {
        "trl": [Measured(1000.0, 3.0), Measured(1100.0, 3.2), Measured(900.0, 3.1)],
        "sftkey": [Measured(1045.0, 3.1), Measured(900.0, 3.3), Measured(1200.0, 3.0)],
    }
    baseline, ours = report.training_rows("1.5B QLoRA nf4", "completion", by_kind, cut=False, reference="H200: 18k")
    assert baseline.comparison == "baseline" and baseline.verdict == "H200: 18k"
    assert baseline.data["tokens_per_s"] == 1000.0 and baseline.data["peak_gib"] == 3.2
    assert ours.data["speed_ratio"] == pytest.approx(1.045)
    assert ours.data["memory_ratio"] == pytest.approx(3.3 / 3.2)
    assert ours.verdict == "MISSES target: more memory"
    assert ours.comparison == "1.045x" and ours.memory == "3.30 GiB (1.03x)"
    assert ours.data["runs"] == 3 and ours.data["group"] == "1.5B QLoRA nf4"
    assert [run["tokens_per_s"] for run in ours.data["each_run"]] == [1045.0, 900.0, 1200.0]


def test_training_rows_on_cpu_have_no_memory():
    by_kind = {"trl": [Measured(100.0, None)], "sftkey-no-part-losses": [Measured(97.0, None)]}
    rows = report.training_rows("1.5B (tiny) LoRA", "key", by_kind, cut=True)
    assert [row.memory for row in rows] == ["n/a (CPU)", "n/a (CPU)"]
    assert rows[1].verdict == "meets speed target (memory not measured on CPU)"
    assert rows[1].data["rounds_cut_by_budget"] is True
    unjudged = report.training_rows("1.5B (tiny) LoRA", "key", by_kind, cut=False, judge=False)
    assert unjudged[1].verdict == "not judged" and unjudged[1].data["speed_ratio"] == pytest.approx(0.97)


def test_memory_rows_put_the_measured_peak_against_the_estimate():
    rows = report.memory_rows("1.5B QLoRA nf4", "qlora", 2.80, {"completion": 2.94, "key": 3.50}, "batch 4 x 2048")
    assert [row.comparison for row in rows] == ["measured +5% vs estimate", "measured +25% vs estimate"]
    assert [row.verdict for row in rows] == ["estimate within 10%", "estimate off by over 10%"]
    assert rows[0].data["measured_over_estimate"] == pytest.approx(2.94 / 2.80)
    assert rows[0].result == "estimated 2.80 GiB" and rows[0].memory == "2.94 GiB"
    cpu = report.memory_rows("tiny", "lora", 0.0012, {"completion": None}, "batch 2 x 108")
    assert cpu[0].comparison == "measured: n/a (CPU)" and cpu[0].result == "estimated 1.2 MiB"
    assert cpu[0].data["measured_over_estimate"] is None


def test_memory_rows_use_the_dry_runs_estimate_for_the_published_shapes():
    from sftkey_trl.train.memory import MEASURED, estimate_for_model

    group = gpu_check.GPU_GROUPS[0]
    assert (group.shape, group.method, group.batch) == ("1.5B", "qlora", 4)
    expected = estimate_for_model("Qwen/Qwen2.5-1.5B", "qlora", 16, 2048, 4, True)
    assert gpu_check.estimate(group, False, None, 2048) == pytest.approx(expected)
    assert expected == pytest.approx(MEASURED[("Qwen/Qwen2.5-1.5B", "qlora", 4)], rel=0.1)


def test_last_error_line_finds_the_line_a_run_stopped_with():
    project = "Traceback...\nsome log\nerror: `load_in_8bit` is refused under FSDP; use load_in_4bit\n"
    assert report.last_error_line(project) == "error: `load_in_8bit` is refused under FSDP; use load_in_4bit"
    launched = "\n".join(
        [
            "[rank0]: Traceback (most recent call last):",
            '[rank0]:   File "run.py", line 3, in <module>',
            "[rank0]: TypeError: output tensor must have the same type as input tensor",
            "E1126 12:00:00 failed (exitcode: 1) local_rank: 0",
            "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: ",
            "subprocess.CalledProcessError: Command '['python', 'run.py']' returned non-zero exit status 1.",
        ]
    )
    assert report.last_error_line(launched) == "TypeError: output tensor must have the same type as input tensor"
    assert report.last_error_line("just\nlogs\n") == "logs"
    assert report.last_error_line("") == "(no output)"
    assert len(report.last_error_line("ValueError: " + "x" * 1000)) == 300


def test_format_table_has_one_line_per_row_and_escapes_pipes():
    rows = [report.Row("launch", "fsdp | LoRA", "error", verdict="a|b"), report.Row("training", "x", "1 tok/s")]
    lines = report.format_table(rows).splitlines()
    assert lines[0].startswith("| check | setup |") and len(lines) == 4
    assert "fsdp / LoRA" in lines[2] and lines[2].count("|") == 7


def _fake_launch(tmp_path: Path, script: str, *extra: str) -> launching.Launch:
    launch = launching.Launch("fsdp", "lora", tmp_path, list(extra))
    launch.stderr_path = tmp_path / "stderr.txt"
    with open(launch.stderr_path, "w") as err:
        launch.process = subprocess.Popen([sys.executable, "-c", script], stderr=err, start_new_session=True)
    return launch


LOG = ["base: generating 8 answers on cuda:0", "keep_best: generating 1 answers on cuda:0",
       "[rank0]: keep_best: generating 1 answers on cuda:0", "sft: generating 8 answers on cuda:0",
       "key: generating 8 answers on cuda:0"]  # fmt: skip
KEPT = {"training": {"keep_best": {"best_step": 0}}, "accuracy": 0.1}


@pytest.mark.parametrize(
    ("results", "log", "code", "status", "detail"),
    [
        ({"base": {"accuracy": 0.0}, "stages": {"sft": {"accuracy": 0.0}, "key": KEPT}}, LOG, 0, "works",
         "cuda:0: base, keep_best x2, sft, key"),
        ({"base": {"accuracy": 0.0}, "stages": {"sft": {"accuracy": 0.0}, "key": {"training": {}}}}, LOG, 0, "error",
         "no key, key's keep_best"),  # key stage never evaluated, no keep_best
        ({"stages": {"sft": {"accuracy": 0.0}, "key": KEPT}}, LOG, 0, "error", "no base"),
        ({"base": {"accuracy": 0.0}, "stages": {"sft": {"accuracy": 0.0}, "key": KEPT}},
         [*LOG[:3], "sft: generating 8 answers on cpu", LOG[4]], 0, "error", "off the training device: sft"),
        ({}, ["ValueError: boom"], 3, "error", "ValueError: boom"),
    ],
)  # fmt: skip
def test_a_launch_works_only_with_every_evaluation_done_on_the_training_device(tmp_path, results, log, code, status,
                                                                               detail):  # fmt: skip
    path = tmp_path / "run" / "results.json"
    script = (
        f"import json, pathlib, sys; p = pathlib.Path({str(path)!r}); p.parent.mkdir(); "
        f"p.write_text(json.dumps({results!r})); print({chr(10).join(log)!r}, file=sys.stderr); sys.exit({code})"
    )
    result = launching.finish_launch(_fake_launch(tmp_path, script), 60, report.last_error_line, cuda=True)
    assert result["status"] == status and detail in result["detail"], result
    if code:
        assert result["exit_status"] == code


def test_generation_devices_are_read_through_progress_bars_and_rank_prefixes():
    log = ("\r 50%|#####     | 1/2 [00:11<00:11, 11.47s/it]keep_best: generating 4 answers on cuda:0\n"
           "\x1b[A      \x1b[Aeval_only/sft: generating 8 answers on cpu\n"
           "[rank0]: base: generating 8 answers on cuda:0\n"
           "keep_best: step 0 validation accuracy 0.0000\n")  # fmt: skip
    devices = launching.generation_devices(log)
    assert devices == [["keep_best", "cuda:0"], ["eval_only/sft", "cpu"], ["base", "cuda:0"]]
    assert launching.misplaced(devices, cuda=True) == ["eval_only/sft"]
    assert launching.summary(devices) == "cuda:0: keep_best, base; cpu: eval_only/sft"


def test_an_eval_only_launch_needs_its_metrics(tmp_path):
    metrics = tmp_path / "run" / "eval_only" / "sft" / "metrics.json"
    script = (f"import json, pathlib, sys; p = pathlib.Path({str(metrics)!r}); p.parent.mkdir(parents=True); "
              f"p.write_text(json.dumps({{'accuracy': 0.5}})); "
              f"print('eval_only/sft: generating 8 answers on cpu', file=sys.stderr)")  # fmt: skip
    launch = _fake_launch(tmp_path, script, "--eval_only", "--checkpoint", "x")
    result = launching.finish_launch(launch, 60, report.last_error_line, cuda=False)
    assert result["status"] == "works" and result["devices"] == [["eval_only/sft", "cpu"]], result
    assert launching.finish_launch(_fake_launch(tmp_path, script, "--eval_only"), 60, report.last_error_line,
                                   cuda=True)["status"] == "error"  # fmt: skip


@pytest.mark.slow
def test_a_launch_that_hangs_is_killed_at_its_timeout(tmp_path):
    launch = _fake_launch(tmp_path, "import time; time.sleep(60)")
    result = launching.finish_launch(launch, 1, report.last_error_line, cuda=False)
    assert result["status"] == "timeout" and launch.process.returncode is not None


@pytest.mark.slow
def test_the_default_budget_leaves_a_600_s_device_call_room_and_names_the_second_call(monkeypatch, tmp_path):
    monkeypatch.setattr(gpu_check.torch.cuda, "is_available", lambda: True)
    assert gpu_check.parse_args(["--device", "cuda"]).budget_s == 420.0
    monkeypatch.undo()
    args = gpu_check.parse_args(["--device", "cpu", "--tiny", "--parts", "training,generation", "--budget_s", "0",
                                 "--groups", "1.5B-lora,7B-qlora", "--out", str(tmp_path / "check.json"),
                                 "--work", str(tmp_path / "work")])  # fmt: skip
    check = gpu_check.Check(args)
    check.run()
    assert [row.result for row in check.rows] == ["skipped", "skipped"]
    second = "bash scripts/gpu_check.sh --parts training,generation --groups 1.5B-lora,7B-qlora"
    assert check.meta["next_call"] == second
    written = json.loads((tmp_path / "check.json").read_text())  # written as each row landed
    assert [row["result"] for row in written["rows"]] == ["skipped", "skipped"]


def test_liger_runs_leave_the_model_module_as_it_was(monkeypatch):
    """Liger swaps module-wide classes and functions; the models loaded after its runs must not get them."""
    from transformers.models.llama import modeling_llama

    class Base(modeling_llama.LlamaForCausalLM):
        pass

    Base.__module__ = modeling_llama.__name__
    original = dict(vars(modeling_llama)), modeling_llama.LlamaRMSNorm, Base.forward

    def patching_run(kind, base, *args, liger=False, **kwargs):
        assert liger and kind == "sftkey"
        modeling_llama.LlamaRMSNorm = object
        modeling_llama.liger_added = True
        Base.forward = lambda self: None
        return Measured(1.0, None), base

    monkeypatch.setattr(gpu_check_runs, "train_once", patching_run)
    try:
        results = gpu_check_runs.measure_liger(object.__new__(Base), None, None, {})
        assert set(results) == {"completion", "key"}
        assert modeling_llama.LlamaRMSNorm is original[1] and Base.forward is original[2]
        assert not hasattr(modeling_llama, "liger_added") and set(vars(modeling_llama)) == set(original[0])
    finally:  # other tests use this module: never leave it patched, even when measure_liger fails
        modeling_llama.LlamaRMSNorm = original[1]
        vars(modeling_llama).pop("liger_added", None)


@pytest.mark.slow
def test_release_gives_back_the_base_model_as_it_was(tiny_model_dir, char_tokenizer, tmp_path):
    """Runs reuse one loaded base model: after a run no adapter, patch or hook may be left on it."""
    from gpu_check_models import long_examples, tokenised

    values = gpu_check_runs.training_values(tmp_path, 2, 2, cuda=False)
    base = gpu_check_runs.load_base(tiny_model_dir, "lora", values)
    names = [name for name, _ in base.named_modules()]
    columns = tokenised(char_tokenizer, long_examples(char_tokenizer, 4, 200))
    for kind in ("sftkey", "trl"):
        measured, base = gpu_check_runs.train_once(
            kind, base, char_tokenizer, columns, gpu_check_runs.STAGES[1], values
        )
        assert measured.tokens_per_s > 0 and measured.peak_gib is None
        assert [name for name, _ in base.named_modules()] == names
        assert "forward" not in base.__dict__ and not base.get_input_embeddings()._forward_hooks
        assert not any(p.requires_grad for p in base.parameters())


@pytest.mark.e2e
def test_tiny_cpu_mode_prints_the_table_and_writes_the_json(tmp_path):
    out = tmp_path / "gpu_check.json"
    command = [sys.executable, str(ROOT / "benchmarks/gpu_check.py"), "--device", "cpu", "--tiny",
               "--launch_methods", "lora", "--out", str(out), "--work", str(tmp_path / "work")]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert report["meta"]["mode"] == "tiny" and report["meta"]["versions"]["trl"]
    assert {row["section"] for row in rows} == {"training", "memory", "liger", "generation", "launch"}

    training = [row["data"] for row in rows if row["section"] == "training"]
    groups = [group.label(cuda=False) for group in gpu_check.TINY_GROUPS]
    expected = {(g, "completion", k) for g in groups for k in ("trl", "sftkey")}
    expected |= {(g, "key", k) for g in groups for k in ("trl", "sftkey", "sftkey-no-part-losses")}
    assert {(d["group"], d["loss_on"], d["kind"]) for d in training} == expected
    for data in training:
        assert data["tokens_per_s"] > 0 and data["peak_gib"] is None
        assert (data["speed_ratio"] is None) == (data["kind"] == "trl")

    memory = [row["data"] for row in rows if row["section"] == "memory"]
    assert {(d["group"], d["loss_on"]) for d in memory} == {(g, s) for g in groups for s in ("completion", "key")}
    assert all(d["estimated_gib"] > 0 and d["measured_gib"] is None for d in memory)

    launches = [row for row in rows if row["section"] == "launch"]
    runs = {row["data"]["config"]: row for row in launches if not row["data"]["eval_only"]}
    assert set(runs) == set(launching.LAUNCH_CONFIGS)
    deepspeed = "not installed" if "not installed" in report["meta"]["versions"]["deepspeed"] else None
    for name, row in runs.items():
        assert row["result"] in {"works", "error", "not installed", "timeout"} and "\n" not in row["verdict"]
        if name.startswith("deepspeed") and deepspeed:
            assert row["result"] == deepspeed
    # The control runs what users run, and every model that generated was on the training device (the CPU here)
    control = runs["single_gpu"]
    assert control["result"] == "works", control
    generated = [what for what, device in control["data"]["devices"] if device == "cpu"]
    assert len(generated) == len(control["data"]["devices"]) and generated[0] == "base"
    assert {"base", "sft", "key"} <= set(generated) and generated.count("keep_best") >= 2
    evaluations = {row["data"]["config"]: row for row in launches if row["data"]["eval_only"]}
    assert evaluations["single_gpu"]["result"] == "works", evaluations
    assert evaluations["single_gpu"]["data"]["devices"] == [["eval_only/sft", "cpu"]]
    for name, row in evaluations.items():  # an --eval_only after every LoRA run that worked
        assert runs[name]["result"] == "works" and row["result"] in {"works", "error", "timeout"}

    (generation,) = [row["data"] for row in rows if row["section"] == "generation"]
    assert generation["batched_tokens_per_s"] > 0 and generation["single_tokens_per_s"] > 0
    if report["meta"]["versions"]["liger-kernel"] == "not installed":
        assert [row["result"] for row in rows if row["section"] == "liger"] == ["not installed"]

    table = [line for line in done.stdout.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| check |") and len(table) == len(rows) + 2  # header and its rule
    assert out.with_suffix(".md").read_text().count("\n") == len(rows) + 2
