"""Generation on weights sharded across ranks (keep_best under ZeRO-3/FSDP evaluates the model being trained): every
forward is collective there (each layer gathers its shards from all ranks), so every rank must call `generate`
equally often, whatever the number of evaluation rows. Two CPU processes (gloo, 127.0.0.1) emulate it: the tiny
model's forward takes part in an all-reduce, as a sharded forward does, and carries transformers' FSDP marker, so
`generate` synchronises the ranks token by token itself (`synced_gpus`). With 5 rows in batches of 1, one rank had
3 generate calls and the other 2: the third waited for a partner that never came."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT, script_args

from sftkey_trl.data.formatting import Formatter

QUESTIONS = [f"Compute {a} + {b}." for a, b in ((1, 2), (3, 4), (5, 6), (7, 8), (2, 9))]  # 5 rows: 3 + 2
MAX_NEW_TOKENS = 6

SCRIPT = """
import json, sys
from datetime import timedelta
import torch
import torch.distributed as dist
from accelerate import PartialState
from transformers import AutoModelForCausalLM, AutoTokenizer
from sftkey_trl.data.formatting import Formatter
from sftkey_trl.evaluation.generation import evaluate_model
from sftkey_trl.recipe.schema import SFTKeyScriptArguments
from sftkey_trl.run.process import close_process_group

model_dir, examples_file, out = sys.argv[1:4]
state = PartialState(cpu=True, backend="gloo", timeout=timedelta(seconds=30))
tokenizer = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForCausalLM.from_pretrained(model_dir)
model._is_fsdp_managed_module = True  # transformers' FSDP2 marker: `generate` then passes synced_gpus=True itself
forward = model.forward


def sharded_forward(*args, **kwargs):
    dist.all_reduce(torch.zeros(1))  # a sharded forward gathers each layer's weights from every rank
    return forward(*args, **kwargs)


model.forward = sharded_forward
args = SFTKeyScriptArguments(eval_batch_size=1, max_new_tokens=int(sys.argv[4]))
examples = json.load(open(examples_file))
metrics, predictions = evaluate_model(model, tokenizer, examples, "numeric", args, Formatter(tokenizer, args))
if state.is_main_process:
    json.dump({"metrics": metrics, "generations": [p["generation"] for p in predictions]}, open(out, "w"))
close_process_group()  # as the entry points do at exit: a gloo group left to teardown can abort a finished rank
"""


@pytest.mark.e2e
def test_uneven_shards_generate_in_lockstep_on_sharded_weights(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sftkey_trl.evaluation.generation import evaluate_model

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    args = script_args(eval_batch_size=1, max_new_tokens=MAX_NEW_TOKENS)
    formatter = Formatter(tokenizer, args)
    examples = [{"index": i, "prompt": formatter.prompt(q), "gold": "3", "reasoning": None}
                for i, q in enumerate(QUESTIONS)]  # fmt: skip
    (tmp_path / "examples.json").write_text(json.dumps(examples))
    (tmp_path / "script.py").write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "accelerate_configs/multi_gpu.yaml"), "--num_processes", "2", "--main_process_ip",
               "127.0.0.1", "--main_process_port", "0", str(tmp_path / "script.py"), str(tiny_model_dir),
               str(tmp_path / "examples.json"), str(tmp_path / "out.json"), str(MAX_NEW_TOKENS)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    two = json.loads((tmp_path / "out.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    metrics, predictions = evaluate_model(model, tokenizer, examples, "numeric", args, formatter)
    assert two["generations"] == [p["generation"] for p in predictions]  # each row once, in order, as one process
    assert two["metrics"] == metrics and metrics["num_examples"] == len(QUESTIONS)
