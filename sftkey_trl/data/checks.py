"""What `--dry_run` can check of the data on this machine before any model is loaded: every row check a real run
applies to the training rows (`loading.check_training_rows`, the same function: the same rows refused with the same
line), the evaluation rows the adapter can use, and the length notes a real run would give."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..errors import SFTKeyError
from ..files import DEMO_PREFIX
from .formatting import Formatter
from .loading import InvalidReport, check_training_rows, check_usable_rows, load_splits, to_triples
from .sources import local_path

TOKEN_CHECKS = "no character the tokenizer cannot encode, no key cut by `max_length`, tokens for each stage"


def check_local_data(script_args, training_args, stages, load_tokenizer: Callable[[], Any]) -> list[str]:
    """`--dry_run`'s look at local data, as a real run loads it (every training row it would train on): the row
    checks and their notes, and the evaluation rows the adapter keeps; with no tokenizer offline
    (`load_tokenizer()` raises `SFTKeyError`), the checks that need none. Returns what it found, in words."""
    names = [script_args.dataset_name or "", script_args.eval_dataset_name or ""]
    if not any(name.startswith(DEMO_PREFIX) or local_path(name) for name in names if name):
        return ["data checks: the data is not local; they run when a real run loads it"]
    train, _, evaluation = load_splits(script_args, training_args.seed)
    notes = []
    if evaluation is not None:
        report = InvalidReport()
        usable = len(to_triples(evaluation, script_args, report))
        check_usable_rows(len(evaluation), usable, report, script_args.dataset_format)
        notes.append(f"evaluation rows: {usable} of {len(evaluation)} usable")
    try:
        tokenizer = load_tokenizer()
    except SFTKeyError:
        tokenizer = None
    formatter = Formatter(tokenizer, script_args, training_args.eos_token) if tokenizer is not None else None
    checked = check_training_rows(train, script_args, training_args, stages, tokenizer, formatter)
    notes += checked.notes
    text_checks = "the adapter's" + (", no response tag in the data" if script_args.response_format == "tags" else "")
    if formatter is None:
        found = f"the checks that need no tokenizer ({text_checks}); the tokenizer is not available offline, so the "
        found += f"others ({TOKEN_CHECKS}) run when a real run loads it"
    else:
        found = f"every check a real run applies ({text_checks}, {TOKEN_CHECKS})"
    skipped = f"; skipped, as `on_invalid: skip` says: {checked.report.describe()}" if checked.report.total else ""
    return notes + [f"training rows: {checked.kept} of {len(train)} pass {found}{skipped}"]
