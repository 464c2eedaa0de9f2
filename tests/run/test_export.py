"""After training: one tracked run per stage (TensorBoard, offline), `--merge` writes a standalone model that
generates like base + adapter, and `push_to_hub` pushes one stage once with a model card (the hub is mocked at
HfApi.create_repo / HfApi.upload_folder, so nothing leaves the machine)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import ROOT
from huggingface_hub import HfApi, ModelCard, RepoUrl

from sftkey_trl.errors import SFTKeyError
from sftkey_trl.recipe.parsing import parse_config
from sftkey_trl.run.cli import main

DEMO = str(ROOT / "recipes/demo/sftkey_tiny.yaml")
STAGES = "[{name: sft, loss_on: completion, num_train_epochs: 1}, {name: key, loss_on: key, num_train_epochs: 1}]"
QUESTIONS = ["Compute 7 + 2 - 4.", "Compute 3 + 5.", "Compute 9 - 6 + 1.", "Compute 8 - 2 - 3."]


def mock_hub(monkeypatch, calls: list) -> None:
    """Record what would be sent to the hub; the Trainer's own push goes through the same HfApi methods."""

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", repo_id, kwargs))
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        files = sorted(str(p.relative_to(folder_path)) for p in Path(folder_path).rglob("*") if p.is_file())
        calls.append(("upload_folder", repo_id, {"folder_path": Path(folder_path), "files": files, **kwargs}))

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """A few-step two-stage LoRA run of the tiny demo model, tracked with TensorBoard and pushed (mocked)."""
    out = tmp_path_factory.mktemp("export") / "demo-lora"
    args = ["--config", DEMO, "--output_dir", str(out), "--use_peft", "true", "--learning_rate", "1e-2",
            "--max_train_samples", "64", "--max_eval_samples", "8", "--max_new_tokens", "40", "--logging_steps", "2",
            "--report_to", "tensorboard", "--stages", STAGES]  # fmt: skip
    calls: list = []
    with pytest.MonkeyPatch.context() as monkeypatch:
        mock_hub(monkeypatch, calls)
        monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
        assert main([*args, "--push_to_hub", "true", "--hub_model_id", "me/sftkey-demo"]) == 0
    return SimpleNamespace(out=out, args=args, calls=calls)


@pytest.mark.slow
def test_each_stage_is_its_own_tensorboard_run(lora_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs = lora_run.out / "runs" / "demo-lora"
    assert sorted(p.name for p in runs.iterdir()) == ["key", "sft"]
    for stage in ("sft", "key"):
        events = EventAccumulator(str(runs / stage))
        events.Reload()
        tags = set(events.Tags()["scalars"])
        assert {"train/loss", "train/reasoning_loss", "train/key_loss"} <= tags, tags
        assert events.Scalars("train/loss")[0].step == 2  # each run counts its own stage's steps


@pytest.mark.slow
def test_trainer_does_not_push_per_stage_and_the_run_pushes_one_stage_with_a_card(lora_run):
    out, calls = lora_run.out, lora_run.calls
    assert [call[:2] for call in calls] == [("create_repo", "me/sftkey-demo"), ("upload_folder", "me/sftkey-demo")]
    upload = calls[1][2]
    assert upload["folder_path"] == out / "key"  # the last stage, as an adapter
    assert {"adapter_model.safetensors", "adapter_config.json", "README.md", "tokenizer.json"} <= set(upload["files"])
    assert "checkpoints/**" in upload["ignore_patterns"]
    card = ModelCard.load(out / "key" / "README.md")
    assert card.data.library_name == "peft" and "sftkey" in card.data.tags and card.data.base_model is None
    text = card.text
    assert "`demo:tiny-llama`" in text and "stage `key` (of `sft`, `key`)" in text and "LoRA, r=16" in text
    assert "| sft | the whole response (reasoning and answer) | 1 | 0.01 | cosine |" in text
    assert "| key | the final-answer (key) tokens only | 1 | 0.01 | cosine |" in text
    assert "| metric | sft | key |" in text and "| accuracy |" in text
    assert f"Recipe: `{DEMO}` with `--output_dir {out}" in text and "```yaml" in text
    assert 'AutoPeftModelForCausalLM.from_pretrained("me/sftkey-demo")' in text and "apply_chat_template" in text


@pytest.mark.slow
def test_merged_model_generates_like_base_plus_adapter(lora_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sftkey_trl.evaluation.generation import generate, stop_token_ids
    from sftkey_trl.train.modeling import load_model

    assert main([*lora_run.args, "--merge", "key"]) == 0
    merged_dir = lora_run.out / "key" / "merged"
    assert (merged_dir / "model.safetensors").exists() and not (merged_dir / "adapter_config.json").exists()
    assert "stage `key` (of `sft`, `key`)" in (merged_dir / "README.md").read_text()
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    stage_tokenizer = AutoTokenizer.from_pretrained(lora_run.out / "key")
    assert tokenizer.chat_template and tokenizer.chat_template == stage_tokenizer.chat_template
    stop = stop_token_ids(tokenizer, "<|im_end|>")
    assert merged.generation_config.eos_token_id == stop
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                             add_generation_prompt=True) for q in QUESTIONS]  # fmt: skip
    recipe = parse_config(lora_run.args)
    with_adapter = load_model(recipe.model, recipe.training, lora_run.out / "key", purpose="evaluate")
    base = load_model(recipe.model, recipe.training, purpose="evaluate")
    kwargs = dict(stop_ids=stop, max_new_tokens=40, show_progress=False)
    expected = generate(with_adapter, tokenizer, prompts, **kwargs)
    assert generate(merged, tokenizer, prompts, **kwargs) == expected
    assert generate(base, tokenizer, prompts, **kwargs) != expected  # the adapter changes what is generated


@pytest.mark.slow
def test_merged_push_records_the_comparison_intervals(lora_run, monkeypatch):
    from sftkey_trl.run.compare import write_comparison
    from sftkey_trl.run.hub import push_run
    from sftkey_trl.run.variants import build_variants

    recipe = parse_config(
        [*lora_run.args, "--push_to_hub", "true", "--hub_model_id", "me/merged", "--hub_merge", "true",
         "--hub_stage", "sft"]
    )  # fmt: skip
    per_seed = {name: {seed: {"accuracy": 0.2 + 0.1 * seed + shift, "format_accuracy": 1.0, "optimizer_steps": steps}
                       for seed in range(3)}
                for name, shift, steps in (("sft_tag", 0.0, 8), ("sftkey_tag", -0.05, 12),
                                           ("sft_tag_matched", 0.3, 12))}  # fmt: skip
    write_comparison(lora_run.out / "compare", per_seed, build_variants(recipe), [0, 1, 2])
    calls: list = []
    mock_hub(monkeypatch, calls)
    url = push_run(recipe)
    assert url == "https://huggingface.co/me/merged"
    assert [call[0] for call in calls] == ["create_repo", "upload_folder"]
    upload = calls[-1][2]
    assert upload["folder_path"] == lora_run.out / "sft" / "merged" and "model.safetensors" in upload["files"]
    card = ModelCard.load(lora_run.out / "sft" / "merged" / "README.md")
    assert card.data.library_name == "transformers" and "the LoRA adapter merged into the base model" in card.text
    assert "### Comparison of the variants" in card.text and "0.300 ± 0.248" in card.text  # sft_tag over 3 seeds
    assert "compute-matched baseline" in card.text


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--stages", "[{name: a, loss_on: completion, push_to_hub: true}]"], "move `push_to_hub` to the top level"),
        (["--push_to_hub", "true", "--hub_strategy", "checkpoint"], "remove `hub_strategy`"),
        (["--push_to_hub", "true", "--hub_stage", "nope"], "`hub_stage: nope` is not a stage"),
        (["--push_to_hub", "true"], "needs a Hugging Face token"),
    ],
)
def test_push_settings_that_would_push_per_stage_are_refused(extra, needle, monkeypatch, tmp_path):
    from sftkey_trl.recipe.checks import check_push

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr("huggingface_hub.constants.HF_TOKEN_PATH", str(tmp_path / "token"))  # no stored token
    recipe = parse_config(["--config", DEMO, *extra])
    with pytest.raises(SFTKeyError) as error:
        check_push(recipe.training, recipe.stages)
    assert needle in str(error.value) and "\n" not in str(error.value)


def test_merge_refuses_full_weights_and_untrained_stages(tmp_path):
    import torch
    from safetensors.torch import save_file

    from sftkey_trl.run.export import merge_stage, stage_folder

    (tmp_path / "sft").mkdir()
    with pytest.raises(SFTKeyError, match="has not been trained"):
        stage_folder(tmp_path, "sft", ["sft", "key"])
    (tmp_path / "sft" / "config.json").write_text("{}")
    with pytest.raises(SFTKeyError, match="cannot be merged: .*sft has no model.safetensors; rerun the recipe"):
        stage_folder(tmp_path, "sft", ["sft"])  # the manifest may say trained: the disk decides
    save_file({"x": torch.zeros(1)}, str(tmp_path / "sft" / "model.safetensors"))
    with pytest.raises(SFTKeyError, match="already a standalone model"):
        merge_stage(stage_folder(tmp_path, "sft", ["sft"]), None, None, None)


def test_a_wandb_run_ends_with_its_stage(monkeypatch):
    import sys

    from sftkey_trl.run.tracking import EndRunAtTrainEnd

    finished = []
    fake = SimpleNamespace(run=object(), finish=lambda: finished.append(True))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    EndRunAtTrainEnd().on_train_end(None, SimpleNamespace(is_world_process_zero=True), None)
    assert finished == [True]
