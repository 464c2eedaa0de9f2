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

import sys
from functools import partial

from sftkey_trl.run.comparison import run_comparison

main = partial(run_comparison, description=__doc__)  # --help shows the usage above

if __name__ == "__main__":
    sys.exit(main())
