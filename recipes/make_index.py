"""Regenerate the recipe index and the memory calibration table in recipes/README.md.

    python recipes/make_index.py           # rewrite the generated parts of recipes/README.md
    python recipes/make_index.py --check   # exit 1 when the README is out of date (a test runs this check)

Every figure in the memory column is an ESTIMATE from `sftkey_trl/train/memory.py`, not a measurement.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from sftkey_trl.recipe.dryrun import LAUNCH_PREFIX, header_value, launch_processes  # noqa: E402
from sftkey_trl.recipe.parsing import parse_config  # noqa: E402
from sftkey_trl.train.memory import (  # noqa: E402
    MEASURED_LORA_R,
    MEASURED_SEQ_LEN,
    calibration,
    estimate_for_recipe,
    training_method,
)

README = ROOT / "recipes" / "README.md"
BLOCKS = {
    "index": ("<!-- recipe-index:start -->", "<!-- recipe-index:end -->"),
    "calibration": ("<!-- memory-calibration:start -->", "<!-- memory-calibration:end -->"),
}
METHOD_NAMES = {"qlora": "QLoRA (nf4)", "lora": "LoRA (bf16)", "full": "full (bf16)"}


def recipe_paths(root: Path = ROOT) -> list[Path]:
    """Every recipe under recipes/ except the offline demo, sorted."""
    recipes = root / "recipes"
    return sorted(path for path in recipes.rglob("*.yaml") if "demo" not in path.relative_to(recipes).parts)


def gpu_count(path: Path) -> int:
    """The process count of the accelerate config named on the recipe's launch line (1 when it names none)."""
    return launch_processes(path)[-1]


def recipe_row(path: Path, root: Path = ROOT) -> dict:
    """What the index shows for one recipe."""
    recipe = parse_config(["--config", str(path)])
    training_args, model_args = recipe.training, recipe.model
    method = training_method(model_args)
    gpus = gpu_count(path)
    estimate = estimate_for_recipe(model_args, training_args, gpus)
    relative = path.relative_to(root / "recipes")
    return {
        "path": str(path.relative_to(root)),
        "link": str(relative),
        "model": model_args.model_name_or_path,
        "dataset": relative.parts[1],
        "method": METHOD_NAMES[method],
        "gpus": gpus,
        "batch": f"{training_args.per_device_train_batch_size} x {training_args.max_length}",
        "memory": "n/a" if estimate is None else f"~{estimate:.1f} GiB (estimated)",
        "launch": header_value(path, LAUNCH_PREFIX) or "",
    }


def render_index(root: Path = ROOT) -> str:
    lines = [
        "| Model | Dataset | Method | GPUs | Batch per GPU x max_length | GPU memory per GPU | Recipe and launch |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for path in recipe_paths(root):
        row = recipe_row(path, root)
        lines.append(
            f"| {row['model']} | {row['dataset']} | {row['method']} | {row['gpus']} | {row['batch']} | "
            f"{row['memory']} | [{row['link']}]({row['link']}): `{row['launch']}` |"
        )
    return "\n".join(lines)


def render_calibration() -> str:
    lines = [
        f"| Run (H200, LoRA r={MEASURED_LORA_R} all-linear, checkpointing, seq {MEASURED_SEQ_LEN}) "
        "| Measured peak | Formula | Difference |",
        "| --- | --- | --- | --- |",
    ]
    for model, method, batch, measured, estimate in calibration():
        lines.append(
            f"| {model.split('/')[-1]} {METHOD_NAMES[method]}, batch {batch} | {measured:.2f} GiB | "
            f"{estimate:.2f} GiB | {(estimate - measured) / measured:+.1%} |"
        )
    return "\n".join(lines)


def render_readme(text: str, root: Path = ROOT) -> str:
    """`text` with each generated block replaced by its current content."""
    contents = {"index": render_index(root), "calibration": render_calibration()}
    for name, (start, end) in BLOCKS.items():
        head, found, rest = text.partition(start)
        _, found_end, tail = rest.partition(end)
        if not (found and found_end):
            raise SystemExit(f"{README} lacks the markers {start} ... {end}")
        text = f"{head}{start}\n{contents[name]}\n{end}{tail}"
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="Only check that the README is up to date.")
    args = parser.parse_args(argv)
    current = README.read_text()
    updated = render_readme(current)
    if args.check:
        if updated != current:
            print(f"{README.relative_to(ROOT)} is out of date: run python recipes/make_index.py", file=sys.stderr)
            return 1
        print(f"{README.relative_to(ROOT)} is up to date")
        return 0
    README.write_text(updated)
    print(f"wrote {README.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
