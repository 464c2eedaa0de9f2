"""Every rule about a recipe, its data and its launch, each written once with its one-line message.

`check_recipe` runs them all, before any model or dataset is loaded, for every entry point (`--dry_run` included);
nothing here downloads.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ..data.adapters import Triple, answer_type_of, get_adapter
from ..data.formatting import one_answer_slot
from ..errors import SFTKeyError, closest, first_line, show_value
from ..evaluation.generation import VLLM_MISSING
from ..evaluation.metrics import DEFAULT_METRIC, selection_problem
from ..files import plain
from ..models import MODEL_TYPES, check_model_name
from ..train.distributed import check_sharding_compatibility, detect_launch, resolve_sharding_defaults
from ..train.objectives import DEFAULTS, OPTIONS, Stage, _check_option
from ..train.steps import stage_training_args
from .folders import check_output_folders
from .options import check_trainer_options
from .schema import CHOICES, Recipe, SFTKeyScriptArguments
from .values import check_key_values, check_named_values

SAMPLE = Triple("What is 2 + 3?", "2 + 3 = 5", "5")


def resolve_recipe(recipe: Recipe) -> list[str]:
    """Fill in the defaults that depend on other keys, once, after parsing and before `check_recipe` (which never
    changes the recipe): QLoRA's storage and model dtype under ZeRO-3/FSDP. Returns the changes, as notes."""
    return resolve_sharding_defaults(recipe.model, recipe.training)


def check_recipe(recipe: Recipe, processes: list[int]) -> list[str]:
    """Run every check for the given process counts, raising `SFTKeyError` for the first failure; returns notes.
    `--dry_run` thus refuses what a real run refuses, but for the machine (`check_engine_runs_here`) and what only
    the loaded model tells (its EOS token; a router when its config is not on this machine)."""
    script_args, training_args, model_args, stages = recipe.script, recipe.training, recipe.model, recipe.stages
    notes: list[str] = []
    check_key_values(recipe)
    check_output_folders(training_args)
    check_stage_options(stages)
    check_choices(script_args)
    notes += check_response_format(script_args)
    notes += check_chat_template(script_args, training_args)
    check_named_values(script_args, model_args)
    notes += check_data(script_args)
    check_model(model_args)
    check_model_name(model_args.model_name_or_path)
    check_stages(recipe, processes)
    check_push(training_args, stages)
    notes += check_keep_best_keys(recipe)
    notes += check_trainer_options(training_args, stages)
    notes += check_detached_context(training_args, stages)
    notes += check_sharding_compatibility(model_args, training_args)
    notes += check_router(training_args, model_args, stages)
    return notes


def check_choices(script_args) -> None:
    """Keys with a fixed set of values, and the evaluation split fraction."""
    for key, allowed in CHOICES.items():
        value = getattr(script_args, key)
        if value not in allowed:
            valid = [str(a) for a in allowed if a is not None]
            raise SFTKeyError(
                f"`{key}: {show_value(value)}` is not valid{closest(str(value), valid)}; use {', '.join(valid)}"
            )
    if not 0.0 <= script_args.eval_fraction < 1.0:
        raise SFTKeyError(f"`eval_fraction: {script_args.eval_fraction}` must be in [0, 1)")
    if "{question}" not in script_args.prompt_template:
        raise SFTKeyError("`prompt_template` must contain `{question}`")


def check_response_format(script_args) -> list[str]:
    """The tags (for `tags`) or the answer line (for `plain`) must let the answer be found; returns notes."""
    notes = []
    tags = {
        key: getattr(script_args, key) for key in ("thinking_open", "thinking_close", "answer_open", "answer_close")
    }
    defaults = SFTKeyScriptArguments()
    template = script_args.answer_template
    if not one_answer_slot(template):
        raise SFTKeyError("`answer_template` must contain `{answer}` exactly once, e.g. `The answer is {answer}.`")
    changed_tags = [key for key, value in tags.items() if value != getattr(defaults, key)]
    for key, value in tags.items():  # with `plain` too: they still build the tags (evaluation.answers.Tags)
        if not value or not value.strip():
            raise SFTKeyError(f"`{key}` is empty; the four tag strings must be non-empty (remove it for its default)")
    if script_args.response_format == "tags":
        for key, value in tags.items():
            for other, other_value in tags.items():
                if key != other and value in other_value:
                    raise SFTKeyError(
                        f"`{key}: {value}` is the same as or part of `{other}: {other_value}`, so the answer cannot "
                        "be located; make the four tags distinct"
                    )
        if template != defaults.answer_template:
            notes.append("`answer_template` is only used by `response_format: plain`; it is ignored with `tags`")
        return notes
    if "\n" in template:
        raise SFTKeyError("`answer_template` must be one line: the answer is read from the last matching line")
    if not template.replace("{answer}", "").strip():
        raise SFTKeyError(
            "`answer_template` needs words around `{answer}` (e.g. `The answer is {answer}.`) so that the "
            "answer line can be told apart from the reasoning"
        )
    if changed_tags:
        notes.append(f"{', '.join(f'`{k}`' for k in changed_tags)} only apply to `response_format: tags`")
    return notes


def check_chat_template(script_args, training_args) -> list[str]:
    """Render a sample with the recipe's chat template, exactly as training and generation will; returns notes."""
    if not script_args.chat_template:
        return []
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from ..data.formatting import Formatter

    eos = training_args.eos_token
    if eos is None:
        return [
            "`chat_template` is set but `eos_token` is not: the model's EOS must close the template's assistant turn "
            "(checked at run time); set `eos_token` to the template's end-of-turn token to be sure"
        ]
    backend = Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>"))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token=eos)
    formatter = Formatter(tokenizer, script_args, eos)
    try:
        formatter.render(SAMPLE)
    except SFTKeyError:
        raise
    except Exception as error:  # jinja syntax or runtime errors
        raise SFTKeyError(f"`chat_template` does not render ({first_line(error)}); fix the Jinja template") from error
    return []


def check_data(script_args) -> list[str]:
    """The dataset, the evaluation split and the validation split resolve (nothing is downloaded); returns notes."""
    adapter = get_adapter(script_args.dataset_format)
    name = script_args.dataset_name or adapter.hub_id
    if not name:
        raise SFTKeyError(
            f"no dataset: `dataset_format: {adapter.name}` has no default, so set `dataset_name` to a hub id or a "
            "local .jsonl/.json/.parquet/.csv file"
        )
    from ..data.sources import local_path

    for key in ("dataset_name", "eval_dataset_name"):
        if getattr(script_args, key):
            local_path(getattr(script_args, key), key)
    notes = []
    own_hub_data = name == adapter.hub_id and not script_args.eval_dataset_name
    if own_hub_data and script_args.eval_split and adapter.test_split is None:
        if script_args.eval_split != adapter.train_split:
            raise SFTKeyError(
                f"`eval_split: {script_args.eval_split}`: {adapter.hub_id} has only a `{adapter.train_split}` split; "
                "remove eval_split and hold out rows with `eval_fraction` (e.g. 0.01)"
            )
    train_split = script_args.dataset_split or adapter.train_split
    if script_args.eval_split and not script_args.eval_dataset_name and script_args.eval_split == train_split:
        notes.append(f"evaluation uses the training split `{train_split}`: scores will be optimistic")
    if not (script_args.eval_dataset_name or script_args.eval_split or script_args.eval_fraction > 0):
        notes.append("no evaluation set: set `eval_split` (or `eval_fraction` when the dataset has no test split)")
    return notes


def check_model(model_args) -> None:
    """QLoRA needs bitsandbytes and a LoRA adapter; one quantisation at a time; the LM head stays out of LoRA; the
    adapter is a causal LM's; LoRA on parameters (MoE experts) has no dropout."""
    if model_args.load_in_4bit and model_args.load_in_8bit:
        raise SFTKeyError("`load_in_4bit` and `load_in_8bit` are both true; set one of them to false")
    for key in ("load_in_4bit", "load_in_8bit"):
        if getattr(model_args, key) and not model_args.use_peft:
            raise SFTKeyError(
                f"`{key}: true` needs `use_peft: true` (a quantised model cannot be fully fine-tuned); "
                f"set `use_peft: true` for QLoRA or `{key}: false` for full fine-tuning"
            )
        if getattr(model_args, key) and importlib.util.find_spec("bitsandbytes") is None:
            raise SFTKeyError(f"`{key}: true` needs bitsandbytes: `pip install bitsandbytes` (or set {key}: false)")
    for key, fix in (
        ("lora_target_modules", "leave the key unset for all linear layers but the LM head"),
        ("lora_target_parameters", "name only the expert parameters"),
    ):
        names = getattr(model_args, key)
        names = [names] if isinstance(names, str) else list(names or [])
        if model_args.use_peft and any("lm_head" in name.split(".") for name in names):
            why = "TRL's fused LM head reads its weight directly"
            raise SFTKeyError(f"`{key}` must not contain `lm_head` ({why}); remove it ({fix})")
    if model_args.lora_task_type != "CAUSAL_LM":
        raise SFTKeyError(f"`lora_task_type: {model_args.lora_task_type}` is not SFTKey's task (CAUSAL_LM); remove it")
    if model_args.use_peft and model_args.lora_target_parameters and model_args.lora_dropout:
        raise SFTKeyError("`lora_target_parameters` needs `lora_dropout: 0` (peft's LoRA on parameters has none)")


def check_stage_options(stages: list[Stage]) -> None:
    """Each stage's objective options (`objectives._check_option`), also for stages not built by the parser."""
    for index, stage in enumerate(stages):
        for key in [key for key in sorted(OPTIONS) if getattr(stage, key) != DEFAULTS[key]]:
            try:
                _check_option(key, value := getattr(stage, key))
            except (TypeError, ValueError) as error:
                raise SFTKeyError(f"stages[{index}] ({stage.name}): `{key}: {value}` is not valid: {error}") from None


_LAUNCH = "the device, engine and process group are set up once for the whole run"
# Training keys a run reads once, from the recipe's top level: in a stage they would be recorded and not applied
RUN_WIDE_KEYS = {
    "max_length": "the data is tokenised and its lengths checked once, for every stage",
    "eos_token": "the data is rendered once, with one end-of-turn token, for every stage",
    "trust_remote_code": "the tokenizer is loaded once for every stage",
    "output_dir": "each stage writes to `<output_dir>/<stage>`",
    "overwrite_output_dir": "it applies to the whole run",
    "restart_from": "it applies to the whole run",
    **dict.fromkeys(("use_cpu", "deepspeed", "fsdp", "fsdp_config", "parallelism_config", "ddp_backend"), _LAUNCH),
}


def check_stages(recipe: Recipe, processes: list[int]) -> None:
    """Each stage's training arguments resolve for every process count, and none sets a key the run reads once;
    keep-best has validation data and patience has keep-best; `restart_from` names a stage; vLLM evaluation runs in
    one process."""
    script_args, training_args, stages = recipe.script, recipe.training, recipe.stages
    output_dir = Path(training_args.output_dir)
    for stage in stages:
        if "hub_token" in stage.overrides:
            raise SFTKeyError(
                f"stage `{stage.name}`: `hub_token` cannot be set in a stage (recipes end up in model cards and "
                "manifests); set the HF_TOKEN environment variable or run `hf auth login`"
            )
        for key in [key for key in RUN_WIDE_KEYS if key in stage.overrides]:
            raise SFTKeyError(
                f"stage `{stage.name}`: `{key}` cannot be set in a stage ({RUN_WIDE_KEYS[key]}); set it at the top "
                "level of the recipe"
            )
        for count in processes:
            stage_training_args(training_args, stage, str(output_dir / stage.name), count)
        if stage.keep_best:
            check_selection(script_args, stage.name)
        check_patience(stage)
    names = [stage.name for stage in stages]
    if training_args.restart_from is not None and training_args.restart_from not in names:
        raise SFTKeyError(
            f"`restart_from: {training_args.restart_from}` is not a stage of this recipe; stages are {names}"
        )
    if script_args.eval_backend == "vllm" and max(processes) > 1:
        raise SFTKeyError("`eval_backend: vllm` runs in one process; evaluate with --eval_only and one process")
    if script_args.eval_backend == "vllm" and importlib.util.find_spec("vllm") is None:
        raise SFTKeyError(VLLM_MISSING)


PUSH_KEYS = ("push_to_hub", "hub_model_id", "hub_strategy", "hub_private_repo", "hub_stage", "hub_merge")


def check_push(training_args, stages: list[Stage]) -> None:
    """A run is pushed once, after its last stage (`run/hub.py`): no push key in a stage, `hub_stage` names a
    stage, no Trainer checkpoint pushes, and a token is found now (local credentials only), not after training."""
    for stage in stages:
        for key in [key for key in PUSH_KEYS if key in stage.overrides]:
            raise SFTKeyError(
                f"stage `{stage.name}` sets `{key}`, but a run is pushed once after its last stage; move `{key}` to "
                "the top level of the recipe (`hub_stage` picks the stage to push)"
            )
    if not training_args.push_to_hub:
        return
    names = [stage.name for stage in stages]
    if training_args.hub_stage is not None and training_args.hub_stage not in names:
        raise SFTKeyError(f"`hub_stage: {training_args.hub_stage}` is not a stage of this recipe; stages are {names}")
    strategy = str(plain(training_args.hub_strategy))
    if strategy not in ("every_save", "end"):
        raise SFTKeyError(
            f"`hub_strategy: {strategy}` would push Trainer checkpoints of every stage; SFTKey pushes one stage once "
            "at the end, so remove `hub_strategy`"
        )
    from huggingface_hub import get_token

    if not (training_args.hub_token or get_token()):
        raise SFTKeyError("`push_to_hub: true` needs a Hugging Face token; run `hf auth login` or set HF_TOKEN")


def check_comparison(training_args) -> None:
    """`compare.py` trains many variants and pushes none (`run.py` pushes the one run it trains)."""
    if training_args.push_to_hub:
        raise SFTKeyError("compare.py trains many variants and pushes none; remove `push_to_hub` (run.py pushes)")


KEEP_BEST_KEYS = ("metric_for_best_model", "greater_is_better", "eval_steps")  # read by keep_best only


def check_keep_best_keys(recipe: Recipe) -> list[str]:
    """Keep-best's metric must be selectable for the answer type (and never the lowest), a stage's own keep-best keys
    need its `keep_best: true`; returns a note when the recipe-wide keys have no effect."""
    answer_type, output_dir = answer_type_of(recipe.script), Path(recipe.training.output_dir)
    for stage in recipe.stages:
        own = [key for key in KEEP_BEST_KEYS if key in stage.overrides]
        if not stage.keep_best:
            if own:
                fix = "set keep_best: true in that stage or remove the key"
                raise SFTKeyError(f"stage `{stage.name}`: `{own[0]}` only applies with `keep_best: true`; {fix}")
            continue
        args = stage_training_args(recipe.training, stage, str(output_dir / stage.name))
        metric = args.metric_for_best_model or DEFAULT_METRIC
        where = f"stage `{stage.name}`: " if "metric_for_best_model" in own else ""
        problem = selection_problem(metric, answer_type)
        if problem:
            raise SFTKeyError(f"{where}`metric_for_best_model: {metric}` {problem}")
        if args.greater_is_better is False:
            where = f"stage `{stage.name}`: " if "greater_is_better" in own else ""
            raise SFTKeyError(f"{where}`greater_is_better: false`: keep_best keeps the highest `{metric}`; remove it")
    wide = [key for key in ("metric_for_best_model", "eval_steps") if getattr(recipe.training, key) is not None]
    if wide and not any(stage.keep_best for stage in recipe.stages):
        return [f"`{wide[0]}` has no effect: no stage has `keep_best: true` (evaluation after a stage generates)"]
    return []


def check_detached_context(training_args, stages: list[Stage]) -> list[str]:
    """`context: detached` needs padded batches (it splits rows at their key tokens), whole weights on each process
    (the prefix pass calls the unwrapped model) and no loss on the reasoning it holds fixed; returns notes."""
    notes = []
    for stage in [stage for stage in stages if stage.context == "detached"]:
        where = f"stage `{stage.name}` has `context: detached`"
        if stage.reasoning_weight > 0:
            raise SFTKeyError(
                f"{where}, which holds the reasoning fixed, so `reasoning_weight: {stage.reasoning_weight:g}` cannot "
                "train it; set reasoning_weight: 0 or context: full"
            )
        if stage.overrides.get("padding_free", training_args.padding_free):
            raise SFTKeyError(f"{where}, which needs padded batches; set `padding_free: false` or context: full")
        launch = detect_launch(training_args)
        if launch.shards_parameters:
            fix = "launch with DDP or DeepSpeed ZeRO-2, or use context: full"
            raise SFTKeyError(f"{where}, which is not supported under {launch.name} (sharded weights); {fix}")
        if stage.overrides.get("log_part_losses", training_args.log_part_losses):
            notes.append(f"{where}: it logs key_loss only (the reasoning is not scored, so no reasoning_loss)")
    return notes


def check_router(training_args, model_args, stages: list[Stage]) -> list[str]:
    """`router_aux_loss_coef` needs a Mixture-of-Experts router, told by the model's config read offline; else a
    note (the trainer checks the loaded model)."""
    coefs = {stage.overrides.get("router_aux_loss_coef", training_args.router_aux_loss_coef) for stage in stages}
    if not any(coefs):
        return []
    from transformers import AutoConfig

    from ..train import modeling

    name = model_args.model_name_or_path
    options = {"revision": model_args.model_revision, "trust_remote_code": training_args.trust_remote_code}
    try:
        known = AutoConfig.for_model(MODEL_TYPES[name]) if name in MODEL_TYPES else None
        config = known or AutoConfig.from_pretrained(name, local_files_only=True, **options)
    except (OSError, ValueError):
        return [f"`router_aux_loss_coef` is set and the config of `{name}` is not on this machine: checked on load"]
    for coef in coefs:
        modeling.require_router(coef, config)
    return []


def check_selection(script_args, stage_name: str) -> None:
    """Keep-best needs a validation split (the `eval_fraction` hold-out) that is not the evaluation set."""
    has_test = bool(script_args.eval_dataset_name or script_args.eval_split)
    if script_args.eval_fraction <= 0 and not has_test:
        raise SFTKeyError(
            f"stage `{stage_name}` has keep_best but there is no validation data; set `eval_fraction` "
            "(held out from train) or `eval_dataset_name`"
        )
    if not (script_args.eval_fraction > 0 and has_test) and not script_args.select_on_test:
        raise SFTKeyError(
            f"stage `{stage_name}` has keep_best, but its validation data is the evaluation set, so the reported "
            "numbers would be selected on test; set both `eval_fraction` (validation) and `eval_split` or "
            "`eval_dataset_name` (test), or `select_on_test: true` to accept and label that"
        )


def check_patience(stage: Stage) -> None:
    """`patience` counts keep_best's validation evaluations, so it needs keep_best."""
    if stage.patience is not None and not stage.keep_best:
        raise SFTKeyError(
            f"stage `{stage.name}` has `patience: {stage.patience}` but not `keep_best: true`; patience counts "
            "keep_best's validation evaluations: add `keep_best: true` to the stage or remove `patience`"
        )
