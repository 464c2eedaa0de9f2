"""The model card (README.md) of an exported or pushed stage: the base model, the recipe, each stage's objective and
settings, and the results, with 95% intervals when `recipes/compare.py` was run in the same output folder."""

from __future__ import annotations

import json
import re
from functools import cache
from pathlib import Path

import yaml
from huggingface_hub import ModelCard, ModelCardData

from ..files import read_json
from ..recipe.schema import Recipe, key_types
from ..train.objectives import Stage
from .compare import markdown
from .diagnosis import diagnose
from .report import cell, markdown_table, metric_rows, result_rows

TEMPLATE = "---\n{{ card_data }}\n---\n\n{{ body }}\n"
FORMS = {
    "adapter": "a LoRA adapter (load it on the base model)",
    "merged": "a standalone model: the LoRA adapter merged into the base model",
    "full": "a standalone model (full fine-tuning)",
}
SETTINGS = [  # (resolved training argument, column title)
    ("num_train_epochs", "epochs"),
    ("learning_rate", "learning rate"),
    ("lr_scheduler_type", "schedule"),
    ("warmup_steps", "warm-up"),
    ("weight_decay", "weight decay"),
    ("max_length", "max length"),
]
CARD_WITHOUT = "the model card goes on without it"  # a run file the card reads that cannot be read
REDACTED = "<redacted>"
SECRET_WORDS = ("token", "secret", "password", "passwd", "api_key", "apikey", "credential")
HF_TOKEN_RE = re.compile(r"hf_[A-Za-z0-9]{20,}")


def _setting(value) -> str:
    return "-" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


@cache
def public_token_keys() -> frozenset[str]:
    """Recipe keys whose names contain "token" but hold no secret (`eos_token`, `max_new_tokens`, ...): every recipe
    key (`schema.key_types`) with a secret-looking name, except `hub_token`."""
    return frozenset(name for name in key_types() if is_secret_name(name, frozenset())) - {"hub_token"}


def is_secret_name(key, public: frozenset[str]) -> bool:
    """Whether a mapping key names a secret: `*token*`, `*secret*`, `*password*`, ... and not a public recipe key."""
    name = str(key).lower()
    return name not in public and any(word in name for word in SECRET_WORDS)


def scrub(value, public: frozenset[str]):
    """`value` with every secret removed, at any depth: the value of each secret-named key and the whole `env`
    mapping (TrlParser sets it as environment variables, e.g. `HF_TOKEN`) replaced by `<redacted>`, and any string
    that looks like a Hugging Face token too."""
    if isinstance(value, dict):
        return {
            key: REDACTED if str(key).lower() == "env" or is_secret_name(key, public) else scrub(item, public)
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [scrub(item, public) for item in value]
    if isinstance(value, str):
        return HF_TOKEN_RE.sub(REDACTED, value)
    return value


def redacted(recipe_text: str) -> str:
    """The recipe as YAML with every secret replaced by `<redacted>` (see `scrub`). Parsed, not matched line by line,
    so quoted, flow-style and nested keys are found; comments (which could hold anything) are dropped, and a recipe
    that does not parse is not shown."""
    try:
        data = yaml.safe_load(recipe_text)
    except yaml.YAMLError:
        return "# (the recipe is not shown: it is not valid YAML)"
    return yaml.safe_dump(scrub(data, public_token_keys()), sort_keys=False, allow_unicode=True, width=1000).rstrip()


def is_hub_id(name: str | None) -> bool:
    """A Hugging Face Hub id (`org/name`), not a local folder or a demo model."""
    return bool(name) and ":" not in name and name.count("/") == 1 and not Path(name).exists()


def base_model_words(name: str) -> str:
    """The base model as the card's text names it: a Hub id as it is; anything else with why the card's header
    names no `base_model` (the Hub reads that field as a Hub id)."""
    if is_hub_id(name):
        return f"`{name}`"
    from ..models import DEMO_MODEL, LOCAL_NAME

    if name == LOCAL_NAME:
        from ..models.smollm2 import HUB_ID

        origin = f"built on this machine from a Q4_1 GGUF of `{HUB_ID}`"
    elif name == DEMO_MODEL:
        origin = "a tiny random-init model built on this machine"
    else:
        origin = "a local model"
    return f"`{name}` ({origin}; not a Hub id, so the card's header names no `base_model`)"


def trained_recipe(recipe: Recipe, manifest: dict) -> Recipe:
    """The recipe the stages were trained with: the training command the manifest recorded, parsed again (a later
    `--merge` or push runs with its own flags), in this command's `output_dir`; this recipe when none was recorded
    or the recorded one no longer parses (its file moved)."""
    recorded = manifest.get("command")
    if not recorded:
        return recipe
    from ..errors import SFTKeyError
    from ..recipe.parsing import parse_config

    argv = (["--config", recorded["config"]] if recorded.get("config") else []) + list(recorded.get("overrides") or [])
    try:
        trained = parse_config(argv)
    except SFTKeyError:
        return recipe
    trained.training.output_dir = recipe.training.output_dir
    return trained


def objective(stage: dict) -> str:
    """What a stage's loss is on, in words, from its resolved `Stage` entry in the manifest (`Stage.summary`)."""
    text = Stage(**{key: value for key, value in stage.items() if key in Stage.__dataclass_fields__}).summary
    return text + ("; best checkpoint kept (keep_best)" if stage.get("keep_best") else "")


def block(heading: str, *lines: str) -> list[str]:
    """A markdown block: a blank line, `heading`, a blank line, then `lines`."""
    return ["", heading, "", *lines]


def stages_section(manifest: dict, results: dict) -> list[str]:
    """One row per stage of the manifest: its objective, resolved settings, global batch and the weights it kept."""
    rows = []
    for name, entry in manifest.get("stages", {}).items():
        config = entry.get("config", {})
        summary = results.get("stages", {}).get(name, {}).get("training", {})
        settings = [_setting(config.get("training", {}).get(key)) for key, _ in SETTINGS]
        kept = summary.get("keep_best", {}).get("kept", "final weights")
        rows.append(
            [name, objective(config.get("stage", {})), *settings, cell(summary.get("global_batch_size")), kept]
        )
    return markdown_table(["stage", "loss on", *(title for _, title in SETTINGS), "global batch", "kept"], rows)


def results_section(results: dict) -> list[str]:
    """The card's results: one row per reported metric, one column per evaluated model."""
    rows = result_rows(results)
    if not any("accuracy" in metrics for _, metrics in rows):
        return ["No evaluation was run (`eval_after_stages: false` or no evaluation data)."]
    table = [[label] + [cell(metrics.get(key), key) for _, metrics in rows] for key, label in metric_rows().items()]
    return markdown_table(["metric"] + [name for name, _ in rows], table)


def comparison_section(output_dir: Path) -> list[str]:
    """The variants table with 95% intervals from `<output_dir>/compare/comparison.json`, if it exists."""
    summary = read_json(output_dir / "compare" / "comparison.json", None, without=CARD_WITHOUT)
    if not summary:
        return []
    descriptions = summary.get("descriptions", {})  # written by compare.py with the arms it ran
    table = markdown(summary, descriptions, summary.get("seeds", []), summary.get("ranked_by", "accuracy"))
    table = table.replace("\n## ", "\n### ")
    return block("### Comparison of the variants (`recipes/compare.py`)", table.removeprefix("## ").strip())


def usage_snippet(location: str, form: str, script_args, chat: bool, end_of_turn: str | None) -> list[str]:
    """A generation snippet that runs as written, loading `location` (the saved folder, or the pushed repository)
    and prompting as the evaluation did: through the tokenizer's chat template (`chat`), else the plain layout."""
    loader = "AutoPeftModelForCausalLM" if form == "adapter" else "AutoModelForCausalLM"
    if chat:
        system = (
            f'{{"role": "system", "content": {script_args.system_prompt!r}}}, ' if script_args.system_prompt else ""
        )
        encode = [
            f'messages = [{system}{{"role": "user", "content": question}}]',
            'inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", '
            "return_dict=True)",
        ]
    else:
        encode = [f'inputs = tokenizer({plain_prompt(script_args)}, return_tensors="pt", add_special_tokens=False)']
    stop = f", eos_token_id=tokenizer.convert_tokens_to_ids({json.dumps(end_of_turn)})" if end_of_turn else ""
    return [
        "```python",
        *([f"from peft import {loader}"] if form == "adapter" else []),
        f"from transformers import {'AutoTokenizer' if form == 'adapter' else 'AutoModelForCausalLM, AutoTokenizer'}",
        "",
        f"model = {loader}.from_pretrained({json.dumps(location)})",
        f"tokenizer = AutoTokenizer.from_pretrained({json.dumps(location)})",
        'question = "What is 7 + 5?"  # your question',
        *encode,
        f"output = model.generate(**inputs, max_new_tokens={script_args.max_new_tokens}, do_sample=False{stop})",
        'print(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))',
        "```",
    ]


def plain_prompt(script_args) -> str:
    """The plain layout's prompt as a Python expression of `question`, as `Formatter.prompt` builds it."""
    system = f"{script_args.system_prompt}\n\n" if script_args.system_prompt else ""
    return f'(tokenizer.bos_token or "") + {system + script_args.prompt_template!r}.format(question=question)'


def model_card(
    folder: Path, stage: str, form: str, repo_id: str, recipe: Recipe, location: str | None = None
) -> ModelCard:
    """The card of `folder` (the stage or its merged copy) from the run's files in its `output_dir`, saved as
    `<folder>/README.md`; its usage snippet loads `location` (default `repo_id`: where it is pushed)."""
    output_dir = Path(recipe.training.output_dir)
    manifest = read_json(output_dir / "manifest.json", {}, without=CARD_WITHOUT) or {}
    recipe = trained_recipe(recipe, manifest)
    script_args, training_args, model_args, stages = recipe.script, recipe.training, recipe.model, recipe.stages
    results = read_json(output_dir / "results.json", {}, without=CARD_WITHOUT) or {}
    base = model_args.model_name_or_path
    quantized = model_args.load_in_4bit or model_args.load_in_8bit
    tags = ["sftkey", "trl", "sft", "chain-of-thought"]
    tags += ["qlora"] if quantized else (["lora"] if model_args.use_peft else [])
    data = ModelCardData(
        base_model=base if is_hub_id(base) else None,  # the text says why when it is left out
        datasets=[script_args.dataset_name] if is_hub_id(script_args.dataset_name) else None,
        library_name="peft" if form == "adapter" else "transformers",
        pipeline_tag="text-generation",
        tags=tags,
    )
    tokenizer_config = read_json(folder / "tokenizer_config.json", {}, without=CARD_WITHOUT) or {}
    chat = (folder / "chat_template.jinja").exists() or bool(tokenizer_config.get("chat_template"))
    method = "full fine-tuning"
    if model_args.use_peft:
        method = f"{'QLoRA (4-bit nf4 base)' if quantized else 'LoRA'}, r={model_args.lora_r}, "
        method += f"alpha={model_args.lora_alpha}, dropout={model_args.lora_dropout}"
    response = (
        f"`{script_args.thinking_open}reasoning{script_args.thinking_close}\\n"
        f"{script_args.answer_open}answer{script_args.answer_close}`"
        if script_args.response_format == "tags"
        else f"the reasoning, then `{script_args.answer_template}`"
    )
    dataset = script_args.dataset_name + (f" ({script_args.dataset_config})" if script_args.dataset_config else "")
    notes = diagnose(results)
    shown_recipe = f"`{recipe.path or 'built-in defaults'}`"
    if recipe.overrides:
        shown_recipe += f" with `{HF_TOKEN_RE.sub(REDACTED, ' '.join(recipe.overrides))}`"
    body = [
        f"# {repo_id.split('/')[-1]}",
        "",
        f"{base_model_words(base)} fine-tuned with [SFTKey](https://arxiv.org/abs/2512.21017), two-stage "
        "chain-of-thought SFT on TRL (sftkey-trl): stage 1 trains on the whole response, the key stage on the final "
        "answer only.",
        "",
        f"This repository holds stage `{stage}` (of {', '.join(f'`{s.name}`' for s in stages)}) as {FORMS[form]}. "
        f"Responses are formatted as {response}.",
        *block("## Use"),
        *usage_snippet(location or repo_id, form, script_args, chat, training_args.eos_token),
        *block("## Training"),
        f"- Base model: `{base}`; {method}",
        f"- Data: `{dataset}`, format `{script_args.dataset_format}`",
        f"- Recipe: {shown_recipe}",
        "",
        *stages_section(manifest, results),
        *block("## Results"),
        "Greedy generation on the evaluation data after each stage (`results.json`):",
        "",
        *results_section(results),
        *(block("What the numbers say:", *(f"- {line}" for line in notes)) if notes else []),
        *comparison_section(output_dir),
    ]
    if recipe.path and Path(recipe.path).is_file():
        text = redacted(Path(recipe.path).read_text()).rstrip()
        body += block("<details><summary>The recipe</summary>", "```yaml", text, "```", "", "</details>")
    if versions := manifest.get("library_versions", {}):
        body += ["", "Framework versions: " + ", ".join(f"{k} {v}" for k, v in versions.items() if v)]
    return ModelCard.from_template(data, template_str=TEMPLATE, body="\n".join(body))
