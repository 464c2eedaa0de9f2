"""Which engines run on CPU processes, and the one-line refusals of those that do not (`check_engine_runs_here`).

accelerate 1.15 turns a job into FSDP only on GPU-class devices, so FSDP on CPU processes is refused before the model
loads (without the check it stopped in accelerate's FSDP plugin, or ran plain DDP or unconnected processes while
the README said FSDP). DeepSpeed runs on CPU with `ddp_backend: gloo` and without `use_cpu`; the two settings that
silently leave it (plain DDP; every rank alone) are refused. The simulated launches are those of `launching.py`.
"""

from __future__ import annotations

import pytest
from launching import assert_one_line_with, training_args
from real_launches import ROOT, RUN, SHORT_DEMO, accelerate

from sftkey_trl.errors import SFTKeyError
from sftkey_trl.train.distributed import check_engine_runs_here


@pytest.mark.parametrize("overrides", [(), ("--fsdp_version", "2")])
@pytest.mark.parametrize("device", ["cpu", "cuda:0"])
def test_fsdp_is_refused_on_cpu_processes_only(launched, overrides, device):
    launched("fsdp", *overrides)
    args = training_args(device=device, use_cpu=False, ddp_backend=None)
    if device == "cuda:0":
        check_engine_runs_here(args)
        return
    with pytest.raises(SFTKeyError) as error:
        check_engine_runs_here(args)
    assert_one_line_with(error, "does not run on CPU processes", "deepspeed_zero3.yaml", "multi_gpu.yaml")


def test_fsdp_from_the_training_arguments_with_use_cpu_is_refused(launched):
    launched(None)
    with pytest.raises(SFTKeyError):
        check_engine_runs_here(training_args(device="cpu", use_cpu=True, fsdp="full_shard", ddp_backend=None))


@pytest.mark.parametrize("name", ["deepspeed_zero2", "deepspeed_zero3"])
def test_deepspeed_on_cpu_needs_gloo_and_no_use_cpu(launched, name):
    launched(name, "--num_processes", "2")
    with pytest.raises(SFTKeyError) as error:
        check_engine_runs_here(training_args(device="cpu", use_cpu=True, ddp_backend="gloo"))
    assert_one_line_with(error, "`use_cpu: true`", "plain DDP", "ddp_backend: gloo")
    with pytest.raises(SFTKeyError) as error:
        check_engine_runs_here(training_args(device="cpu", use_cpu=False, ddp_backend=None))
    assert_one_line_with(error, "needs `ddp_backend: gloo`", "--ddp_backend gloo")
    check_engine_runs_here(training_args(device="cpu", use_cpu=False, ddp_backend="gloo"))  # what runs on CPU
    check_engine_runs_here(training_args(device="cuda:0", use_cpu=False, ddp_backend=None))  # GPUs: unchanged


@pytest.mark.parametrize("name", [None, "single_gpu", "multi_gpu"])
def test_ddp_and_one_process_pass_on_cpu(launched, name):
    launched(name)
    check_engine_runs_here(training_args(device="cpu", use_cpu=True, ddp_backend=None))


@pytest.mark.e2e
@pytest.mark.distributed
def test_the_fsdp_config_on_two_cpu_processes_stops_with_one_line(tmp_path):
    """The shipped fsdp.yaml on two CPU processes: refused before loading, with the line the README quotes."""
    done = accelerate("--config_file", str(ROOT / "accelerate_configs/fsdp.yaml"), "--num_processes", "2", RUN,
                      "--output_dir", str(tmp_path / "fsdp"), *SHORT_DEMO, "--use_cpu", "true")  # fmt: skip
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert errors and set(errors) == {
        "error: FSDP1 does not run on CPU processes (accelerate shards with FSDP only on GPUs; on CPU it runs plain "
        "DDP or unconnected processes); on CPU launch with accelerate_configs/deepspeed_zero3.yaml "
        "(`ddp_backend: gloo`) or multi_gpu.yaml (`use_cpu: true`)"
    }
    assert "Traceback" not in done.stderr.split("error: ")[0] and not (tmp_path / "fsdp" / "sft").exists()
