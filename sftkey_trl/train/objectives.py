"""Stage objectives: what a stage's loss is, in one place.

A stage names its objective with `loss_on`; the objective weighs each token from the example's `completion_mask`
(the response) and `key_mask` (what follows `</Thinking>`). The loss is `sum(weight * token_loss) / normaliser`,
the token loss NLL or DFT (`loss_type`), the normaliser the weighted tokens or the response tokens
(`loss_normalization`). `context: detached` holds the reasoning fixed (`train/detached.py`).

A new objective is one `Objective` entry in `OBJECTIVES` (plus a `Stage` field for a new key, checked in
`_check_option`); the collator, trainer, `--inspect`, `--dry_run`, help, card and comparison read it from here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import SFTKeyError, closest

LOSS_NORMALIZATIONS = ("supervised_tokens", "completion_tokens")
LOSS_TYPES = ("nll", "dft")  # the `loss_type` values (recipe-wide or per stage) that `token_losses` computes
CONTEXTS = {
    "full": "",
    "detached": "; `context: detached`: the prompt and reasoning are fixed context (run without gradient into a KV "
    "cache), only the key tokens run forward and backward, so the answer loss cannot change the reasoning",
}


@dataclass(frozen=True)
class Objective:
    """One kind of stage loss: its per-token weights, the stage keys it accepts, and what it trains on in words:
    `description` for `--inspect` and `--dry_run`, `summary` (a few words) for the model card and the comparison."""

    name: str
    description: str
    summary: str
    options: tuple[str, ...]
    weights: Callable[[torch.Tensor, torch.Tensor, Stage], torch.Tensor]


def _completion_weights(completion: torch.Tensor, key: torch.Tensor, stage: Stage) -> torch.Tensor:
    return completion.float() + (stage.key_weight - 1.0) * (completion & key).float()


def _key_weights(completion: torch.Tensor, key: torch.Tensor, stage: Stage) -> torch.Tensor:
    return key.float() + stage.reasoning_weight * (completion & ~key).float()


OBJECTIVES: dict[str, Objective] = {
    "completion": Objective(
        "completion",
        "every response token, end-of-turn included (stage 1: ordinary completion-only SFT); key tokens weigh "
        "`key_weight`",
        "the whole response (reasoning and answer)",
        ("loss_normalization", "key_weight"),
        _completion_weights,
    ),
    "key": Objective(
        "key",
        "the key tokens after `</Thinking>` (stage 2: the paper's key stage); reasoning tokens get `reasoning_weight`",
        "the final-answer (key) tokens only",
        ("loss_normalization", "reasoning_weight", "context"),
        _key_weights,
    ),
}


@dataclass
class Stage:
    """One training stage, as resolved from the recipe's `stages:` list. Build it with keywords."""

    name: str = field(metadata={"help": "The stage's folder under output_dir; unique."})
    loss_on: str = field(default="completion", metadata={"help": "completion (stage 1) or key (the key stage)."})
    loss_normalization: str = field(
        default="supervised_tokens",
        metadata={"help": "supervised_tokens (the paper) or completion_tokens: divide by the response's tokens."},
    )
    reasoning_weight: float = field(
        default=0.0, metadata={"help": "key stage: the loss weight of reasoning tokens (0: the paper, 1: stage 1)."}
    )
    key_weight: float = field(
        default=1.0, metadata={"help": "completion stage: the key tokens' weight, 1-100 (answer emphasis)."}
    )
    context: str = field(
        default="full", metadata={"help": "key stage: full, or detached (no gradient into prompt and reasoning)."}
    )
    keep_best: bool = field(
        default=False, metadata={"help": "Evaluate on the validation split during the stage and keep the best."}
    )
    patience: int | None = field(
        default=None, metadata={"help": "With keep_best: stop after this many evaluations without improvement."}
    )
    overrides: dict[str, Any] = field(default_factory=dict)  # the stage's training keys

    @property
    def objective(self) -> Objective:
        return OBJECTIVES[self.loss_on]

    @property
    def description(self) -> str:
        """What the stage trains on and how (`--inspect`, `--dry_run`)."""
        return self.objective.description + CONTEXTS[self.context]

    @property
    def summary(self) -> str:
        """The objective's summary and the options that differ from their defaults (the card, the comparison)."""
        return self.objective.summary + "".join(f", {key}: {value}" for key, value in self.options().items())

    def loss_weights(self, completion: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        """Per-token loss weights (float32, the masks' shape) from boolean completion and key masks."""
        return self.objective.weights(completion.bool(), key.bool(), self)

    def normaliser_mask(self, completion: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The tokens the loss is divided by (see the module docstring)."""
        return completion.bool() if self.loss_normalization == "completion_tokens" else weights > 0

    def options(self) -> dict[str, Any]:
        """The objective's keys whose values differ from their defaults (for reports and `--dry_run`)."""
        return {key: getattr(self, key) for key in self.objective.options if getattr(self, key) != DEFAULTS[key]}


def token_losses(log_probs: torch.Tensor, loss_type: str) -> torch.Tensor:
    """Per-token losses from the fused LM head's log-probabilities: `nll` is `-log p`; `dft` (arXiv 2508.05629)
    scales it by the token's own detached probability, so it only rescales the gradient."""
    nll = -log_probs
    if loss_type == "dft":
        return nll * log_probs.detach().exp()
    if loss_type != "nll":
        raise SFTKeyError(f"`loss_type: {loss_type}` is not supported; use one of {LOSS_TYPES}")
    return nll


def _check_option(key: str, value: Any) -> Any:
    """A stage option's value, checked (ValueError with the reason otherwise)."""
    if key == "loss_normalization" and value not in LOSS_NORMALIZATIONS:
        raise ValueError(f"use one of {LOSS_NORMALIZATIONS}")
    if key == "reasoning_weight":
        if isinstance(value, bool) or not isinstance(value, (int, float, str)) or not 0 <= float(value) <= 1:
            raise ValueError("must be a number between 0 and 1")
        return float(value)
    if key == "key_weight":
        if isinstance(value, bool) or not isinstance(value, (int, float, str)) or not 1 <= float(value) <= 100:
            raise ValueError("must be a number from 1 (no emphasis) to 100")
        return float(value)
    if key == "context" and value not in CONTEXTS:
        raise ValueError(f"use one of {tuple(CONTEXTS)}")
    if key == "keep_best" and not isinstance(value, bool):
        raise ValueError("must be true or false")
    if key == "patience" and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError("must be a whole number of evaluations, at least 1")
    return value


COMMON_OPTIONS = ("keep_best", "patience")  # options of every objective
OPTIONS = {f.name for f in dataclasses.fields(Stage)} - {"name", "loss_on", "overrides"}
DEFAULTS = {f.name: f.default for f in dataclasses.fields(Stage) if f.name in OPTIONS}


def parse_stages(
    raw: Any, training_keys: set[str], coerce: Callable[[str, Any, str], Any] | None = None
) -> list[Stage]:
    """Validate the recipe's `stages:` list into `Stage` objects (one-line `SFTKeyError`s); other keys must be in
    `training_keys`, typed by `coerce(key, value, where)` as the command line would."""
    if not isinstance(raw, list) or not raw:
        raise SFTKeyError("`stages` must be a non-empty list, e.g. [{name: sft, loss_on: completion}, ...]")
    stages, names = [], set()
    for index, entry in enumerate(raw):
        where = f"stages[{index}]"
        if not isinstance(entry, dict):
            raise SFTKeyError(f"{where} must be a mapping with `name` and `loss_on`, got {entry!r}")
        entry = dict(entry)
        name = entry.pop("name", None)
        if not name or not isinstance(name, str):
            raise SFTKeyError(f"{where} has no `name`; give each stage a unique name such as `sft` or `key`")
        if name in names:
            raise SFTKeyError(f"stage name `{name}` repeats in `stages`; stage names must be unique")
        if "/" in name or name.startswith("."):
            raise SFTKeyError(f"stage name `{name}` is used as a folder name; use letters, digits, - and _")
        names.add(name)
        where = f"{where} ({name})"
        loss_on = entry.pop("loss_on", "completion")
        if loss_on not in OBJECTIVES:
            hint = closest(str(loss_on), OBJECTIVES)
            raise SFTKeyError(f"{where}: `loss_on: {loss_on}` is not valid{hint}; use one of {tuple(OBJECTIVES)}")
        objective = OBJECTIVES[loss_on]
        values: dict[str, Any] = {}
        for key in [key for key in entry if key in OPTIONS]:
            value = entry.pop(key)
            if key not in objective.options + COMMON_OPTIONS:
                users = [o.name for o in OBJECTIVES.values() if key in o.options]
                raise SFTKeyError(
                    f"{where}: `{key}` applies to `loss_on: {' / '.join(users)}` stages, not "
                    f"`loss_on: {loss_on}`; remove it or change `loss_on`"
                )
            try:
                values[key] = _check_option(key, value)
            except (TypeError, ValueError) as error:
                raise SFTKeyError(f"{where}: `{key}: {value}` is not valid: {error}") from None
        for key in entry:
            if key not in training_keys:
                hint = closest(key, training_keys | set(OPTIONS))
                raise SFTKeyError(f"{where}: unknown key `{key}`{hint}")
            if coerce is not None:
                entry[key] = coerce(key, entry[key], f"{where}: ")
        stages.append(Stage(name=name, loss_on=loss_on, overrides=entry, **values))
    return stages
