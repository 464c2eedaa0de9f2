"""A quiet console: the libraries' habitual lines are dropped at their loggers and switches, and training logs read as
numbers (the whole demo's console is checked in tests/run/test_e2e.py::test_demo_end_to_end)."""

from __future__ import annotations

import logging

from sftkey_trl.run.console import DROPPED_RECORDS, quiet_libraries
from sftkey_trl.run.tracking import log_line


def test_a_log_is_one_line_of_numbers():
    logs = {"loss": 1.234567, "grad_norm": 0.5, "learning_rate": 0.0002, "num_tokens": 2370.0, "total_flos": 9e9}
    assert log_line(logs, 2, 12) == "step 2/12: loss 1.235, grad_norm 0.5, learning_rate 0.0002, num_tokens 2370"


def test_the_dropped_records_are_dropped_and_the_rest_kept():
    class Kept(logging.Handler):
        def __init__(self):
            super().__init__()
            self.messages = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    quiet_libraries()
    quiet_libraries()  # once per entry point, but never a second filter
    for name, text, _ in DROPPED_RECORDS:
        logger, kept = logging.getLogger(name), Kept()
        assert len(logger.filters) == 1
        logger.addHandler(kept)
        try:
            logger.warning("%s: the library's habit", text)
            logger.warning("a line that stays")
        finally:
            logger.removeHandler(kept)
        assert kept.messages == ["a line that stays"], name


def test_the_libraries_progress_bars_for_the_projects_own_files_are_off():
    import datasets
    from transformers.utils import logging as transformers_logging

    quiet_libraries()
    assert not datasets.is_progress_bar_enabled() and not transformers_logging.is_progress_bar_enabled()
