"""Train and evaluate an SFTKey recipe.

accelerate launch recipes/run.py                                 # the offline demo
accelerate launch recipes/run.py --config recipes/<...>.yaml     # a real recipe
python recipes/run.py --config FILE --inspect 3 [--json]         # what each stage trains on
"""

from __future__ import annotations

import sys

from sftkey_trl.run.cli import main

if __name__ == "__main__":
    sys.exit(main())
