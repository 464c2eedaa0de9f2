"""The `sftkey-trl` command, installed with the package (also `python -m sftkey_trl`, and `accelerate launch -m
sftkey_trl` for several processes): one subcommand for each thing `recipes/run.py` and `recipes/compare.py` do."""

from __future__ import annotations

import sys

PROG = "sftkey-trl"
# subcommand -> (run.py's flag it stands for, None for training or compare.py; what it does)
SUBCOMMANDS = {
    "train": (None, "train and evaluate a recipe's stages (recipes/run.py)"),
    "check": ("--dry_run", "check a recipe offline and print it resolved (run.py --dry_run)"),
    "inspect": ("--inspect", "show what each stage trains on: `inspect N --config RECIPE` (run.py --inspect N)"),
    "eval": ("--eval_only", "evaluate a saved stage or the base model (run.py --eval_only)"),
    "merge": ("--merge", "merge a LoRA/QLoRA stage into its base: `merge STAGE --config RECIPE` (run.py --merge)"),
    "compare": (None, "train and compare the variants over seeds (recipes/compare.py)"),
}


def command_usage() -> str:
    lines = [f"usage: {PROG} <command> [--config RECIPE] [--KEY VALUE ...]", "", "commands:"]
    lines += [f"  {name:<9} {what}" for name, (_, what) in SUBCOMMANDS.items()]
    lines += [
        "",
        f"`{PROG} <command> --help` shows a command's flags and keys; with no --config, train and compare run the",
        "offline demo. On several GPUs: accelerate launch --config_file CONFIG -m sftkey_trl train --config RECIPE",
    ]
    return "\n".join(lines)


def run_command(argv: list[str] | None = None) -> int:
    """Run `sftkey-trl <command> ...` as the program (the process is set up as for the scripts)."""
    from ..errors import SFTKeyError, closest
    from .cli import main as run
    from .cli import user_errors

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(command_usage())
        return 0
    name, rest = argv[0], argv[1:]
    with user_errors("--debug" in rest):
        if name not in SUBCOMMANDS:
            raise SFTKeyError(
                f"unknown command `{name}`{closest(name, SUBCOMMANDS)}; use one of {', '.join(SUBCOMMANDS)}"
            )
    if name == "compare":
        from .comparison import run_comparison

        return run_comparison(rest, as_program=True, prog=f"{PROG} compare")
    flag = SUBCOMMANDS[name][0]
    return run(([flag] if flag else []) + rest, as_program=True, prog=f"{PROG} {name}")
