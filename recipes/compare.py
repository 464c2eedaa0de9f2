"""Train and evaluate the comparison's arms from one recipe, over several seeds, and report means, exact 95%
confidence intervals and paired differences against the continuation and compute-matched baselines.

    python recipes/compare.py                          # offline demo, recipes/demo/remainder.yaml: 6 arms x 3 seeds
    python recipes/compare.py --config recipes/<...>.yaml --variants sftkey_tag,sft_continue,sft_tag_matched --seeds 5
    python recipes/compare.py --converged 2 --seeds 5           # stage 1 trained to convergence first (the paper)
    python recipes/compare.py --variants sft_continue,sft_keyweight_2,sft_keyweight_10 --seeds 5  # a key_weight sweep

Rerunning with other `--variants` and the same output folder adds them to the existing table (the earlier arms stay
when they were measured with the same configuration and seeds).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from sftkey_trl.errors import SFTKeyError, closest
from sftkey_trl.files import read_json
from sftkey_trl.recipe.flags import flag_value
from sftkey_trl.run.cli import load_checked_recipe, run_options, user_errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default=None, help="Comma-separated variant names (default: the 6 main arms).")
    parser.add_argument("--seeds", type=int, default=3, help="Number of seeds (0, 1, ..., N-1).")
    parser.add_argument("--metric", default="accuracy", help="The metric the tables are ranked by.")
    parser.add_argument("--comparison_dir", default=None, help="Where to write (default: <output_dir>/compare).")
    parser.add_argument(
        "--converged",
        type=int,
        default=None,
        metavar="PATIENCE",
        help="Train stage 1 until validation stops improving for PATIENCE evaluations (keeping its "
        "best checkpoint) before every stage-2 form: the paper's protocol.",
    )
    parser.add_argument("--converged_epochs", type=float, default=12, help="With --converged: the epoch cap.")
    options, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if argv is None:  # as the program: before the recipe parser imports the ML libraries (see run/process.py)
        from sftkey_trl.run.process import prepare_process

        prepare_process(rest, flag_value(rest, "--config"))
    from sftkey_trl.recipe.schema import COMPARE_DEMO_RECIPE

    run, rest = run_options(rest, COMPARE_DEMO_RECIPE)
    from sftkey_trl.evaluation.metrics import METRIC_NAMES
    from sftkey_trl.run.compare import arm_configuration, carried_arms, write_comparison
    from sftkey_trl.run.variants import (
        DEFAULT_VARIANTS,
        MATCHED,
        PAPER,
        build_variants,
        run_variant,
        swept_key_weights,
    )

    with user_errors(run.debug):
        if options.metric not in METRIC_NAMES:
            raise SFTKeyError(f"unknown metric `{options.metric}`{closest(options.metric, METRIC_NAMES)}")
        script_args, training_args, model_args, stages, _ = load_checked_recipe(rest)
        if training_args.push_to_hub:
            raise SFTKeyError("compare.py trains many variants and pushes none; remove `push_to_hub` (run.py pushes)")
        converge = (options.converged, options.converged_epochs) if options.converged else None
        names = [name.strip() for name in (options.variants or ",".join(DEFAULT_VARIANTS)).split(",") if name.strip()]
        weights = swept_key_weights(names)
        variants = build_variants(stages, training_args, script_args.response_format, converge, weights)
        for name in names:
            if name not in variants:
                raise SFTKeyError(f"unknown variant `{name}`{closest(name, variants)}; choose from {list(variants)}")
        names.sort(key=lambda name: name == MATCHED)  # the matched arm takes the paper arm's recorded steps
        root = Path(options.comparison_dir or Path(training_args.output_dir) / "compare")
        seeds = list(range(options.seeds))
        # Variants measured earlier in the same folder, with this configuration and these seeds, stay in the table
        configurations = {name: arm_configuration(variant, script_args, training_args, model_args)
                          for name, variant in variants.items()}  # fmt: skip
        per_seed = carried_arms(read_json(root / "comparison.json", {}), names, seeds, configurations)
        per_seed.update({name: {} for name in names})
        for seed in seeds:
            for name in names:
                logging.info("=== variant %s, seed %d ===", name, seed)
                recorded = per_seed.get(PAPER, {}).get(seed, {}).get("optimizer_steps")
                target = (recorded or None) if name == MATCHED else None
                per_seed[name][seed] = run_variant(
                    variants[name], seed, script_args, training_args, model_args, root, steps_to_match=target
                )
                # partial results survive a kill
                write_comparison(root, per_seed, variants, seeds, options.metric, configurations)
        write_comparison(root, per_seed, variants, seeds, options.metric, configurations)
        print((root / "comparison.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
