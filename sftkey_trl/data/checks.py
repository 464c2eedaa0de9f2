"""What `--dry_run` can check of the data on this machine before any model is loaded: the evaluation rows the
adapter can use, and the length notes a real run would give."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from ..errors import SFTKeyError
from ..files import DEMO_PREFIX
from .formatting import Formatter
from .loading import InvalidReport, check_usable_rows, length_notes, load_splits, local_path, to_triples
from .masks import tokenize_rendered


def check_local_data(script_args, training_args, load_tokenizer: Callable[[], Any], sample: int = 2000) -> list[str]:
    """`--dry_run`'s look at local data: the evaluation rows the adapter keeps, and a real run's length notes from
    the first `sample` training rows and the offline tokenizer (`load_tokenizer()` raises `SFTKeyError` without)."""
    names = [script_args.dataset_name or "", script_args.eval_dataset_name or ""]
    if not any(name.startswith(DEMO_PREFIX) or local_path(name) for name in names if name):
        return ["data checks: the data is not local; they run when a real run loads it"]
    local = dataclasses.replace(script_args, max_train_samples=min(sample, script_args.max_train_samples or sample))
    train, _, evaluation = load_splits(local, training_args.seed)
    notes = []
    if evaluation is not None:
        report = InvalidReport()
        usable = len(to_triples(evaluation, script_args, report))
        check_usable_rows(len(evaluation), usable, report, script_args.dataset_format)
        notes.append(f"evaluation rows: {usable} of {len(evaluation)} usable")
    try:
        tokenizer = load_tokenizer()
    except SFTKeyError:
        return notes + ["length checks: the tokenizer is not available offline; they run when a real run loads it"]
    formatter = Formatter(tokenizer, script_args, training_args.eos_token)
    rendered = [formatter.render(triple) for _, triple in to_triples(train, script_args, InvalidReport())]
    if not rendered:
        stop = "a real run stops with the invalid-row report"
        return notes + [f"length checks: none of the first {len(train)} training rows is usable; {stop}"]
    columns = tokenize_rendered(tokenizer, rendered)
    lengths = [len(ids) for ids in columns["input_ids"]]
    responses = [sum(mask) for mask in columns["completion_mask"]]
    return notes + length_notes(lengths, responses, training_args.max_length, script_args.max_new_tokens)
