"""The comparison runner: statistics on known inputs, the variant definitions, and a tiny end-to-end run."""

from __future__ import annotations

import json
import statistics
import sys

import pytest
from conftest import ROOT
from trl import ModelConfig

from sftkey_trl.evaluation.intervals import mean_ci
from sftkey_trl.recipe.schema import Recipe, SFTKeyConfig, SFTKeyScriptArguments
from sftkey_trl.run.compare import markdown, summarise_variants
from sftkey_trl.run.variants import MATCHED, PAPER, build_variants, planned_steps
from sftkey_trl.train.objectives import Stage


def test_mean_ci_on_known_values():
    mean, half = mean_ci([0.5, 0.6, 0.7])  # sd 0.1, n 3, t(2) = 4.303
    assert mean == pytest.approx(0.6) and half == pytest.approx(4.303 * 0.1 / 3**0.5, rel=1e-4)
    assert mean_ci([0.4]) == (0.4, None)  # one seed: no interval, not a zero-width one
    assert mean_ci([0.3, 0.3, 0.3])[1] == 0.0


def test_paired_differences_use_the_same_seed():
    per_seed = {
        "sftkey_tag": {0: {"accuracy": 0.60}, 1: {"accuracy": 0.70}, 2: {"accuracy": 0.80}},
        "sft_tag": {0: {"accuracy": 0.50}, 1: {"accuracy": 0.60}, 2: {"accuracy": 0.70}},
    }
    summary = summarise_variants(per_seed)
    difference = summary["differences"]["sft_tag"]["accuracy"]
    # Unpaired, the means differ by 0.1 with a wide interval; paired, every seed differs by exactly 0.1
    assert difference["mean"] == pytest.approx(0.1) and difference["ci95"] == pytest.approx(0.0, abs=1e-12)
    assert summary["variants"]["sft_tag"]["accuracy"]["ci95"] > 0.2
    table = markdown(summary, {}, [0, 1, 2])
    assert "| sft_tag | +0.100 (no example interval) ± 0.000* |" in table  # no per-example values kept


def training_args(**values) -> SFTKeyConfig:
    return SFTKeyConfig(output_dir="unused", report_to="none", use_cpu=True, **values)


def recipe(stages: list[Stage], args: SFTKeyConfig | None = None) -> Recipe:
    """A recipe with these stages and training arguments (default: `training_args()`), all else at its default."""
    return Recipe(SFTKeyScriptArguments(), args or training_args(), ModelConfig(), stages)


def test_mean_ci_uses_the_exact_t_quantile_for_any_number_of_seeds():
    for n, t in ((2, 12.7062), (5, 2.7764), (11, 2.2281), (13, 2.1788), (40, 2.0227)):
        values = [0.0, 1.0] + [0.5] * (n - 2)
        sd = statistics.stdev(values)
        assert mean_ci(values)[1] == pytest.approx(t * sd / n**0.5, rel=1e-4)


def test_variants_follow_the_recipe_stages():
    stages = [Stage(name="sft", loss_on="completion", overrides={"num_train_epochs": 3, "learning_rate": 1e-3}),
              Stage(name="key", loss_on="key", keep_best=True, reasoning_weight=0.2,
                    overrides={"num_train_epochs": 1, "learning_rate": 1e-4})]  # fmt: skip
    variants = build_variants(recipe(stages))
    paper = variants[PAPER].stages[1]
    # the paper's key stage as described: key loss only, hard mask, no keep_best, the recipe's stage-2 rate
    assert (paper.loss_on, paper.reasoning_weight, paper.keep_best) == ("key", 0.0, False)
    assert paper.overrides["learning_rate"] == 1e-4 and "no keep_best" in variants[PAPER].description
    assert variants["recipe"].stages[1].keep_best and variants["recipe"].stages[1].reasoning_weight == 0.2
    assert [s.name for s in variants[PAPER].stages] == ["sft", "key"]
    assert variants[PAPER].folder == variants["sft_tag"].folder == variants["sft_continue"].folder  # one stage 1
    continued = variants["sft_continue"].stages[1]
    assert continued.loss_on == "completion" and continued.overrides == paper.overrides  # same steps and schedule
    assert variants[MATCHED].match_steps_of == variants[PAPER].stages
    assert variants["sft"].response_format == "plain" and variants["key_tag"].stages[0].loss_on == "key"
    assert variants["sftkey_tag_norm"].stages[1].loss_normalization == "completion_tokens"
    assert variants["sftkey_tag_mix"].stages[1].reasoning_weight == 0.1
    assert variants["sftkey_tag_best"].stages[1].keep_best
    assert variants["sftkey_tag_dft"].stages[1].overrides["loss_type"] == "dft"
    assert variants["sftkey_tag_stage1_lr"].stages[1].overrides["learning_rate"] == 1e-3
    assert variants["sftkey_tag_detached"].stages[1].context == "detached"
    assert variants[PAPER].stages[1].context == "full"


def test_a_recipe_whose_stage_1_converges_gives_every_arm_that_stage_1():
    stages = [Stage(name="sft", loss_on="completion", keep_best=True, patience=4, overrides={"num_train_epochs": 30}),
              Stage(name="key", loss_on="key")]  # fmt: skip
    variants = build_variants(recipe(stages))
    for name in ("sft_tag", PAPER, "sft_continue", "sft_keyweight"):
        first = variants[name].stages[0]
        assert (first.keep_best, first.patience, first.overrides["num_train_epochs"]) == (True, 4, 30), name
    assert "to convergence: patience 4, at most 30 ep" in variants[PAPER].description
    assert not variants[PAPER].stages[1].keep_best and not variants[MATCHED].stages[0].keep_best


def test_the_docs_and_help_name_every_arm():
    """docs/compare.md's variant table and `--help`'s list (`VARIANT_NAMES`, read without a recipe) name exactly the
    arms `build_variants` builds."""
    from sftkey_trl.run.variants import VARIANT_NAMES

    page = (ROOT / "docs/compare.md").read_text()
    stages = [Stage(name="sft", loss_on="completion"), Stage(name="key", loss_on="key")]
    arms = list(build_variants(recipe(stages)))
    missing = [name for name in arms if f"| `{name}` |" not in page]
    assert not missing, f"docs/compare.md's variant table lacks {missing}"
    assert list(VARIANT_NAMES) == arms


def test_converged_protocol_trains_stage_1_to_convergence_in_every_arm_that_has_it():
    stages = [Stage(name="sft", loss_on="completion"), Stage(name="key", loss_on="key")]
    variants = build_variants(recipe(stages), converge=(2, 12))
    for name in ("sft_tag", PAPER, "sft_continue", "sftkey_tag_mix"):
        first = variants[name].stages[0]
        assert (first.keep_best, first.patience, first.overrides["num_train_epochs"]) == (True, 2, 12), name
    assert not variants[PAPER].stages[1].keep_best and variants[PAPER].stages[1].patience is None
    assert not variants[MATCHED].stages[0].keep_best  # one plain run with the paper arm's recorded steps


def test_matched_baseline_takes_the_paper_arms_steps_with_only_top_level_epochs():
    """A recipe with `num_train_epochs: 1` at the top level and none per stage: 1 + 1 epochs, never a fallback."""
    args = training_args(num_train_epochs=1, per_device_train_batch_size=4, gradient_accumulation_steps=2)
    stages = [Stage(name="sft", loss_on="completion"), Stage(name="key", loss_on="key")]
    variants = build_variants(recipe(stages, args))
    rows = 100  # 25 batches of 4 -> 13 optimizer steps per epoch (the last one accumulates a single batch)
    assert planned_steps(variants[PAPER].stages, args, rows, 1) == 2 * 13
    assert planned_steps(variants[MATCHED].match_steps_of, args, rows, 1) == 26
    assert planned_steps(variants["sft_continue"].stages[1:], args, rows, 1) == 13
    with_batch = training_args(num_train_epochs=2, per_device_train_batch_size=4, global_batch_size=16)
    assert planned_steps(variants[PAPER].stages, with_batch, rows, 2) == 2 * 2 * 7  # 100 rows / 16 per step


def test_a_baseline_with_other_steps_is_not_labelled_matched():
    per_seed = {
        PAPER: {0: {"accuracy": 0.5, "optimizer_steps": 26}},
        MATCHED: {0: {"accuracy": 0.6, "optimizer_steps": 30}},
    }
    summary = summarise_variants(per_seed)
    assert not summary["matched"]["ok"]
    assert "NOT compute-matched" in markdown(summary, {}, [0])
    per_seed[MATCHED][0]["optimizer_steps"] = 26
    summary = summarise_variants(per_seed)
    assert summary["matched"]["ok"] and "the compute-matched baseline" in markdown(summary, {}, [0])


@pytest.mark.e2e
def test_compare_end_to_end_on_a_tiny_setting(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "recipes"))
    from compare import main

    out = tmp_path / "cmp"
    args = [
        "--variants",
        "sft_tag_matched,sft_tag,sftkey_tag,sft_continue",
        "--seeds",
        "2",
        "--output_dir",
        str(tmp_path / "o"),
        "--comparison_dir",
        str(out),
        "--max_train_samples",
        "64",
        "--max_eval_samples",
        "16",
        "--max_new_tokens",
        "40",
        "--stages",
        "[{name: sft, loss_on: completion, num_train_epochs: 1}, {name: key, loss_on: key, num_train_epochs: 1}]",
    ]
    assert main(args) == 0
    summary = json.loads((out / "comparison.json").read_text())
    assert set(summary["variants"]) == {"sft_tag", "sftkey_tag", "sft_tag_matched", "sft_continue"}
    assert summary["seeds"] == [0, 1] and len(summary["variants"]["sftkey_tag"]["accuracy"]["values"]) == 2
    assert set(summary["differences"]) == {"sft_tag", "sft_tag_matched", "sft_continue"}
    assert summary["matched"]["ok"], summary["matched"]  # the matched arm ran after the paper arm, same steps
    steps = summary["per_seed"]
    assert steps["sft_continue"]["0"]["optimizer_steps"] == steps["sftkey_tag"]["0"]["optimizer_steps"]
    assert (out / "comparison.png").stat().st_size > 1000
    assert "Paired difference" in (out / "comparison.md").read_text()
    # sftkey_tag reused sft_tag's stage 1 (same folder, skipped by the manifest)
    manifest = json.loads((out / "seed0" / "tags" / "manifest.json").read_text())
    assert set(manifest["stages"]) == {"sft", "key", "continue"}


@pytest.mark.slow
def test_a_rerun_carries_only_earlier_arms_with_the_same_configuration_and_seeds(tmp_path, monkeypatch):
    """Arms measured earlier in the comparison folder stay in the table only when they were measured as this run
    would measure them: the same recipe and arm definition, and every seed of this run (kept to those seeds)."""
    sys.path.insert(0, str(ROOT / "recipes"))
    from compare import main

    def fake_run(variant, seed, recipe, root, steps_to_match=None) -> dict:
        return {"accuracy": 0.5 + 0.1 * seed, "optimizer_steps": 4, "train_tokens": 10}

    monkeypatch.setattr("sftkey_trl.run.variants.run_variant", fake_run)
    out = tmp_path / "cmp"
    common = ["--comparison_dir", str(out), "--output_dir", str(tmp_path / "o")]

    def compare(*args: str) -> dict:
        assert main([*common, *args]) == 0
        return json.loads((out / "comparison.json").read_text())

    compare("--variants", "sft_tag,sftkey_tag", "--seeds", "3")
    summary = compare("--variants", "sft_continue", "--seeds", "2")  # same recipe, seeds 0-1 of 0-2: carried
    assert set(summary["per_seed"]) == {"sft_tag", "sftkey_tag", "sft_continue"}
    assert set(summary["per_seed"]["sft_tag"]) == {"0", "1"} and summary["seeds"] == [0, 1]
    summary = compare("--variants", "sft_continue", "--seeds", "3")  # sft_tag has seeds 0-1 only now: left out
    assert set(summary["per_seed"]) == {"sft_continue"}
    compare("--variants", "sft_tag", "--seeds", "2")
    summary = compare("--variants", "sftkey_tag", "--seeds", "2", "--learning_rate", "3e-3")  # another recipe
    assert set(summary["per_seed"]) == {"sftkey_tag"}


def test_a_key_weight_sweep_is_one_arm_per_weight_beside_sft_keyweight():
    from sftkey_trl.run.variants import swept_key_weights

    names = ["sft_continue", "sft_keyweight_2", "sft_keyweight_10", "sft_keyweight_2.5", "sft_keyweight_x"]
    weights = swept_key_weights(names)
    assert weights == [2.0, 10.0, 2.5]
    stages = [Stage(name="sft", loss_on="completion", keep_best=True, patience=4), Stage(name="key", loss_on="key")]
    variants = build_variants(recipe(stages), key_weights=weights)
    for weight, name in zip(weights, ("sft_keyweight_2", "sft_keyweight_10", "sft_keyweight_2.5")):
        (stage,) = variants[name].stages
        assert stage.key_weight == weight and stage.patience == 4 and stage.loss_on == "completion"
        assert variants[name].folder not in {v.folder for n, v in variants.items() if n != name}  # its own runs
    assert variants["sft_keyweight"].stages[0].key_weight == 5.0 and "sft_keyweight_x" not in variants


@pytest.mark.parametrize("flags", [["--dry_run"], ["--inspect", "2"], ["--eval_only"], ["--merge", "sft"]])
def test_compare_refuses_run_py_flags_instead_of_training(flags, tmp_path, capsys):
    """run.py's own flags (`--dry_run`, `--inspect`, ...) would be parsed and dropped by compare.py, which would then
    train every arm: each is refused in one line before anything is loaded."""
    from sftkey_trl.run.comparison import run_comparison as main

    with pytest.raises(SystemExit) as exit_:
        main([*flags, "--output_dir", str(tmp_path / "o")])
    error = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and not (tmp_path / "o").exists()
    assert error == f"error: `{flags[0]}` is a flag of recipes/run.py, not compare.py; use recipes/run.py for it"


@pytest.mark.parametrize("token", ["hf_test", None])
def test_compare_refuses_push_to_hub_before_training(tmp_path, monkeypatch, capsys, token):
    """compare.py pushes nothing: `push_to_hub` is refused in one line, whether or not a token would let run.py push
    (without one, the token error must not come first: no token would make compare.py push)."""
    import huggingface_hub

    from sftkey_trl.run.comparison import run_comparison as main

    monkeypatch.setattr(huggingface_hub, "get_token", lambda: token)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(SystemExit) as exit_:
        main(["--push_to_hub", "true", "--output_dir", str(tmp_path / "o")])
    error = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and not (tmp_path / "o").exists()
    assert error == "error: compare.py trains many variants and pushes none; remove `push_to_hub` (run.py pushes)"


def arm_run(correct: list[int], steps: int = 8) -> dict:
    """One arm's results for one seed as `run_variant` records them: metrics, compute and per-example values."""
    n = len(correct)
    values = {"accuracy": [float(c) for c in correct], "format_accuracy": [1.0] * n}
    values["composite"] = [0.7 * a + 0.3 for a in values["accuracy"]]
    metrics = {name: sum(found) / n for name, found in values.items()}
    return {**metrics, "num_examples": n, "optimizer_steps": steps, "train_tokens": 1000,
            "per_example": {"index": list(range(n)), **values}}  # fmt: skip


# A user's one-seed comparison on 8 test examples: the paper's arm 2 examples behind the continuation baseline
ONE_SEED = {
    PAPER: {0: arm_run([1, 1, 0, 0, 0, 1, 0, 0], 12)},
    "sft_continue": {0: arm_run([1, 1, 1, 1, 0, 1, 0, 0], 12)},
    "sft_tag": {0: arm_run([1, 0, 0, 0, 0, 1, 0, 0])},
}
TWO_STAGES = [Stage(name="sft", loss_on="completion"), Stage(name="key", loss_on="key")]


def render(summary: dict, written: list, width: int = 100) -> str:
    import io

    from rich.console import Console

    from sftkey_trl.run.compare import print_comparison

    console = Console(width=width, file=io.StringIO(), record=True)
    print_comparison(summary, written, console)
    return console.export_text()


@pytest.mark.slow
def test_a_one_seed_comparison_gives_intervals_over_the_examples_and_none_over_seeds(tmp_path):
    import warnings

    from sftkey_trl.run.compare import write_comparison

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # our own plotting raises no warning
        summary, written = write_comparison(tmp_path, ONE_SEED, build_variants(recipe(TWO_STAGES)), [0])
    assert written == [tmp_path / "comparison.md", tmp_path / "comparison.json", tmp_path / "comparison.png"]
    text = (tmp_path / "comparison.md").read_text()
    assert "± 0.000" not in text and "1 seeds" not in text and "1 seed (0)" in text
    assert "There is no interval over seeds: it needs 2 or more seeds" in text
    versus = text.split("minus sft_continue, the continuation baseline")[1]
    row = next(line for line in versus.splitlines() if line.startswith(f"| {PAPER} |"))
    assert row.startswith(f"| {PAPER} | -0.250 [-0.") and "p = 0.50 |" in row  # 2 of 8 apart: McNemar p = 0.5
    stored = summary["versus"]["sft_continue"][PAPER]["accuracy"]
    assert (
        "ci95" not in stored
        and stored["examples"]["n"] == 8
        and stored["examples"]["low"] < 0 < stored["examples"]["high"]
    )
    assert all("ci95" not in entry for row in summary["variants"].values() for entry in row.values())
    shown = render(summary, written)
    assert max(map(len, shown.splitlines())) <= 100 and "1 seed (0)" in shown
    assert "One seed: no interval over seeds; it needs 2 or more seeds" in shown and "0.50" in shown
    assert shown.rstrip().endswith(str(tmp_path / "comparison.png"))
    assert all(f"  {path}" in shown for path in written)


@pytest.mark.slow
def test_the_terminal_table_fits_100_columns_with_every_arm_and_several_seeds(tmp_path):
    from sftkey_trl.run.compare import write_comparison

    variants = build_variants(recipe(TWO_STAGES), key_weights=[2.5, 10])
    per_seed = {name: {seed: arm_run([(seed + k + i) % 3 == 0 for i in range(40)]) for seed in range(3)}
                for k, name in enumerate(variants)}  # fmt: skip
    summary, written = write_comparison(tmp_path, per_seed, variants, [0, 1, 2])
    shown = render(summary, written)
    assert max(map(len, shown.splitlines())) <= 100, shown
    assert "3 seeds (0, 1, 2)" in shown and "over seeds" in shown and "sft_continue_keyweight" in shown
    assert "Per seed: accuracy minus sft_continue" in (tmp_path / "comparison.md").read_text()


def test_nothing_to_plot_writes_no_plot_and_says_so(tmp_path, caplog):
    import logging

    from sftkey_trl.files import mark_folder
    from sftkey_trl.run.compare import write_comparison

    mark_folder(tmp_path, "comparison")  # compare.py's folder, whose plot it may replace
    (tmp_path / "comparison.png").write_bytes(b"an earlier plot")
    unevaluated = {PAPER: {0: {"optimizer_steps": 4, "train_tokens": 10}}}
    with caplog.at_level(logging.INFO, logger="sftkey_trl.run.compare"):
        _, written = write_comparison(tmp_path, unevaluated, build_variants(recipe(TWO_STAGES)), [0])
    assert tmp_path / "comparison.png" not in written and not (tmp_path / "comparison.png").exists()
    assert "no plot (comparison.png): no variant was evaluated" in caplog.text


def test_a_finished_run_without_per_example_values_gets_them_from_its_predictions(tmp_path):
    from conftest import script_args

    from sftkey_trl.data.formatting import Tags
    from sftkey_trl.evaluation.metrics import score
    from sftkey_trl.files import write_jsonl
    from sftkey_trl.run.variants import kept_per_example

    examples = [{"index": i, "prompt": "p", "gold": "4", "reasoning": "2 + 2 = 4"} for i in range(3)]
    texts = [(f"<Thinking>2 + 2 = 4</Thinking>\n<Answer>{a}</Answer>", 9) for a in ("4", "5", "4")]
    metrics, predictions = score(examples, texts, "numeric", script_args(), Tags())
    write_jsonl(tmp_path / "key" / "predictions.jsonl", predictions)
    assert kept_per_example(tmp_path / "key", "numeric") == {"per_example": metrics["per_example"]}
    assert metrics["per_example"]["accuracy"] == [1.0, 0.0, 1.0] and metrics["per_example"]["index"] == [0, 1, 2]
    assert kept_per_example(tmp_path / "sft", "numeric") == {}


@pytest.mark.parametrize("several", [False, True], ids=["one seed", "several seeds"])
def test_a_difference_label_is_clear_of_its_interval(several):
    """The value over each difference bar was drawn where the interval's whisker runs, which crossed it out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sftkey_trl.run.compare import _plot_differences

    entry = {
        "mean": -0.25,
        "examples": {"n": 8, "low": -0.63, "high": 0.13},
        "ci95": 0.2,
        "values": [-0.3, -0.25, -0.2],
    }
    versus = {name: {"accuracy": dict(entry)} for name in ("sftkey_tag", "sft_tag")}
    figure, ax = plt.subplots(figsize=(6, 4))
    _plot_differences(ax, versus, list(versus), "accuracy", "sft_continue", several)
    figure.canvas.draw()
    labels = [text.get_window_extent() for text in ax.texts]
    whiskers = [segment for collection in ax.collections for segment in collection.get_segments()]
    assert labels and whiskers
    for segment in whiskers:
        (x0, y0), (x1, y1) = ax.transData.transform(segment)
        for label in labels:
            crosses_x = min(x0, x1) <= label.x1 and max(x0, x1) >= label.x0
            crosses_y = min(y0, y1) <= label.y1 and max(y0, y1) >= label.y0
            assert not (crosses_x and crosses_y), (segment, label)
    plt.close(figure)
