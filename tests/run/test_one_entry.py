"""A new stage objective and a new reported metric are one entry each: registered here (in the test only), they
show in `--inspect`, `--dry_run`, the results tables, the comparison table and the model card with no other
change."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import yaml
from rich.console import Console

from sftkey_trl.data.formatting import Tags
from sftkey_trl.evaluation import metrics
from sftkey_trl.files import write_json
from sftkey_trl.recipe.parsing import parse_config
from sftkey_trl.run import cli
from sftkey_trl.run.card import model_card
from sftkey_trl.run.compare import write_comparison
from sftkey_trl.run.plan import Manifest, resolved_config
from sftkey_trl.run.report import print_results, results_markdown
from sftkey_trl.run.variants import build_variants
from sftkey_trl.train import objectives

DEMO = "recipes/demo/sftkey_tiny.yaml"
STAGES = "[{name: sft, loss_on: completion}, {name: key, loss_on: key}, {name: reason, loss_on: reasoning}]"
REASONING = objectives.Objective(
    name="reasoning",
    description="the reasoning tokens only, the answer left out",
    summary="the reasoning tokens only",
    options=("loss_normalization",),
    weights=lambda completion, key, stage: (completion & ~key).float(),
)
ANSWER_LENGTH = metrics.Metric(
    "mean_answer_length", "answer length (characters)", "mean extracted answer length in characters",
    lambda row: float(len(row["extracted_answer"] or "")), reported=True, higher_is_better=None,
)  # fmt: skip


@pytest.fixture(autouse=True)
def registered(monkeypatch):
    """The two entries, each in its own registry and nowhere else."""
    monkeypatch.setitem(objectives.OBJECTIVES, "reasoning", REASONING)
    monkeypatch.setattr(metrics, "METRICS", [*metrics.METRICS, ANSWER_LENGTH])


def scored(answers: list[str]) -> dict:
    """The metrics of fabricated generations, scored by `evaluation/metrics.py` as an evaluation would."""
    script_args = parse_config(["--config", DEMO]).script
    examples = [{"index": i, "prompt": "Compute 2 + 3.", "gold": "5", "reasoning": "2 + 3 = 5"} for i in range(4)]
    texts = [(f"<Thinking>2 + 3 = 5</Thinking>\n<Answer>{answer}</Answer>", 12) for answer in answers]
    return metrics.score(examples, texts, "numeric", script_args, Tags())[0]


@pytest.mark.slow
def test_inspect_and_dry_run_show_the_new_objective(capsys):
    assert cli.main(["--config", DEMO, "--stages", STAGES, "--inspect", "1", "--json"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    reason = next(record for record in records if record["stage"] == "reason")
    assert "<Answer>" in reason["text"] and "2" in reason["supervised_text"]  # the reasoning's arithmetic
    assert "<Answer>" not in reason["supervised_text"] and reason["weights"] == [1.0]
    assert cli.main(["--config", DEMO, "--stages", STAGES, "--inspect", "1"]) == 0
    assert f"trains on ([[marked]]): {REASONING.description}" in capsys.readouterr().out  # not a terminal
    assert cli.main(["--config", DEMO, "--stages", STAGES, "--dry_run"]) == 0
    stages = yaml.safe_load(capsys.readouterr().out)["stages"]
    assert stages[2]["loss_on"] == "reasoning" and stages[2]["trains_on"] == REASONING.description


def test_results_comparison_and_card_show_the_new_metric_and_objective(tmp_path):
    out = tmp_path / "run"
    recipe = parse_config(["--config", DEMO, "--stages", STAGES, "--output_dir", str(out)])
    answers = {"sft": ["5", "5", "6", "five"], "key": ["5", "5", "5", "5"], "reason": ["5", "12345", "5", "5"]}
    results = {"stages": {name: {**scored(answers[name]), "loss_on": name} for name in answers}}
    assert results["stages"]["reason"]["mean_answer_length"] == 2.0  # (1 + 5 + 1 + 1) / 4

    console = Console(width=80, file=io.StringIO(), record=True)
    print_results(results, out, console)
    assert "answer length (characters)" in console.export_text()
    rows = results_markdown(results).splitlines()
    assert rows[2].endswith("| generated tokens (mean) | answer length (characters) | examples |")
    assert rows[4].endswith("| 1.750 | 4 |")  # sft: (1 + 1 + 1 + 4) / 4

    variants = build_variants(recipe)
    per_seed = {"recipe": {0: results["stages"]["reason"]}, "sftkey_tag": {0: results["stages"]["key"]}}
    write_comparison(out / "compare", per_seed, variants, [0], "accuracy")
    comparison = (out / "compare" / "comparison.md").read_text()
    assert "| generated tokens (mean) | answer length (characters) | steps |" in comparison
    recipe_row = next(line for line in comparison.splitlines() if line.startswith("| recipe |"))
    assert "| 2.000 |" in recipe_row and "then the reasoning tokens only [" in recipe_row  # one seed: no interval
    difference = comparison.split("sftkey_tag minus each variant")[1].splitlines()[4]
    assert difference.startswith("| recipe |") and difference.endswith("| -1.000 [-4.182, +2.182] |")  # per example

    manifest = Manifest(out)
    for stage in recipe.stages:
        manifest.update(stage.name, config=resolved_config(recipe, recipe.training, stage, "-", None, 1))
    write_json(out / "results.json", results)
    card = model_card(Path(out / "reason"), "reason", "full", "me/sftkey-reason", recipe).text
    assert "| reason | the reasoning tokens only |" in card and "| key | the final-answer (key) tokens only |" in card
    assert "| answer length (characters) | 1.750 | 1.000 | 2.000 |" in card
    assert "answer length (characters)" in card.split("### Comparison of the variants")[1]  # the card's comparison
