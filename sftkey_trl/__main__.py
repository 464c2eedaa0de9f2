"""`python -m sftkey_trl <command>` and `accelerate launch -m sftkey_trl <command>`: the `sftkey-trl` command."""

import sys

from sftkey_trl.run.command import run_command

if __name__ == "__main__":
    sys.exit(run_command())
