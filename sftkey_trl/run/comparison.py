"""Command-line entry point behind `recipes/compare.py`: its flags, and the loop that trains every arm
(`variants.py`) for every seed and rewrites the tables (`compare.py`) after each run, so partial results survive a
kill. Only light modules load before `prepare_process` has set the process up (see `process.py`)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ..errors import SFTKeyError, closest


def run_comparison(argv: list[str] | None = None, description: str | None = None) -> int:
    """Check the recipe and the flags, run every arm seed by seed, and print `comparison.md`; `description` is the
    script's usage text (`--help`). Called as the program (no `argv`), it first sets up the process."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default=None, help="Comma-separated variant names (default: the 6 main arms).")
    parser.add_argument("--seeds", type=int, default=3, help="Number of seeds (0, 1, ..., N-1).")
    parser.add_argument("--metric", default="accuracy", help="The metric the tables are ranked by.")
    parser.add_argument("--comparison_dir", default=None, help="Where to write (default: <output_dir>/compare).")
    converged = "Train stage 1 until validation stops improving for PATIENCE evaluations (keeping its best "
    converged += "checkpoint) before every stage-2 form: the paper's protocol."
    parser.add_argument("--converged", type=int, default=None, metavar="PATIENCE", help=converged)
    parser.add_argument("--converged_epochs", type=float, default=12, help="With --converged: the epoch cap.")
    options, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    from .process import start_entry_point

    start_entry_point(as_program=argv is None)  # before the recipe parser imports the ML libraries
    from ..evaluation.metrics import METRIC_NAMES
    from ..files import read_json
    from ..recipe.schema import COMPARE_DEMO_RECIPE
    from . import variants as arms
    from .cli import load_checked_recipe, run_options, user_errors
    from .compare import arm_configuration, carried_arms, write_comparison

    run, rest = run_options(rest, COMPARE_DEMO_RECIPE)
    with user_errors(run.debug):
        if options.metric not in METRIC_NAMES:
            raise SFTKeyError(f"unknown metric `{options.metric}`{closest(options.metric, METRIC_NAMES)}")
        run_only = [flag for flag, value in vars(run).items() if flag != "debug" and value not in (None, False)]
        if run_only:  # run.py's own flags: compare.py would otherwise train every arm anyway
            flag = run_only[0]
            raise SFTKeyError(f"`--{flag}` is a flag of recipes/run.py, not compare.py; use recipes/run.py for it")
        recipe, _ = load_checked_recipe(rest, comparison=True)
        converge = (options.converged, options.converged_epochs) if options.converged else None
        names = [n.strip() for n in (options.variants or ",".join(arms.DEFAULT_VARIANTS)).split(",") if n.strip()]
        variants = arms.build_variants(recipe, converge, arms.swept_key_weights(names))
        for name in names:
            if name not in variants:
                raise SFTKeyError(f"unknown variant `{name}`{closest(name, variants)}; choose from {list(variants)}")
        names.sort(key=lambda name: name == arms.MATCHED)  # the matched arm takes the paper arm's recorded steps
        root = Path(options.comparison_dir or Path(recipe.training.output_dir) / "compare")
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
        write_comparison(root, per_seed, variants, seeds, options.metric, configurations)
        print((root / "comparison.md").read_text())
    return 0
