"""One-process reference runs shared by the multi-process engine tests (test_multinode.py, test_deepspeed.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from real_launches import LORA, one_process


@pytest.fixture(scope="session")
def reference_full(tmp_path_factory) -> Path:
    """The shortened demo, full fine-tuning, in one CPU process (no evaluation)."""
    run = tmp_path_factory.mktemp("one_process") / "full"
    one_process(run, "--eval_after_stages", "false")
    return run


@pytest.fixture(scope="session")
def reference_lora(tmp_path_factory) -> Path:
    """The same with LoRA (`lora_dropout: 0`)."""
    run = tmp_path_factory.mktemp("one_process") / "lora"
    one_process(run, *LORA, "--eval_after_stages", "false")
    return run
