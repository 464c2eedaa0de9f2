"""`--help` of the entry points: this project's flags and recipe keys first, with the defaults the docs give (the
dataclasses' own, never the demo recipe's), then where the TRL / transformers keys are (`--help-all` lists them)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import textwrap

from ..recipe.flags import FlagParser

WIDTH = 100  # the help's width, whatever the terminal's (a pipe has none)


def _formatter(prog: str) -> argparse.HelpFormatter:
    return argparse.HelpFormatter(prog, width=WIDTH, max_help_position=26)


def _raw_formatter(prog: str) -> argparse.HelpFormatter:  # the description's examples keep their lines
    return argparse.RawDescriptionHelpFormatter(prog, width=WIDTH, max_help_position=26)


TRL_KEYS = (
    "Every other key of trl.SFTConfig / transformers.TrainingArguments (learning_rate, num_train_epochs, "
    "per_device_train_batch_size, max_length, bf16, seed, ...) and of trl.ModelConfig (model_name_or_path, use_peft, "
    "lora_r, load_in_4bit, ...) is a recipe key too: `--help-all` lists all of them with their defaults, and "
    "docs/recipe-keys.md says which TRL options SFTKey refuses and why."
)


def _shown(value) -> str:
    if isinstance(value, (list, dict)) or isinstance(value, str) and "\n" in value:
        return json.dumps(value)
    return "none" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def _key_help(entry: dataclasses.Field, default) -> str:
    text = entry.metadata.get("help", "").strip()
    return f"{text} [{_shown(default)}]" if text else f"[{_shown(default)}]"


def _default(entry: dataclasses.Field):
    if entry.default is not dataclasses.MISSING:
        return entry.default
    return entry.default_factory() if entry.default_factory is not dataclasses.MISSING else None


def add_project_keys(parser: argparse.ArgumentParser) -> None:
    """Groups for the recipe keys this project adds: data and format, training, and each stage's keys."""
    from trl import SFTConfig

    from ..recipe.schema import SFTKeyConfig, SFTKeyScriptArguments
    from ..train.objectives import Stage

    group = parser.add_argument_group("recipe keys: data, format and evaluation (this project's; [default])")
    for entry in dataclasses.fields(SFTKeyScriptArguments):
        group.add_argument(f"--{entry.name}", metavar="", help=_key_help(entry, _default(entry)))
    trl_fields = {entry.name for entry in dataclasses.fields(SFTConfig)}
    group = parser.add_argument_group("recipe keys: training, added to TRL's SFTConfig ([default])")
    for entry in dataclasses.fields(SFTKeyConfig):
        if entry.name not in trl_fields:
            group.add_argument(f"--{entry.name}", metavar="", help=_key_help(entry, _default(entry)))
    group = parser.add_argument_group(
        "stage keys: each entry of `stages:`, plus any training key to override in that stage ([default])"
    )
    for entry in dataclasses.fields(Stage):
        if "help" in entry.metadata:
            shown = "required" if entry.name == "name" else _default(entry)
            group.add_argument(entry.name, nargs="?", help=_key_help(entry, shown))


def run_help(prog: str, flags: argparse.ArgumentParser) -> str:
    """`recipes/run.py --help`: its flags (`flags`, the parser `cli.run_options` reads them with), the keys this
    project adds, then where the TRL / transformers keys are."""
    from ..recipe.schema import DEMO_RECIPE

    parser = FlagParser(
        prog=prog,
        usage=f"{prog} [--config RECIPE] [--dry_run | --inspect N | --eval_only | --merge STAGE] [--KEY VALUE ...]",
        description="Train and evaluate an SFTKey recipe: stage 1 on the whole response, then the key stage on the "
        f"final answer only. Without --config it runs the offline demo ({DEMO_RECIPE}).",
        epilog=TRL_KEYS,
        formatter_class=_formatter,
        add_help=False,
    )
    own = parser.add_argument_group("flags")
    own.add_argument("--config", metavar="RECIPE", help="The recipe: a YAML file of keys [the offline demo].")
    for action in flags._actions:
        own._add_action(action)
    own.add_argument("-h", "--help", action="store_true", help="Show this help and exit.")
    own.add_argument("--help-all", action="store_true", help="Also list every TRL / transformers key and exit.")
    add_project_keys(parser)
    return parser.format_help()


def compare_help(prog: str, flags: argparse.ArgumentParser, description: str | None) -> str:
    """`recipes/compare.py --help`: its flags with their defaults, the variants it knows, and that every recipe key
    passes through to the arms."""
    from .variants import DEFAULT_VARIANTS, VARIANT_NAMES

    names = ", ".join(f"{name}{' *' if name in DEFAULT_VARIANTS else ''}" for name in VARIANT_NAMES)
    epilog = (
        f"Variants (* the default arms): {names}; and sft_keyweight_<weight> for a sweep of key_weight "
        "(docs/compare.md says what each one trains). Every other flag is a recipe key (--config RECIPE.yaml, "
        "--learning_rate 1e-4, --output_dir DIR, ...) and applies to every arm; run.py's modes (--dry_run, --inspect, "
        "--eval_only, --merge) do not apply here."
    )
    parser = FlagParser(
        prog=prog,
        description=description,
        epilog=textwrap.fill(epilog, WIDTH),
        formatter_class=_raw_formatter,
        add_help=False,
    )
    for action in flags._actions:
        parser._add_action(action)
    parser.add_argument("-h", "--help", action="store_true", help="Show this help and exit.")
    return parser.format_help()


def all_keys_help(prog: str) -> str:
    """Every recipe key, TRL's and transformers' included, with the dataclasses' defaults (TrlParser's own help)."""
    from trl import ModelConfig, TrlParser

    from ..recipe.schema import SFTKeyConfig, SFTKeyScriptArguments

    parser = TrlParser((SFTKeyScriptArguments, SFTKeyConfig, ModelConfig), prog=prog)
    return parser.format_help()
