"""Command-line entry point behind `recipes/run.py`: flags that are not recipe keys, and one-line errors."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import SFTKeyError
from ..recipe.flags import FlagParser, flag_value

if TYPE_CHECKING:
    from ..recipe.schema import Recipe

logger = logging.getLogger("sftkey_trl")


def flag_parser() -> FlagParser:
    """run.py's own flags (everything else on its command line is a recipe key)."""
    parser = FlagParser(add_help=False)
    parser.add_argument("--dry_run", action="store_true", help="Check the recipe offline and print it resolved.")
    parser.add_argument("--inspect", type=int, default=None, metavar="N", help="Show what each stage trains on.")
    parser.add_argument("--json", action="store_true", help=INSPECT_JSON)
    parser.add_argument("--eval_only", action="store_true", help="Evaluate a saved stage (or the base model).")
    parser.add_argument("--checkpoint", default=None, metavar="DIR", help="With --eval_only: a saved stage folder.")
    parser.add_argument("--merge", default=None, metavar="STAGE", help="Merge a LoRA/QLoRA stage into its base.")
    parser.add_argument("--merge_dir", default=None, metavar="DIR", help="With --merge: where [<stage>/merged].")
    parser.add_argument("--debug", action="store_true", help="Show full tracebacks instead of one-line errors.")
    return parser


def run_options(argv: list[str], default_recipe: str | None = None) -> tuple[argparse.Namespace, list[str]]:
    """Split the flags of `run.py` itself from the recipe keys (which go to `parse_config`); with no `--config`,
    use `default_recipe` (a recipe the project ships; the demo by default)."""
    from ..recipe.schema import DEMO_RECIPE, bundled_recipe

    options, rest = flag_parser().parse_known_args(argv)
    if flag_value(rest, "--config") is None:
        rest = ["--config", str(bundled_recipe(default_recipe or DEMO_RECIPE))] + rest
    return options, rest


HELP_FLAGS = ("-h", "--help", "--help-all")


def print_help(argv: list[str], prog: str) -> None:
    """`--help`: run.py's flags and this project's keys; `--help-all`: every recipe key, TRL's included."""
    from .usage import all_keys_help, run_help

    print(all_keys_help(prog) if "--help-all" in argv else run_help(prog, flag_parser()), end="")


MODES = ("inspect", "eval_only", "merge", "dry_run")  # what run.py does instead of training: one at a time
NEEDS = {"json": "inspect", "checkpoint": "eval_only", "merge_dir": "merge"}  # flags that only apply with another


def check_flags(options: argparse.Namespace) -> None:
    """run.py's own flags, before the recipe or anything else is read: one mode at a time, each flag with the one it
    applies to, and their values (a `--checkpoint` folder must exist)."""
    given = {flag for flag, value in vars(options).items() if value not in (None, False)}
    modes = [f"--{mode}" for mode in MODES if mode in given]
    if len(modes) > 1:
        raise SFTKeyError(f"{' and '.join(modes)} are separate modes of run.py; give one of them")
    for flag, needed in NEEDS.items():
        if flag in given and needed not in given:
            raise SFTKeyError(f"`--{flag}` only applies with `--{needed}`; add `--{needed}` or remove `--{flag}`")
    if options.inspect is not None and options.inspect < 1:
        raise SFTKeyError(f"`--inspect {options.inspect}`: give the number of examples to show, at least 1")
    if options.merge is not None and not options.merge.strip():
        raise SFTKeyError("`--merge` needs the name of the stage to merge")
    if options.checkpoint is not None and not Path(options.checkpoint).is_dir():
        raise SFTKeyError(f"`--checkpoint {options.checkpoint}` is not a folder; point it at a saved stage folder")


@contextlib.contextmanager
def user_errors(debug: bool):
    """Print an `SFTKeyError` as one line and exit with status 2 (full traceback with `--debug`)."""
    try:
        yield
    except SFTKeyError as error:
        if debug:
            raise
        # One write per line: every rank of a launch reports into the same pipe, and print's separate write of the
        # newline lets two ranks' lines run together.
        sys.stderr.write(f"error: {error}\n")
        sys.stderr.flush()
        sys.exit(2)


INSPECT_JSON = (
    "With --inspect: one JSON object per example and stage, one per line: `index` (the training row), `stage`, `text` "
    "(the rendered example), `supervised_text` (the tokens the stage puts loss on, decoded together) and `weights` "
    "(the distinct loss weights above 0 those tokens get, e.g. [1.0, 5.0] with `key_weight: 5`, [0.1, 1.0] with "
    "`reasoning_weight: 0.1`)."
)
MARKS = ("[[", "]]")  # around supervised text when the output is not a terminal (no colours to show it)


def marked_text(tokenizer, input_ids: list[int], weights: list[float]) -> str:
    """The example with each run of supervised tokens between `[[` and `]]`, its loss weight in front when it is not
    1 (`[[x5: ...]]`); the text outside the marks is context the stage puts no loss on."""
    parts, run, current = [], [], 0.0

    def close() -> None:
        text = tokenizer.decode(run, skip_special_tokens=False)
        if current > 0:
            text = f"{MARKS[0]}{'' if current == 1 else f'x{current:g}: '}{text}{MARKS[1]}"
        parts.append(text)

    for token, weight in zip(input_ids, weights):
        weight = round(float(weight), 4)
        if run and weight != current:
            close()
            run = []
        run.append(token)
        current = weight
    if run:
        close()
    return "".join(parts)


def inspect(recipe: Recipe, count: int, as_json: bool) -> None:
    """Print, for the first `count` training examples, the rendered text and what each stage supervises:
    highlighted in a terminal, between `[[` and `]]` elsewhere (a pipe, a CI log), one JSON line each with
    `as_json` (the fields: `INSPECT_JSON`)."""
    import torch
    from rich.console import Console
    from rich.text import Text

    from ..data.formatting import Formatter
    from ..data.loading import prepare_data
    from ..data.masks import supervised_text
    from ..train.modeling import load_tokenizer

    script_args, training_args, stages = recipe.script, recipe.training, recipe.stages
    tokenizer = load_tokenizer(recipe.model, training_args)
    formatter = Formatter(tokenizer, script_args, training_args.eos_token)
    script_args.max_train_samples = min(count, script_args.max_train_samples or count)
    script_args.eval_dataset_name = script_args.eval_split = None
    script_args.eval_fraction = 0.0
    data = prepare_data(script_args, training_args, stages, tokenizer, formatter, cache_dir=None)
    console = Console(highlight=False)
    marked = not console.is_terminal
    if marked and not as_json:
        console.print(f"Supervised text is between {MARKS[0]} and {MARKS[1]}, with its loss weight in front when it "
                      "is not 1; the rest is context the stage puts no loss on.", markup=False)  # fmt: skip
    for row in data.train.select(range(min(count, len(data.train)))):
        text = tokenizer.decode(row["input_ids"], skip_special_tokens=False)
        for stage in stages:
            weights = stage.loss_weights(torch.tensor(row["completion_mask"]), torch.tensor(row["key_mask"]))
            if as_json:
                record = {
                    "index": row["index"],
                    "stage": stage.name,
                    "text": text,
                    "supervised_text": supervised_text(tokenizer, row["input_ids"], (weights > 0).int().tolist()),
                    "weights": sorted({round(float(w), 4) for w in weights if w > 0}),
                }
                print(json.dumps(record, ensure_ascii=False))
                continue
            console.rule(f"example {row['index']} - stage `{stage.name}`")
            if marked:
                console.print(f"trains on ({MARKS[0]}marked{MARKS[1]}): {stage.description}", markup=False)
                console.print(marked_text(tokenizer, row["input_ids"], weights.tolist()), markup=False, soft_wrap=True)
                continue
            rendered = Text()
            for token, weight in zip(row["input_ids"], weights.tolist()):
                style = "bold black on green" if weight >= 1 else "black on yellow" if weight > 0 else "dim"
                rendered.append(tokenizer.decode([token]), style=style)
            console.print(f"trains on (highlighted): {stage.description}", markup=False)  # wraps, unlike a rule
            console.print(rendered)


def load_checked_recipe(rest: list[str], dry_run: bool = False, comparison: bool = False) -> tuple[Recipe, list[str]]:
    """Parse, resolve and check the recipe (`recipe/checks.py`) before anything is loaded, so `--dry_run` and a real
    run refuse the same recipes with the same line; return it and the notes. The batch arithmetic is checked for the
    run's own process count, or with `--dry_run` for one and the count the recipe's `# Launch:` line names.
    `comparison`: compare.py's own rule (it pushes nothing) comes first, before any push setting is checked."""
    from ..recipe.checks import check_comparison, check_recipe, resolve_recipe
    from ..recipe.dryrun import launch_processes
    from ..recipe.parsing import parse_config
    from ..train.distributed import world_size

    recipe = parse_config(rest)
    if comparison:
        check_comparison(recipe.training)
    processes = launch_processes(recipe.path) if dry_run else [world_size()]
    return recipe, resolve_recipe(recipe) + check_recipe(recipe, processes)


def main(argv: list[str] | None = None, as_program: bool | None = None, prog: str = "recipes/run.py") -> int:
    """Parse flags and the recipe, check it, then inspect, dry-run, evaluate, merge or train. As the program (no
    `argv`, or `as_program`) it first sets up the process (`process.start_entry_point`); called from Python it leaves
    the process as it is."""
    from .process import start_entry_point

    as_program = argv is None if as_program is None else as_program
    argv = list(sys.argv[1:] if argv is None else argv)
    start_entry_point(as_program=as_program)
    if any(flag in HELP_FLAGS for flag in argv):
        print_help(argv, prog)
        return 0
    with user_errors("--debug" in argv):
        options, rest = run_options(argv)
        check_flags(options)
        recipe, notes = load_checked_recipe(rest, options.dry_run)
        if options.dry_run:
            from ..data.checks import check_local_data
            from ..recipe.dryrun import dry_run
            from ..train.modeling import load_tokenizer

            tokenizer = partial(load_tokenizer, recipe.model, recipe.training, offline=True)
            data_notes = check_local_data(recipe.script, recipe.training, recipe.stages, tokenizer)
            print(dry_run(recipe, notes + data_notes))
            return 0
        if options.inspect is not None:
            inspect(recipe, options.inspect, options.json)
            return 0
        for note in notes:
            logger.warning("note: %s", note)
        if options.merge is not None:
            export(options.merge, options.merge_dir, recipe)
            return 0
        from ..train.distributed import check_engine_runs_here
        from .hub import push_run
        from .pipeline import Pipeline
        from .report import print_results

        check_engine_runs_here(recipe.training)  # a real run only: a dry run checks a GPU recipe on any machine
        pipeline = Pipeline(recipe)
        results = pipeline.evaluate_only(options.checkpoint) if options.eval_only else pipeline.run()
        if pipeline.state.is_main_process:
            print_results(results, Path(recipe.training.output_dir))
            if recipe.training.push_to_hub and not options.eval_only:
                print(f"pushed to {push_run(recipe)}")
    return 0


def export(stage: str, merge_dir: str | None, recipe: Recipe) -> None:
    """`--merge STAGE`: write the stage merged into its base as a standalone model, with its model card."""
    from .card import model_card
    from .export import merge_stage, stage_folder
    from .lock import holding

    folder = stage_folder(recipe.training.output_dir, stage, [s.name for s in recipe.stages])
    # The output folder's lock: a run there may be replacing the stage folder the merge reads
    with holding(recipe.training.output_dir, fix="wait for the run to end, then merge"):
        merged = merge_stage(folder, recipe.model, recipe.training, merge_dir)
        name = recipe.training.hub_model_id or f"{Path(recipe.training.output_dir).name}-{stage}"
        model_card(merged, stage, "merged", name, recipe, location=str(merged)).save(merged / "README.md")
    print(f"standalone model (stage `{stage}` merged into {recipe.model.model_name_or_path}): {merged}")
