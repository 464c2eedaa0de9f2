"""The arms of the comparison, each exactly what its label says, and how one arm is run for one seed.

Every arm is derived from the recipe: its first `loss_on: completion` stage (stage 1) and its first `loss_on: key`
stage (stage 2), resolved with the recipe's top-level values. Arms that share a folder share stage 1 (the manifest
skips it when it is done), so `sft_tag`, `sftkey_tag`, `sft_continue` and the stage-2 forms train it once per seed.
Compute is counted in optimizer steps and trained tokens, recorded per arm.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import SFTKeyError
from ..train.objectives import Stage
from ..train.steps import optimizer_steps, stage_training_args

MATCHED = "sft_tag_matched"
PAPER = "sftkey_tag"
KEY_WEIGHT = 5.0  # the answer emphasis of the key_weight arms
KEY_WEIGHT_SWEEP = re.compile(r"sft_keyweight_(\d+(?:\.\d+)?)")  # `sft_keyweight_10`: sft_keyweight at weight 10


def swept_key_weights(names: list[str]) -> list[float]:
    """The weights asked for by `sft_keyweight_<weight>` names (a sweep: one arm per weight)."""
    return [float(match[1]) for name in names if (match := KEY_WEIGHT_SWEEP.fullmatch(name))]


@dataclass(frozen=True)
class Variant:
    """One arm: a run folder, a response format, its stages, and what it is in words.

    `match_steps_of`: the stages whose optimizer steps this arm's single stage must take in total (its `max_steps`
    is set to them at run time: the compute-matched baseline).
    """

    name: str
    folder: str
    response_format: str
    stages: tuple[Stage, ...]
    description: str
    match_steps_of: tuple[Stage, ...] | None = None


def _length(args) -> str:
    return f"{args.max_steps} steps" if args.max_steps and args.max_steps > 0 else f"{args.num_train_epochs:g} ep"


def _settings(args) -> str:
    return f"{_length(args)}, lr {args.learning_rate:g}"


def build_variants(
    stages: list[Stage],
    training_args,
    recipe_format: str = "tags",
    converge: tuple[int, float] | None = None,
    key_weights: list[float] = (),
) -> dict[str, Variant]:
    """Every arm of the comparison, from the recipe's stage 1 and stage 2 (see the module docstring).

    Stage 1 keeps the recipe's own `keep_best` and `patience`, so a recipe whose stage 1 trains to convergence
    (recipes/demo/remainder.yaml) gives a converged stage 1 to every arm built on it.

    `converge` = (patience, max epochs): the converged-stage-1 protocol. Stage 1 trains until its validation metric
    has not improved for `patience` evaluations (at most `max epochs`) and keeps its best checkpoint, so the stage-2
    forms and `sft_continue` start from a converged model, as the paper describes.

    `key_weights`: one more `sft_keyweight_<weight>` arm per weight, `sft_keyweight` with that weight.
    """
    first = next((s for s in stages if s.loss_on == "completion"), None)
    second = next((s for s in stages if s.loss_on == "key"), None)
    if first is None or second is None:
        raise SFTKeyError("compare.py needs a recipe with a `loss_on: completion` stage and a `loss_on: key` stage")

    def args_of(stage: Stage):
        return stage_training_args(training_args, stage, "unused")

    args_1, args_2 = args_of(first), args_of(second)
    s1, s2 = _settings(args_1), _settings(args_2)
    # Stage 1 as the recipe writes it, its own convergence (keep_best + patience) included
    sft = Stage(name="sft", loss_on="completion", keep_best=first.keep_best, patience=first.patience,
                overrides=dict(first.overrides))  # fmt: skip
    if converge is not None:
        patience, epochs = converge
        sft = dataclasses.replace(sft, keep_best=True, patience=patience,
                                  overrides={**sft.overrides, "num_train_epochs": epochs})  # fmt: skip
    if sft.patience is not None:
        cap = _length(args_of(sft))
        s1 = f"to convergence: patience {sft.patience}, at most {cap}, lr {args_1.learning_rate:g}"
    elif sft.keep_best:
        s1 += ", keeping its best checkpoint"
    key = Stage(name="key", loss_on="key", overrides=dict(second.overrides))  # the paper's: hard mask, no keep_best
    continued = Stage(name="continue", loss_on="completion", overrides=dict(second.overrides))
    matched = Stage(name="sft", loss_on="completion", overrides=dict(first.overrides))
    key_from_base = Stage(
        name="key", loss_on="key", overrides={**first.overrides, "num_train_epochs": args_2.num_train_epochs}
    )
    same_lr = {**second.overrides, "learning_rate": args_1.learning_rate}
    forms = {
        "sftkey_tag_norm": (dataclasses.replace(key, name="key_norm", loss_normalization="completion_tokens"),
                            "loss divided by the response tokens (loss_normalization: completion_tokens)"),
        "sftkey_tag_mix": (dataclasses.replace(key, name="key_mix", reasoning_weight=0.1),
                           "reasoning tokens weighted 0.1 (reasoning_weight: 0.1)"),
        "sftkey_tag_dft": (dataclasses.replace(key, name="key_dft", overrides={**key.overrides, "loss_type": "dft"}),
                           "DFT on the key tokens: each token's loss scaled by its own probability (loss_type: dft)"),
        "sftkey_tag_best": (dataclasses.replace(key, name="key_best", keep_best=True),
                            "keeping the best checkpoint on validation, the incoming weights included (keep_best)"),
        "sftkey_tag_detached": (dataclasses.replace(key, name="key_detached", context="detached"),
                                "the reasoning as fixed context: no gradient through the prefix (context: detached)"),
        "sftkey_tag_stage1_lr": (dataclasses.replace(key, name="key_stage1_lr", overrides=same_lr),
                                 f"at stage 1's learning rate {args_1.learning_rate:g}"),
    }  # fmt: skip
    variants = [
        Variant("sft", "plain", "plain", (sft,), f"plain format, whole response ({s1}), stage 1 only"),
        Variant("sft_tag", "tags", "tags", (sft,), f"tags, whole response ({s1}), stage 1 only"),
        Variant("key_tag", "key_only", "tags", (key_from_base,),
                f"tags, key tokens only from the base model ({_settings(args_of(key_from_base))})"),
        Variant(PAPER, "tags", "tags", (sft, key),
                f"tags, stage 1 ({s1}) then the paper's key stage: key tokens only, hard mask, no keep_best ({s2})"),
        Variant("sft_continue", "tags", "tags", (sft, continued),
                f"tags, stage 1 ({s1}) then the whole response again with the key stage's steps and schedule ({s2})"),
        Variant(MATCHED, "matched", "tags", (matched,),
                f"tags, one whole-response run with as many optimizer steps as {PAPER}'s two stages (one schedule)",
                match_steps_of=(sft, key)),
        Variant("recipe", "recipe", recipe_format, tuple(copy.deepcopy(stages)),
                "the recipe's own stages, exactly as written"),
        Variant("sft_keyweight", "keyweight", "tags", (dataclasses.replace(sft, key_weight=KEY_WEIGHT),),
                f"tags, whole response with key tokens weighted {KEY_WEIGHT:g} ({s1}), one stage: sft_tag's compute"),
        Variant("sft_continue_keyweight", "tags", "tags",
                (sft, dataclasses.replace(continued, name="continue_keyweight", key_weight=KEY_WEIGHT)),
                f"sft_continue with key tokens weighted {KEY_WEIGHT:g} in the second stage: the same compute"),
    ]  # fmt: skip
    variants += [Variant(name, "tags", "tags", (sft, stage), f"{PAPER}'s key stage with {what}")
                 for name, (stage, what) in forms.items()]  # fmt: skip
    for weight in key_weights:
        label = f"{weight:g}"
        variants.append(Variant(f"sft_keyweight_{label}", f"keyweight_{label}", "tags",
                                (dataclasses.replace(sft, key_weight=weight),),
                                f"sft_keyweight with the key tokens weighted {label} ({s1}), one stage"))  # fmt: skip
    return {variant.name: variant for variant in variants}


DEFAULT_VARIANTS = ["sft", "sft_tag", "key_tag", PAPER, "sft_continue", MATCHED]


def planned_steps(stages: tuple[Stage, ...], training_args, num_rows: int, processes: int) -> int:
    """Optimizer steps the stages take in total over `num_rows` training rows."""
    return sum(
        optimizer_steps(stage_training_args(training_args, stage, "unused", processes), num_rows, processes)
        for stage in stages
    )


def run_variant(variant: Variant, seed: int, script_args, training_args, model_args, root: Path,
                steps_to_match: int | None = None) -> dict:  # fmt: skip
    """Train and evaluate one arm with one seed; return its last stage's metrics plus `optimizer_steps` and
    `train_tokens` summed over its stages. A matched arm takes `steps_to_match` steps (the target arm's recorded
    steps for this seed), or the target's planned steps when it has not run."""
    from .pipeline import Pipeline

    script_args = copy.deepcopy(script_args)
    training_args = copy.deepcopy(training_args)
    script_args.response_format = variant.response_format
    training_args.seed = seed
    training_args.output_dir = str(root / f"seed{seed}" / variant.folder)
    training_args.restart_from = None
    stages = [copy.deepcopy(stage) for stage in variant.stages]
    pipeline = Pipeline(script_args, training_args, model_args, stages)
    if variant.match_steps_of is not None:
        if steps_to_match is None:
            rows, processes = len(pipeline.data.train), pipeline.state.num_processes
            steps_to_match = planned_steps(variant.match_steps_of, training_args, rows, processes)
        stages[0].overrides["max_steps"] = steps_to_match
    results = pipeline.run()
    trained = [results["stages"][stage.name].get("training", {}) for stage in stages]
    record = dict(results["stages"][stages[-1].name])
    record.pop("training", None)
    record["optimizer_steps"] = sum(t.get("optimizer_steps", 0) for t in trained)
    record["train_tokens"] = sum(t.get("train_tokens", 0) for t in trained)
    return record
