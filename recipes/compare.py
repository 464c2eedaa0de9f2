"""Train and evaluate the paper's variants from one recipe, over several seeds, and report means, 95% confidence
intervals and paired differences (including the compute-matched baseline the paper lacks).

    python recipes/compare.py                                   # offline demo: 5 variants x 3 seeds
    python recipes/compare.py --config recipes/<...>.yaml --variants sft_tag,sftkey_tag,sft_tag_matched --seeds 5

Rerunning with other `--variants` and the same output folder adds them to the existing table.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from sftkey_trl.errors import SFTKeyError, closest
from sftkey_trl.files import read_json
from sftkey_trl.run.cli import config_path, run_options, user_errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default=None, help="Comma-separated variant names (default: 5 variants).")
    parser.add_argument("--seeds", type=int, default=3, help="Number of seeds (0, 1, ..., N-1).")
    parser.add_argument("--comparison_dir", default=None, help="Where to write (default: <output_dir>/compare).")
    options, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if argv is None:  # as the program: before the recipe parser imports the ML libraries (see run/process.py)
        from sftkey_trl.run.process import prepare_process

        prepare_process(rest, config_path(rest))
    run, rest = run_options(rest)
    from sftkey_trl.recipe.config import parse_config
    from sftkey_trl.run.compare import DEFAULT_VARIANTS, build_variants, run_variant, write_comparison

    with user_errors(run.debug):
        script_args, training_args, model_args, stages = parse_config(rest)
        if training_args.push_to_hub:
            raise SFTKeyError("compare.py trains many variants and pushes none; remove `push_to_hub` (run.py pushes)")
        variants = build_variants(stages)
        names = [name.strip() for name in (options.variants or ",".join(DEFAULT_VARIANTS)).split(",") if name.strip()]
        for name in names:
            if name not in variants:
                raise SFTKeyError(f"unknown variant `{name}`{closest(name, variants)}; choose from {list(variants)}")
        root = Path(options.comparison_dir or Path(training_args.output_dir) / "compare")
        seeds = list(range(options.seeds))
        # Variants measured earlier in the same folder stay in the table, so variants can be added later
        earlier = read_json(root / "comparison.json", {}).get("per_seed", {})
        per_seed = {v: {int(s): r for s, r in runs.items()} for v, runs in earlier.items() if v not in names}
        per_seed.update({name: {} for name in names})
        for seed in seeds:
            for name in names:
                logging.info("=== variant %s, seed %d ===", name, seed)
                per_seed[name][seed] = run_variant(variants[name], seed, script_args, training_args, model_args, root)
                write_comparison(root, per_seed, variants, seeds)  # partial results survive a kill
        write_comparison(root, per_seed, variants, seeds)
        print((root / "comparison.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
