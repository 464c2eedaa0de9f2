"""Load a dataset (from `sources`: the demo, a local file or the hub), map it to triples through an adapter,
validate it and tokenise it once into the columns every stage trains from."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from datasets import Dataset, load_from_disk

from ..errors import SFTKeyError, first_line, show_value
from ..files import discard, folder_marker, set_aside, write_folder
from .adapters import FieldNames, RowRejected, Triple, answer_type_of, check_columns, get_adapter
from .formatting import Formatter, Tags
from .masks import tokenize_rendered
from .sources import load_source

logger = logging.getLogger(__name__)

MAX_CUT_FRACTION = 0.5
ROW_INDEX = "__row_index__"


@dataclass
class InvalidReport:
    """Invalid rows counted by reason, with the first offending row indices of each reason."""

    counts: dict[str, int] = field(default_factory=dict)
    first_rows: dict[str, list[int]] = field(default_factory=dict)

    def add(self, reason: str, index: int) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        rows = self.first_rows.setdefault(reason, [])
        if len(rows) < 5:
            rows.append(index)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def describe(self) -> str:
        return "; ".join(
            f"{reason} x{count} (rows {', '.join(map(str, self.first_rows[reason]))})"
            for reason, count in sorted(self.counts.items(), key=lambda item: -item[1])
        )

    def summary(self, num_rows: int) -> str:
        return f"{self.total} of {num_rows} training rows are invalid: {self.describe()}"


# The fix to name when every training row is rejected for the same reason (otherwise: the adapter and fields)
ALL_INVALID_HINTS = {
    "contains_tags": "the data already carries the response tags: strip them from the reasoning and answers, or "
    "set other tag strings (`thinking_open`, `thinking_close`, `answer_open`, `answer_close`)",
}


def _invalid_rows_error(report: InvalidReport, num_rows: int, on_invalid: str, nothing_left: bool) -> SFTKeyError:
    """The one-line error for invalid rows: with the report, and the fix that applies (`on_invalid: skip` only
    helps when valid rows remain)."""
    if not nothing_left:
        return SFTKeyError(f"{report.summary(num_rows)}; fix the data or set `on_invalid: skip` to drop them")
    reasons = list(report.counts)
    hint = ALL_INVALID_HINTS.get(reasons[0]) if len(reasons) == 1 else None
    hint = hint or "fix the data, or check `dataset_format` and the field names (`question_field`, ...)"
    return SFTKeyError(f"{report.summary(num_rows)}, so no row is left to train on (on_invalid: {on_invalid}); {hint}")


def to_triples(dataset: Dataset, script_args, report: InvalidReport) -> list[tuple[int, Triple]]:
    """Map rows to triples through the recipe's adapter; rejected rows go to `report` by reason."""
    adapter = get_adapter(script_args.dataset_format)
    fields = FieldNames(script_args.question_field, script_args.reasoning_field, script_args.answer_field)
    check_columns(adapter, [c for c in dataset.column_names if c != ROW_INDEX], fields)
    triples = []
    for position, row in enumerate(dataset):
        index = row.get(ROW_INDEX, position)
        try:
            triples.append((index, adapter.convert(row, fields)))
        except RowRejected as rejection:
            report.add(rejection.reason, index)
    return triples


@dataclass
class PreparedData:
    """Everything the stages and the evaluation need, built once per run."""

    train: Dataset  # input_ids, completion_mask, key_mask, index
    eval_examples: list[dict]  # index, question, prompt, gold, reasoning
    answer_type: str
    data_hash: str
    report: InvalidReport
    validation_examples: list[dict]  # for keep_best: the eval_fraction hold-out, else the evaluation examples


def _contains_tags(triple: Triple, tags: Tags) -> bool:
    text = triple.reasoning + triple.answer
    return any(tag in text for tag in (tags.thinking_open, tags.thinking_close, tags.answer_open, tags.answer_close))


def load_splits(script_args, seed: int) -> tuple[Dataset, Dataset | None, Dataset | None]:
    """Training, validation and evaluation rows: `eval_fraction` holds out part of train for validation (to pick
    checkpoints); evaluation is `eval_dataset_name`/`eval_split` when given, else that hold-out."""
    adapter = get_adapter(script_args.dataset_format)
    name = script_args.dataset_name or adapter.hub_id
    config = script_args.dataset_config or (adapter.hub_config if name == adapter.hub_id else None)
    train = load_source(name, config, script_args.dataset_split or adapter.train_split)
    evaluation = holdout = None
    if script_args.eval_dataset_name:
        split = script_args.eval_split or adapter.test_split or "test"
        evaluation = load_source(
            script_args.eval_dataset_name, script_args.eval_dataset_config, split, "eval_dataset_name"
        )
    elif script_args.eval_split:
        evaluation = load_source(name, config, script_args.eval_split, "eval_split")
    if script_args.eval_fraction > 0:
        train = train.add_column(ROW_INDEX, list(range(len(train))))  # errors keep naming the file's rows
        try:
            parts = train.train_test_split(test_size=script_args.eval_fraction, seed=seed)
        except ValueError:
            raise SFTKeyError(
                f"`eval_fraction: {script_args.eval_fraction}` of {len(train)} training rows leaves no rows on one "
                "side; use more data or set `eval_fraction: 0` and an `eval_dataset_name`"
            ) from None
        train, holdout = parts["train"], parts["test"]
    train = _head(train, script_args.max_train_samples)
    evaluation = _head(holdout if evaluation is None else evaluation, script_args.max_eval_samples)
    return train, _head(holdout, script_args.max_eval_samples), evaluation


def _head(rows: Dataset | None, limit: int | None) -> Dataset | None:
    return rows.select(range(min(limit, len(rows)))) if rows is not None and limit else rows


@dataclass
class CheckedRows:
    """The training rows after every row check (`check_training_rows`)."""

    tokenized: (
        Dataset | None
    )  # input_ids, completion_mask, key_mask, index of the rows that passed (None: not tokenised)
    data_hash: str | None
    report: InvalidReport
    notes: list[str]  # what a real run warns about: the length notes
    kept: int  # rows that passed the checks that ran


def check_training_rows(
    train_rows: Dataset, script_args, training_args, stages, tokenizer, formatter: Formatter | None, cache_dir=None
) -> CheckedRows:
    """Every check a training row must pass, in this order: the adapter's, no response tag already in the data
    (`contains_tags`), then with a tokenizer (`formatter`; None: only the first two) no character it cannot encode,
    `max_length` not cutting the key, and tokens for each stage to train on. Failing rows are counted by reason; with
    `on_invalid: error`, or nothing left, the run stops with one line. The real run (`prepare_data`) and `--dry_run`
    (`checks.check_local_data`) both call this, so they refuse the same rows with the same line."""
    report = InvalidReport()
    triples = to_triples(train_rows, script_args, report)
    if script_args.response_format == "tags":
        tags = Tags(
            script_args.thinking_open, script_args.thinking_close, script_args.answer_open, script_args.answer_close
        )
        kept = []
        for index, triple in triples:
            if _contains_tags(triple, tags):
                report.add("contains_tags", index)
            else:
                kept.append((index, triple))
        triples = kept
    if not triples:  # every row was rejected: nothing to tokenise
        raise _invalid_rows_error(report, len(train_rows), script_args.on_invalid, nothing_left=True)
    if formatter is None:
        if report.total and script_args.on_invalid == "error":
            raise _invalid_rows_error(report, len(train_rows), script_args.on_invalid, nothing_left=False)
        return CheckedRows(None, None, report, [], len(triples))
    _check_format_characters(script_args, formatter, tokenizer)
    rendered = [formatter.render(triple) for _, triple in triples]
    digest = hashlib.sha256()
    digest.update(f"max_length={training_args.max_length}".encode())
    digest.update(str(len(tokenizer)).encode() + str(tokenizer.name_or_path).encode())
    for item in rendered:
        digest.update(json.dumps([item.text, item.prompt_end, item.key_start, item.completion_end]).encode())
    data_hash = digest.hexdigest()[:16]
    cached = cache_dir / f"tokenized-{data_hash}" if cache_dir else None
    tokenized = _load_cached(cached, len(rendered)) if cached is not None and cached.exists() else None
    if tokenized is None:
        columns = tokenize_rendered(tokenizer, rendered)
        columns["index"] = [index for index, _ in triples]
        tokenized = Dataset.from_dict(columns)
    num_tokenized = len(tokenized)
    lengths = [len(ids) for ids in tokenized["input_ids"]]
    responses = [sum(mask) for mask in tokenized["completion_mask"]]
    notes = length_notes(lengths, responses, training_args.max_length, script_args.max_new_tokens)
    tokenized = _drop_unknown_tokens(tokenized, [item.text for item in rendered], tokenizer, report)
    tokenized = _validate_lengths(tokenized, training_args.max_length, stages, report, len(train_rows))
    if report.total and (script_args.on_invalid == "error" or len(tokenized) == 0):
        raise _invalid_rows_error(report, len(train_rows), script_args.on_invalid, len(tokenized) == 0)
    if cached is not None and not cached.exists():  # only valid data is cached; temp name then rename
        full = tokenized if len(tokenized) == num_tokenized else Dataset.from_dict(columns)
        with write_folder(cached, kind="cache") as tmp:
            full.save_to_disk(str(tmp))
    return CheckedRows(tokenized, data_hash, report, notes, len(tokenized))


def prepare_data(script_args, training_args, stages, tokenizer, formatter: Formatter, cache_dir: Path | None):
    """Validate and tokenise the training data once (cached under `cache_dir`; `check_training_rows`) and build the
    evaluation prompts. Invalid rows are counted by reason: `on_invalid: error` stops before training, `skip` drops
    them."""
    train_rows, validation_rows, eval_rows = load_splits(script_args, training_args.seed)
    checked = check_training_rows(train_rows, script_args, training_args, stages, tokenizer, formatter, cache_dir)
    for note in checked.notes:
        logger.warning("note: %s", note)
    report, tokenized = checked.report, checked.tokenized
    if report.total:
        logger.warning("%s; skipped (on_invalid: skip)", report.summary(len(train_rows)))
    if len(tokenized) == 0:  # a guard: empty files are refused when loaded, all-invalid data above
        raise SFTKeyError("no training rows are left; check the dataset and its adapter (`dataset_format`)")
    answer_type = answer_type_of(script_args)
    eval_examples = _eval_examples(eval_rows, script_args, formatter) if eval_rows is not None else []
    validation = _eval_examples(validation_rows, script_args, formatter) if validation_rows is not None else None
    return PreparedData(tokenized, eval_examples, answer_type, checked.data_hash, report, validation or eval_examples)


def _load_cached(cached: Path, rows: int) -> Dataset | None:
    """The tokenised data cached under `cached`, or None when that folder cannot be read or does not hold `rows`
    rows of the mask columns (a damaged cache, or another `datasets` version's): it is removed, to be rebuilt."""
    try:
        tokenized = load_from_disk(str(cached))
        if len(tokenized) == rows and {"input_ids", "completion_mask", "key_mask", "index"} <= set(tokenized.features):
            return tokenized
        problem = f"it holds {len(tokenized)} rows of {sorted(tokenized.features)}"
    except Exception as error:  # `datasets` raises many types for a damaged folder
        problem = first_line(error)
    logger.warning("the tokenized-data cache %s cannot be used (%s): rebuilding it", cached, problem)
    if folder_marker(cached) is not None:
        discard(cached, kinds=["cache"])
    else:  # written before caches carried a marker: renamed, never deleted
        set_aside(cached, "cannot be read as a tokenized-data cache")
    return None


LENGTH_WARN_SHARE = 0.05  # warn when more than this share of rows is cut


def length_notes(lengths: list[int], responses: list[int], max_length: int | None, max_new_tokens: int) -> list[str]:
    """Notes when `max_length` cuts training rows or `max_new_tokens` is below reference responses (in tokens)."""
    notes = []
    if max_length and lengths:
        cut = sum(length > max_length for length in lengths) / len(lengths)
        if cut > LENGTH_WARN_SHARE:
            notes.append(
                f"`max_length: {max_length}` cuts {cut:.0%} of the training rows (the longest has "
                f"{max(lengths)} tokens): they are dropped as invalid; raise `max_length`"
            )
    if responses:
        over = sum(length > max_new_tokens for length in responses) / len(responses)
        if over > LENGTH_WARN_SHARE:
            notes.append(
                f"`max_new_tokens: {max_new_tokens}` is below {over:.0%} of the reference responses (the "
                f"longest has {max(responses)} tokens): generations will be cut off; raise it"
            )
    return notes


def check_usable_rows(rows: int, usable: int, report, dataset_format: str) -> None:
    """Evaluation data that adapts to no usable row stops the run before training (never a silent skip)."""
    if rows and not usable:
        raise SFTKeyError(
            f"evaluation data: none of its {rows} rows is usable by the `{dataset_format}` adapter "
            f"({report.describe()}); set `dataset_format` for that file, or point the evaluation keys at data in "
            "this layout"
        )


def _check_format_characters(script_args, formatter: Formatter, tokenizer) -> None:
    """The text the recipe adds to every row (tags or answer line, system prompt, prompt layout) must be text the
    tokenizer can encode: otherwise every row fails as `unknown_characters`, and the line must name the key."""
    unk_id = tokenizer.unk_token_id
    if unk_id is None:
        return
    keys = ["thinking_open", "thinking_close", "answer_open", "answer_close"]
    keys = keys if script_args.response_format == "tags" else ["answer_template"]
    keys += ["system_prompt"] + ([] if formatter.use_chat_template else ["prompt_template"])
    for key in keys:
        text = getattr(script_args, key) or ""
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if ids.count(unk_id) > text.count(tokenizer.unk_token or "\0"):
            raise SFTKeyError(
                f"`{key}: {show_value(text)}` has characters the tokenizer cannot encode, so every row would train "
                f"`{tokenizer.unk_token}` in their place; use characters the model's tokenizer knows"
            )


def _drop_unknown_tokens(tokenized: Dataset, texts: list[str], tokenizer, report: InvalidReport) -> Dataset:
    """Drop (and report as `unknown_characters`) rows the tokenizer maps to its unk token: the model would learn
    `<unk>` in place of what the data says. A literal unk token string in the text is not counted."""
    unk_id = tokenizer.unk_token_id
    if unk_id is None:
        return tokenized
    keep = []
    for position, (ids, index) in enumerate(zip(tokenized["input_ids"], tokenized["index"])):
        if ids.count(unk_id) > texts[position].count(tokenizer.unk_token):
            report.add("unknown_characters", index)
        else:
            keep.append(position)
    return tokenized.select(keep) if len(keep) < len(tokenized) else tokenized


def _validate_lengths(tokenized: Dataset, max_length, stages, report: InvalidReport, num_rows: int) -> Dataset:
    """Drop (and report) examples whose key is cut by `max_length` or that leave a stage with nothing to train."""
    lengths = [len(ids) for ids in tokenized["input_ids"]]
    indices = tokenized["index"]
    keep = []
    cut = 0
    completion, key = tokenized["completion_mask"], tokenized["key_mask"]
    for position, (length, index) in enumerate(zip(lengths, indices)):
        if max_length is not None and length > max_length:
            report.add("key_truncated", index)
            cut += 1
            continue
        masks = torch.tensor(completion[position]), torch.tensor(key[position])
        empty = [stage for stage in stages if not stage.loss_weights(*masks).any()]
        if empty:
            report.add(f"no_{empty[0].loss_on}_tokens", index)
            continue
        keep.append(position)
    if lengths and cut / len(lengths) > MAX_CUT_FRACTION:
        raise SFTKeyError(
            f"`max_length: {max_length}` cuts the answer off {cut} of {len(lengths)} examples "
            f"({cut / len(lengths):.0%}; the longest has {max(lengths)} tokens); raise `max_length`"
        )
    return tokenized.select(keep) if len(keep) < len(tokenized) else tokenized


def _eval_examples(rows: Dataset, script_args, formatter: Formatter) -> list[dict]:
    report = InvalidReport()
    examples = [
        {
            "index": index,
            "question": triple.question,
            "prompt": formatter.prompt(triple.question),
            "gold": triple.answer,
            "reasoning": triple.reasoning,
        }
        for index, triple in to_triples(rows, script_args, report)
    ]
    if report.total:
        logger.warning("evaluation set: %d rows skipped: %s", report.total, report.describe())
    check_usable_rows(len(rows), len(examples), report, script_args.dataset_format)
    return examples
