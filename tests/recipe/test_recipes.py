"""Recipes: every shipped recipe parses and passes the dry run and follows the repository's conventions (its header
launches existing files), the README index lists every recipe, and the memory estimates stay close to the measured
figures. The checks on users' recipes are in test_checks.py."""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

import pytest
import yaml
from conftest import ROOT
from test_checks import run_dry

from sftkey_trl.recipe.dryrun import HARDWARE_PREFIX, LAUNCH_PREFIX, header_value
from sftkey_trl.recipe.flags import flag_value
from sftkey_trl.recipe.parsing import parse_config
from sftkey_trl.train.memory import MEASURED, MODEL_SHAPES, calibration, estimate_for_model, estimate_memory_gib

RECIPES_DIR = ROOT / "recipes"
RECIPES = sorted(
    str(path.relative_to(ROOT))
    for path in RECIPES_DIR.rglob("*.yaml")
    if "demo" not in path.relative_to(RECIPES_DIR).parts
)
MODELS = ["qwen2.5-1.5b", "qwen2.5-3b", "qwen2.5-7b", "qwen3-8b-base", "smollm3-3b-base"]
REQUIRED = (
    [f"recipes/{model}/gsm8k/sftkey_qlora_24gb.yaml" for model in MODELS]
    + [f"recipes/{model}/gsm8k/sftkey_qlora_16gb.yaml" for model in MODELS]
    + [
        "recipes/qwen2.5-7b/openr1_math/sftkey_qlora_24gb.yaml",
        "recipes/qwen2.5-3b/openbookqa/sftkey_qlora_24gb.yaml",
        "recipes/qwen2.5-3b/cot_collection/sftkey_qlora_24gb.yaml",
        "recipes/qwen2.5-7b/gsm8k/sftkey_full_8gpu.yaml",
        "recipes/qwen3-8b-base/gsm8k/sftkey_full_8gpu.yaml",
    ]
)
# The real-model recipes on SmolLM2-135M-Instruct: its own chat template, full fine-tuning, one of them CPU-sized
SMOLLM2 = [
    "recipes/smollm2-135m/arithmetic/sftkey_full_cpu.yaml",
    "recipes/smollm2-135m/gsm8k/sftkey_full_1gpu.yaml",
]
SMOLLM2_LORA = ["recipes/smollm2-135m/word_problems/sftkey_lora_cpu.yaml"]  # the real-model comparison (LoRA)
REQUIRED += SMOLLM2 + SMOLLM2_LORA


def parse(recipe: str):
    """(script, training and model arguments, stages) of a recipe in this repository."""
    parsed = parse_config(["--config", str(ROOT / recipe)])
    return parsed.script, parsed.training, parsed.model, parsed.stages


def launch_line(path) -> str | None:
    return header_value(path, LAUNCH_PREFIX)


def test_required_recipes_exist():
    assert sorted(REQUIRED) == RECIPES


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_passes_dry_run(recipe):
    report = run_dry(str(ROOT / recipe))
    assert report.startswith("# sftkey dry run: every check passed")
    resolved = yaml.safe_load(report)
    assert [stage["name"] for stage in resolved["stages"]] == ["sft", "key"]
    assert resolved["memory"]["estimated_peak_gib_per_gpu"] > 0


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_header_launches_existing_files(recipe):
    lines = (ROOT / recipe).read_text().splitlines()
    assert lines[0].startswith("# Hardware: ") and header_value(ROOT / recipe, HARDWARE_PREFIX)
    assert lines[1].startswith("# Launch: accelerate launch ") and "--config_file accelerate_configs/" in lines[1]
    assert not lines[2].startswith("#"), "the header is exactly two comment lines"
    tokens = shlex.split(launch_line(ROOT / recipe))
    assert tokens[:2] == ["accelerate", "launch"] and "recipes/run.py" in tokens
    config_file = flag_value(tokens, "--config_file")
    assert (ROOT / config_file).is_file(), f"{recipe}: accelerate config {config_file} does not exist"
    # one process: `-q` keeps accelerate's traceback from following a one-line error (torchrun's launches ignore it)
    assert ("-q" in tokens) == (config_file == "accelerate_configs/single_gpu.yaml"), lines[1]
    assert flag_value(tokens, "--config") == recipe


@pytest.mark.parametrize("recipe", [recipe for recipe in RECIPES if recipe not in SMOLLM2 + SMOLLM2_LORA])
def test_recipe_conventions(recipe):
    script_args, training_args, model_args, stages = parse(recipe)
    _, model, dataset, file_name = Path(recipe).parts
    variant = Path(file_name).stem
    launch = launch_line(ROOT / recipe)
    assert training_args.output_dir == f"outputs/{model}/{dataset}/{variant}"
    assert script_args.dataset_format == dataset
    assert script_args.response_format == "tags"
    assert [stage.loss_on for stage in stages] == ["completion", "key"]
    assert script_args.eval_split or script_args.eval_fraction > 0
    assert model_args.model_name_or_path in MODEL_SHAPES
    assert model_args.dtype == "bfloat16" and training_args.activation_checkpointing
    # base models: one ChatML template for training and generation, closed by <|im_end|>
    assert script_args.chat_template.rstrip().endswith("{%- endif %}") and "<|im_end|>" in script_args.chat_template
    assert training_args.eos_token == "<|im_end|>"
    assert training_args.report_to in ("none", ["none"], [])
    if "qlora" in variant:
        assert model_args.load_in_4bit and model_args.use_peft and model_args.use_bnb_nested_quant
        assert model_args.bnb_4bit_quant_type == "nf4" and not model_args.lora_target_modules
        assert 1e-4 <= training_args.learning_rate <= 2e-4
        assert "accelerate_configs/single_gpu.yaml" in launch
    else:  # the paper's full fine-tuning
        assert not model_args.use_peft and not model_args.load_in_4bit
        assert training_args.learning_rate == 5e-6 and training_args.weight_decay == 0.1
        assert training_args.global_batch_size == 256
        assert "accelerate_configs/deepspeed_zero3.yaml" in launch
        sft = stages[0].overrides
        assert sft["warmup_steps"] == pytest.approx(0.5 / sft["num_train_epochs"], abs=1e-3)


@pytest.mark.parametrize("recipe", SMOLLM2)
def test_smollm2_recipe_conventions(recipe):
    script_args, training_args, model_args, stages = parse(recipe)
    _, model, dataset, file_name = Path(recipe).parts
    assert training_args.output_dir == f"outputs/{model}/{dataset}/{Path(file_name).stem}"
    assert script_args.response_format == "tags" and [stage.loss_on for stage in stages] == ["completion", "key"]
    assert script_args.eval_split or script_args.eval_fraction > 0
    # An instruct model: its own chat template (default system prompt) and its EOS, <|im_end|>
    assert script_args.chat_template is None and training_args.eos_token is None
    assert not model_args.use_peft and not model_args.load_in_4bit and model_args.model_name_or_path in MODEL_SHAPES
    assert training_args.report_to in ("none", ["none"], [])
    if "cpu" in file_name:  # offline, small, and its header says how long it took
        assert model_args.model_name_or_path == "local:smollm2-135m-instruct"
        assert script_args.dataset_name == script_args.eval_dataset_name == "demo:arithmetic"
        assert script_args.max_train_samples <= 64 and script_args.max_eval_samples <= 32
        assert re.search(r"2 cores: about \d+ minutes, measured", header_value(ROOT / recipe, HARDWARE_PREFIX))
    else:
        assert model_args.model_name_or_path == "HuggingFaceTB/SmolLM2-135M-Instruct"
        assert script_args.dataset_format == dataset == "gsm8k"
        assert "--model_name_or_path local:smollm2-135m-instruct" in (ROOT / recipe).read_text()


def test_small_card_recipes_accumulate_to_the_same_global_batch():
    for model in MODELS:
        big = parse(f"recipes/{model}/gsm8k/sftkey_qlora_24gb.yaml")[1]
        small = parse(f"recipes/{model}/gsm8k/sftkey_qlora_16gb.yaml")[1]
        assert small.per_device_train_batch_size < big.per_device_train_batch_size
        assert small.global_batch_size == big.global_batch_size
        assert small.max_length <= big.max_length


# --------------------------------------------------------------------------------------------------
# README index


def load_make_index():
    spec = importlib.util.spec_from_file_location("make_index", RECIPES_DIR / "make_index.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_lists_every_recipe_and_only_existing_ones():
    text = (RECIPES_DIR / "README.md").read_text()
    listed = set(re.findall(r"recipes/[a-z0-9][\w.\-]*/[\w.\-/]+\.yaml", text))
    assert set(RECIPES) <= listed
    missing = [path for path in listed if not (ROOT / path).is_file()]
    assert not missing, f"README lists recipes that do not exist: {missing}"


def test_readme_index_is_up_to_date():
    make_index = load_make_index()
    text = (RECIPES_DIR / "README.md").read_text()
    assert make_index.render_readme(text) == text, "run: python recipes/make_index.py"
    assert "(estimated)" in text


# --------------------------------------------------------------------------------------------------
# memory estimates


@pytest.mark.parametrize("model, method, batch, measured, estimate", calibration())
def test_memory_estimate_close_to_measured(model, method, batch, measured, estimate):
    assert abs(estimate - measured) / measured <= 0.35


def test_memory_estimate_positional_signature():
    """`estimate_memory_gib(params_b, method, lora_r, seq_len, batch, hidden, layers, checkpointing, gpus)`."""
    for (model, method, batch), measured in MEASURED.items():
        shape = MODEL_SHAPES[model]
        estimate = estimate_memory_gib(
            shape.params_b, method, 16, 2048, batch, shape.hidden_size, shape.num_layers, True, 1
        )
        assert abs(estimate - measured) / measured <= 0.35


def test_memory_estimate_moves_the_right_way():
    def estimate(method="qlora", batch=4, checkpointing=True, gpus=1):
        return estimate_for_model("Qwen/Qwen2.5-7B", method, 16, 1024, batch, checkpointing, gpus)

    assert estimate("qlora") < estimate("lora")
    assert estimate(checkpointing=True) < estimate(checkpointing=False)
    assert estimate(batch=2) < estimate(batch=8)
    assert estimate("full", gpus=8) < estimate("full", gpus=4)
    assert estimate_for_model("unknown/model", "qlora", 16, 1024, 4, True) is None
    with pytest.raises(ValueError):
        estimate_memory_gib(1.5, "qat", 16, 1024, 4, 1536, 28, True, 1)


def test_launch_line_reads_the_header():
    recipe = ROOT / "recipes/demo/sftkey_tiny.yaml"
    assert launch_line(recipe) == "accelerate launch recipes/run.py --config recipes/demo/sftkey_tiny.yaml"
    assert "passed" in run_dry(str(recipe))


def test_the_task_with_headroom_recipe_trains_stage_1_to_convergence():
    """compare.py's default recipe: its stage 1 keeps its best checkpoint and stops on patience, so every arm of the
    comparison starts from a converged model; the header launches the file itself and the checks pass."""
    from sftkey_trl.recipe.schema import COMPARE_DEMO_RECIPE

    recipe = ROOT / COMPARE_DEMO_RECIPE
    assert launch_line(recipe) == f"accelerate launch recipes/run.py --config {COMPARE_DEMO_RECIPE}"
    script_args, _, _, stages = parse(COMPARE_DEMO_RECIPE)
    first = stages[0]
    assert first.loss_on == "completion" and first.keep_best and first.patience
    assert script_args.dataset_name == "demo:remainder" and script_args.eval_fraction > 0
    assert "passed" in run_dry(str(recipe))
