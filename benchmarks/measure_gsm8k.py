"""Measure the data and scoring path on a local GSM8K file: the `gsm8k` adapter (rejections by reason), the
rendering and masks (key-mask token counts) and the scoring of each gold solution as if a model had generated it.
On gold, accuracy and format accuracy must be 1.0; reasoning_final_accuracy and consistency fall short only on
rows whose reasoning does not end at the answer, which are listed with the value the reasoning arrives at.

    python benchmarks/measure_gsm8k.py /path/to/gsm8k/test.jsonl [--tokenizer PATH] [--limit N]

The default tokenizer is the project's tiny character tokenizer (unknown characters become <unk>, which does not
change mask counts); --tokenizer loads any fast tokenizer from a local path.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from datasets import Dataset

from sftkey_trl.data.adapters import get_adapter
from sftkey_trl.data.formatting import Formatter
from sftkey_trl.data.loading import ROW_INDEX, InvalidReport, to_triples
from sftkey_trl.data.masks import tokenize_rendered
from sftkey_trl.errors import SFTKeyError
from sftkey_trl.evaluation.metrics import score
from sftkey_trl.recipe.schema import SFTKeyScriptArguments

METRICS = (
    "accuracy",
    "format_accuracy",
    "strict_accuracy",
    "reasoning_final_accuracy",
    "answer_reasoning_consistency",
)


def read_jsonl(path: str | Path, limit: int | None = None) -> list[dict]:
    """The rows of a JSONL file (at most `limit`), each with its 0-based line number under `ROW_INDEX`."""
    rows = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle):
            if limit is not None and len(rows) >= limit:
                break
            if line.strip():
                try:
                    rows.append({**json.loads(line), ROW_INDEX: number})
                except json.JSONDecodeError as error:
                    message = f"`{path}` line {number + 1} is not JSON ({error.msg}); fix or drop that line"
                    raise SFTKeyError(message) from None
    return rows


def load_tokenizer(path: str | None):
    """The tokenizer at `path`, or the project's tiny character tokenizer."""
    if path is None:
        from sftkey_trl.models.tiny import build_tiny_tokenizer

        return build_tiny_tokenizer()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def measure(path: str | Path, tokenizer=None, limit: int | None = None) -> dict:
    """Run adapter, rendering, masks and gold-as-prediction scoring over the GSM8K file at `path`."""
    rows = read_jsonl(path, limit)
    if not rows:
        raise SFTKeyError(f"`{path}` has no rows; point the script at a GSM8K .jsonl file")
    script_args = SFTKeyScriptArguments(dataset_format="gsm8k")
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(None)
    formatter = Formatter(tokenizer, script_args)
    report = InvalidReport()
    triples = to_triples(Dataset.from_list(rows), script_args, report)
    if not triples:
        raise SFTKeyError(f"every row of `{path}` was rejected ({report.describe()}); is it a GSM8K file?")
    columns = tokenize_rendered(tokenizer, [formatter.render(triple) for _, triple in triples])
    key_tokens = [sum(mask) for mask in columns["key_mask"]]
    completion_tokens = [sum(mask) for mask in columns["completion_mask"]]
    examples = [
        {"index": index, "prompt": formatter.prompt(triple.question), "gold": triple.answer}
        for index, triple in triples
    ]
    generations = [(formatter.response(triple)[0], 0) for _, triple in triples]
    metrics, predictions = score(examples, generations, get_adapter("gsm8k").answer_type, script_args, formatter.tags)
    return {
        "rows": len(rows),
        "converted": len(triples),
        "rejections": dict(report.counts),
        "key_mask_tokens": _spread(key_tokens),
        "completion_mask_tokens": _spread(completion_tokens),
        "metrics": {name: metrics[name] for name in METRICS},
        "inconsistent": [
            {"index": p["index"], "reasoning_final": p["reasoning_final"], "answer": p["gold"]}
            for p in predictions
            if not (p["consistent"] and p["reasoning_final_correct"])
        ],
    }


def _spread(values: list[int]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def format_report(result: dict) -> str:
    """The measurement as printable lines."""
    rejections = ", ".join(f"{reason}: {count}" for reason, count in sorted(result["rejections"].items())) or "none"
    lines = [
        f"rows: {result['rows']}  converted: {result['converted']}  rejected: {rejections}",
        "key mask tokens (min/median/max): {min}/{median}/{max}".format(**result["key_mask_tokens"]),
        "completion mask tokens (min/median/max): {min}/{median}/{max}".format(**result["completion_mask_tokens"]),
    ]
    lines += [f"{name}: {value:.4f}" for name, value in result["metrics"].items()]
    inconsistent = result["inconsistent"]
    lines.append(f"inconsistent rows ({len(inconsistent)}): {', '.join(str(r['index']) for r in inconsistent)}")
    lines += [
        f"  row {r['index']}: the reasoning ends at {r['reasoning_final']}, the answer is {r['answer']}"
        for r in inconsistent
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", help="A GSM8K .jsonl file (question, answer ending in `#### N`).")
    parser.add_argument("--tokenizer", default=None, help="A local tokenizer folder (default: the tiny char one).")
    parser.add_argument("--limit", type=int, default=None, help="Read at most this many rows.")
    args = parser.parse_args(argv)
    try:
        result = measure(args.path, load_tokenizer(args.tokenizer), args.limit)
    except (SFTKeyError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(format_report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
