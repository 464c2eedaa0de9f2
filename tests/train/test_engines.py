"""A stage's engine around the Trainer (`sftkey_trl.train.engines`): keep_best generating under real FSDP1 on two CPU
processes, and the checkpointing setting TRL passes reaching the model."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT, script_args

from sftkey_trl.data.formatting import Formatter

QUESTIONS = [f"Compute {a} + {b}." for a, b in ((1, 2), (3, 4), (5, 6), (7, 8), (2, 9))]
MAX_NEW_TOKENS = 6

# keep_best's step-0 validation as the Trainer runs it under FSDP1: the callback gets the model the Trainer was built
# with, while the FSDP wrapper (`trainer.model_wrapped`) holds the weights. accelerate starts FSDP only on GPUs, so
# the wrapper is built here the way accelerate builds it from accelerate_configs/fsdp.yaml: FSDP1, one unit per
# decoder layer (TRANSFORMER_BASED_WRAP on `_no_split_modules`), `use_orig_params: false`.
SCRIPT = """
import functools, json, sys
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
import torch
from accelerate import PartialState
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerControl, TrainerState
from transformers.models.llama.modeling_llama import LlamaDecoderLayer
from sftkey_trl.data.formatting import Formatter
from sftkey_trl.evaluation.generation import evaluate_model
from sftkey_trl.recipe.schema import SFTKeyScriptArguments
from sftkey_trl.run.process import close_process_group
from sftkey_trl.train.keep_best import KeepBestCallback

model_dir, examples_file, out = sys.argv[1:4]
state = PartialState(cpu=True, backend="gloo", timeout=timedelta(seconds=60))
tokenizer = AutoTokenizer.from_pretrained(model_dir)
model = AutoModelForCausalLM.from_pretrained(model_dir)
policy = functools.partial(transformer_auto_wrap_policy, transformer_layer_cls={LlamaDecoderLayer})
wrapped = FSDP(model, auto_wrap_policy=policy, use_orig_params=False, device_id=torch.device("cpu"))
args = SFTKeyScriptArguments(eval_batch_size=2, max_new_tokens=int(sys.argv[4]))
examples, generations = json.load(open(examples_file)), []


def evaluate(model):  # as Pipeline.keep_best_callback: every rank generates, in lockstep
    metrics, predictions = evaluate_model(model, tokenizer, examples, "numeric", args, Formatter(tokenizer, args),
                                          synced_gpus=True, label="keep_best")
    generations.extend(p["generation"] for p in predictions)
    return metrics


trainer = SimpleNamespace(model_wrapped=wrapped, save_model=lambda folder: None)
callback = KeepBestCallback(evaluate, "accuracy", Path(out).parent / "stage", 1, trainer, state.is_main_process)
callback.start(None)
try:
    callback.on_train_begin(None, TrainerState(), TrainerControl(), model=model)
except RuntimeError as error:
    print("FAILED", type(error).__name__, str(error).splitlines()[0], file=sys.stderr)
    sys.exit(1)
if state.is_main_process:
    json.dump({"history": callback.history, "generations": generations}, open(out, "w"))
del trainer, callback, wrapped, model, evaluate  # nothing holds the group: closing it joins its threads
close_process_group()  # as the entry points do at exit: a gloo group left to teardown can abort a finished rank
"""


@pytest.mark.e2e
@pytest.mark.distributed
def test_keep_best_generates_from_full_parameters_under_fsdp1(tmp_path, tiny_model_dir):
    """The root FSDP1 unit (embeddings, final norm, LM head) stays sharded outside the wrapper's forward, so
    generating from the model the callback gets read flattened shards ("setStorage: ... out of bounds" here);
    keep_best gathers the root unit for its evaluation and generates what one process generates."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sftkey_trl.evaluation.generation import evaluate_model

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    args = script_args(eval_batch_size=2, max_new_tokens=MAX_NEW_TOKENS)
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
    assert two["generations"] == [p["generation"] for p in predictions]
    assert two["history"] == [[0, metrics["accuracy"]]]


def test_trls_reentrant_checkpointing_for_peft_with_zero3_reaches_what_transformers_reads(tmp_path):
    """TRL (sft_trainer.py, PEFT + ZeRO-3 + checkpointing) does `args.gradient_checkpointing_kwargs =
    args.gradient_checkpointing_kwargs or {}` and sets `use_reentrant` there; transformers 5.24's Trainer reads
    `activation_checkpointing_kwargs`. Shared, non-empty, the two names are one setting. (The ZeRO-3 launch in
    tests/train/test_deepspeed.py checks the checkpointed layers themselves.)"""
    from sftkey_trl.recipe.schema import SFTKeyConfig
    from sftkey_trl.train.engines import share_checkpointing_kwargs

    args = SFTKeyConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    assert args.activation_checkpointing and args.activation_checkpointing_kwargs is None
    share_checkpointing_kwargs(args)
    args.gradient_checkpointing_kwargs = args.gradient_checkpointing_kwargs or {}  # TRL's two lines
    args.gradient_checkpointing_kwargs["use_reentrant"] = True
    assert args.activation_checkpointing_kwargs == {"use_reentrant": True}
    own = SFTKeyConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True,
                       activation_checkpointing_kwargs={"use_reentrant": True, "every_n_layers": 2})  # fmt: skip
    share_checkpointing_kwargs(own)
    assert own.gradient_checkpointing_kwargs is own.activation_checkpointing_kwargs
    assert own.activation_checkpointing_kwargs == {"use_reentrant": True, "every_n_layers": 2}  # the user's, kept
    off = SFTKeyConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, activation_checkpointing=False)
    share_checkpointing_kwargs(off)
    assert off.activation_checkpointing_kwargs is None
