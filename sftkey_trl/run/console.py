"""A quiet console: what a person reads during a run, and none of what the libraries print by habit.

Each silenced line is named here with why it carries nothing for a user of this project; everything is silenced at
the library's own switch or logger (never by making a library look absent). This module imports no ML library
before its filters are in place (importing peft imports bitsandbytes, which logs at import). Training logs print as
lines of numbers: `tracking.LogLines`.
"""

from __future__ import annotations

import logging
import warnings

# (logger, text of the record to drop, why it carries nothing here)
DROPPED_RECORDS = (
    ("bitsandbytes.backends.cpu.ops", "kernels-community",
     "peft imports bitsandbytes whenever it is installed, and on a CPU its backend says the optional `kernels` "
     "package (a faster 4-bit matmul fetched from the Hub) is missing before it uses its own kernel"),
    ("DeepSpeed", "Setting accelerator to CPU",
     "accelerate imports DeepSpeed whenever it is installed (to unwrap models), and DeepSpeed then says it found no "
     "GPU, also in runs that do not use it; a DeepSpeed run on CPU is refused or set up explicitly"),
    ("transformers.trainer_utils", "mtime may not be reliable",
     "checkpoint folders are ordered by step number, the fallback it announces, which is what this project reads"),
)  # fmt: skip
# (the start of a warning's message, its category, why it carries nothing here)
DROPPED_WARNINGS = (
    ("`is_gradient_checkpointing` is deprecated", FutureWarning, "trl reads the deprecated property itself"),
    ("`gradient_checkpointing_enable` is deprecated", FutureWarning, "peft and trl call the deprecated method"),
)


class _DropText(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def quiet_libraries() -> None:
    """Silence what the libraries print by habit: datasets' and transformers' progress bars for files this project
    writes and reads back itself (split generation, dataset saves, weight loading and writing; the training bar is
    tqdm's own and stays), and the records and warnings listed above."""
    for name, text, _ in DROPPED_RECORDS:  # first: importing the libraries below already logs some of them
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropText) and f.text == text for f in logger.filters):
            logger.addFilter(_DropText(text))
    for text, category, _ in DROPPED_WARNINGS:
        warnings.filterwarnings("ignore", message=f"^{text}", category=category)
    import datasets
    from transformers.utils import logging as transformers_logging

    datasets.disable_progress_bars()
    transformers_logging.disable_progress_bar()
