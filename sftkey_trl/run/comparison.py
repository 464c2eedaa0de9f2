"""Command-line entry point behind `recipes/compare.py`: its flags, and the loop that trains every arm
(`variants.py`) for every seed and rewrites the tables (`compare.py`) after each run, so partial results survive a
kill. Only light modules load before `prepare_process` has set the process up (see `process.py`)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ..errors import SFTKeyError, closest
from ..recipe.flags import FlagParser, flag_value

CONVERGED_EPOCHS = 12  # --converged's default epoch cap


def comparison_flags(description: str | None = None) -> FlagParser:
    """compare.py's own flags (everything else on its command line is a recipe key, for every arm)."""
    parser = FlagParser(description=description, add_help=False)
    parser.add_argument(
        "--variants", default=None, help="Comma-separated variant names [the 6 main arms, marked * below]."
    )
    parser.add_argument("--seeds", type=int, default=3, help="Number of seeds: 0, 1, ..., N-1 [%(default)s].")
    parser.add_argument("--metric", default="accuracy", help="The metric the tables are ranked by [%(default)s].")
    parser.add_argument("--comparison_dir", default=None, help="Where to write [<output_dir>/compare].")
    converged = "Train stage 1 until validation stops improving for PATIENCE evaluations (keeping its best "
    converged += "checkpoint) before every stage-2 form: the paper's protocol [off]."
    parser.add_argument("--converged", type=int, default=None, metavar="PATIENCE", help=converged)
    parser.add_argument(
        "--converged_epochs", type=float, default=None, help=f"With --converged: the epoch cap [{CONVERGED_EPOCHS}]."
    )
    parser.add_argument("--debug", action="store_true", help="Show full tracebacks instead of one-line errors.")
    return parser


def run_comparison(
    argv: list[str] | None = None,
    description: str | None = None,
    as_program: bool | None = None,
    prog: str = "recipes/compare.py",
) -> int:
    """Check the recipe and the flags, run every arm seed by seed, and print the comparison's table and the files it
    wrote; `description` is the script's usage text (`--help`). As the program (no `argv`, or `as_program`) it
    first sets up the process."""
    as_program = argv is None if as_program is None else as_program
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = comparison_flags(description)
    if "-h" in argv or "--help" in argv:
        from .process import start_entry_point
        from .usage import compare_help

        start_entry_point(as_program=as_program)
        print(compare_help(prog, parser, description), end="")
        return 0
    from .cli import user_errors

    with user_errors("--debug" in argv):
        options, rest = parser.parse_known_args(argv)
        return _compare(options, rest, as_program)


def check_comparison_flags(options: argparse.Namespace, rest: list[str]) -> None:
    """compare.py's own flags, before anything is loaded: their ranges and the flags they need."""
    if options.seeds < 1:
        raise SFTKeyError(f"`--seeds {options.seeds}`: give the number of seeds to run, at least 1")
    if options.converged is not None and options.converged < 1:
        raise SFTKeyError(f"`--converged {options.converged}`: give the patience in evaluations, at least 1")
    if options.converged_epochs is not None:
        if options.converged is None:
            raise SFTKeyError("`--converged_epochs` only applies with `--converged`; add `--converged PATIENCE`")
        if not 0 < options.converged_epochs < float("inf"):
            raise SFTKeyError(f"`--converged_epochs {options.converged_epochs:g}`: give the epoch cap, above 0")
    if options.variants is not None:
        names = [name.strip() for name in options.variants.split(",")]
        if not options.variants.strip():
            raise SFTKeyError("`--variants` is empty; give comma-separated variant names")
        if not all(names):
            raise SFTKeyError(f"`--variants {options.variants}` has an empty name; give comma-separated variant names")
        repeated = next((name for name in names if names.count(name) > 1), None)
        if repeated:
            raise SFTKeyError(f"`--variants` names `{repeated}` twice; give each variant once")
    if flag_value(rest, "--seed") is not None:
        raise SFTKeyError("compare.py runs the seeds 0 to N-1 of `--seeds N`; remove `--seed`")


def _compare(options: argparse.Namespace, rest: list[str], as_program: bool) -> int:
    check_comparison_flags(options, rest)
    from .process import start_entry_point

    start_entry_point(as_program=as_program)  # before the recipe parser imports the ML libraries
    from ..data.adapters import answer_type_of
    from ..evaluation.metrics import reported
    from ..files import mark_folder, read_json
    from ..recipe.folders import check_comparison_folder
    from ..recipe.schema import COMPARE_DEMO_RECIPE
    from . import variants as arms
    from .cli import load_checked_recipe, run_options
    from .compare import arm_configuration, carried_arms, print_comparison, write_comparison

    run, rest = run_options(rest, COMPARE_DEMO_RECIPE)
    run_only = [flag for flag, value in vars(run).items() if flag != "debug" and value not in (None, False)]
    if run_only:  # run.py's own flags: compare.py would otherwise train every arm anyway
        flag = run_only[0]
        raise SFTKeyError(f"`--{flag}` is a flag of recipes/run.py, not compare.py; use recipes/run.py for it")
    recipe, _ = load_checked_recipe(rest, comparison=True)
    answer_type = answer_type_of(recipe.script)
    ranked = [m.name for m in reported() if m.higher_is_better is True and answer_type in m.answer_types]
    if options.metric not in ranked:  # the tables hold the reported metrics, ranked highest first
        hint = closest(options.metric, ranked)
        raise SFTKeyError(
            f"`--metric {options.metric}` cannot rank the comparison{hint}; use one of {', '.join(ranked)}"
        )
    epochs = options.converged_epochs or CONVERGED_EPOCHS
    converge = (options.converged, epochs) if options.converged is not None else None
    names = [n.strip() for n in (options.variants or ",".join(arms.DEFAULT_VARIANTS)).split(",")]
    variants = arms.build_variants(recipe, converge, arms.swept_key_weights(names))
    for name in names:
        if name not in variants:
            raise SFTKeyError(f"unknown variant `{name}`{closest(name, variants)}; choose from {list(variants)}")
    names.sort(key=lambda name: name == arms.MATCHED)  # the matched arm takes the paper arm's recorded steps
    root = Path(options.comparison_dir or Path(recipe.training.output_dir) / "compare")
    check_comparison_folder(root)
    mark_folder(root, "comparison")  # each arm's run folder inside it carries its own marker and lock
    seeds = list(range(options.seeds))
    # Variants measured earlier in the same folder, with this configuration and these seeds, stay in the table
    configurations = {name: arm_configuration(variant, recipe) for name, variant in variants.items()}
    per_seed = carried_arms(read_json(root / "comparison.json", {}), names, seeds, configurations)
    per_seed.update({name: {} for name in names})
    for seed in seeds:
        for name in names:
            logging.info("=== variant %s, seed %d ===", name, seed)
            recorded = per_seed.get(arms.PAPER, {}).get(seed, {}).get("optimizer_steps")
            target = (recorded or None) if name == arms.MATCHED else None
            per_seed[name][seed] = arms.run_variant(variants[name], seed, recipe, root, steps_to_match=target)
            write_comparison(root, per_seed, variants, seeds, options.metric, configurations)  # survives a kill
    print_comparison(*write_comparison(root, per_seed, variants, seeds, options.metric, configurations))
    return 0
