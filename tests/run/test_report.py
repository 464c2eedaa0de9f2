"""The terminal results table fits in 80 columns with every metric and model named in full."""

from __future__ import annotations

import io
from pathlib import Path

from rich.console import Console

from sftkey_trl.run.card import results_section
from sftkey_trl.run.report import metric_rows, print_results, results_markdown

METRICS = {"accuracy": 0.25, "format_accuracy": 1.0, "composite": 0.475, "reasoning_final_accuracy": 0.25,
           "answer_reasoning_consistency": 1.0, "mean_generated_tokens": 135.125, "num_examples": 1319}  # fmt: skip


def render(stage_names: list[str]) -> str:
    stages = {name: dict(METRICS) for name in stage_names}
    console = Console(width=80, file=io.StringIO(), record=True)
    print_results({"base": dict(METRICS), "stages": stages}, Path("outputs/qwen2.5-7b/gsm8k/run"), console)
    return console.export_text()


def test_results_table_fits_80_columns_without_truncating_names():
    text = render(["sft", "key", "key_mix"])
    assert max(len(line) for line in text.splitlines()) <= 80
    for name in ("base", "sft", "key", "key_mix", *metric_rows().values(), "0.475", "135.1", "1319"):
        assert name in text, name


def test_long_stage_names_wrap_instead_of_being_cut():
    text = render(["sft", "key_best_of_three", "another_long_stage", "x"])
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "…" not in text and all(label in text for label in metric_rows().values())


def test_every_table_rounds_a_metric_to_its_own_decimals():
    """The terminal table, results.md and the card read each metric's `decimals` from its one entry."""
    results = {"base": dict(METRICS), "stages": {"sft": dict(METRICS)}}
    for text in (render(["sft"]), results_markdown(results), "\n".join(results_section(results))):
        assert "135.1" in text and "135.125" not in text and "0.475" in text


def logged(stage_dir: Path, steps: int, reasoning: float, key: float) -> None:
    """A stage's log_history.json as Trainer writes it: a logged step every 2, then the run's summary entry."""
    import json

    entries = [
        {"step": s, "loss": 1.0, "reasoning_loss": reasoning / s, "key_loss": key / s} for s in range(2, steps + 1, 2)
    ]
    stage_dir.mkdir(parents=True, exist_ok=True)
    (stage_dir / "log_history.json").write_text(json.dumps([*entries, {"step": steps, "train_loss": 0.5}]))


def test_plots_are_titled_and_written_without_warnings(tmp_path):
    import warnings

    from sftkey_trl.run.report import plot_results

    logged(tmp_path / "sft", 10, 2.0, 4.0)
    logged(tmp_path / "key", 6, 1.0, 0.5)
    results = {
        "base": {**METRICS, "accuracy": 0.0, "format_accuracy": 0.0},
        "stages": {"sft": dict(METRICS), "key": dict(METRICS)},
    }
    with warnings.catch_warnings():
        warnings.simplefilter(
            "error"
        )  # any warning from our plotting (an empty legend, a log axis with no data) fails
        written = plot_results(results, tmp_path)
    assert written == [tmp_path / "stages.png", tmp_path / "training_curves.png"]
    assert all(path.stat().st_size > 10_000 for path in written)


def test_a_plot_with_nothing_to_draw_is_skipped_and_the_log_says_so(tmp_path, caplog):
    import logging
    import warnings

    from sftkey_trl.files import mark_folder
    from sftkey_trl.run.report import plot_results

    mark_folder(tmp_path, "run")  # a run's output folder, whose plots the report may replace
    for name in ("stages.png", "training_curves.png"):
        (tmp_path / name).write_bytes(b"an earlier run's plot")
    (tmp_path / "sft").mkdir()
    (tmp_path / "sft" / "log_history.json").write_text('[{"step": 4, "train_loss": 0.5}]')  # nothing logged
    with warnings.catch_warnings(), caplog.at_level(logging.INFO, logger="sftkey_trl.run.report"):
        warnings.simplefilter("error")
        assert plot_results({"stages": {"sft": {"loss_on": "completion"}}}, tmp_path) == []
    assert not (tmp_path / "stages.png").exists() and not (tmp_path / "training_curves.png").exists()
    assert "no stages.png: no stage was evaluated" in caplog.text
    assert "no training_curves.png: no stage logged its reasoning and key losses" in caplog.text


def test_results_md_names_its_columns_in_words():
    header = results_markdown({"stages": {"sft": dict(METRICS)}}).splitlines()[2]
    assert header == "| stage | " + " | ".join(metric_rows().values()) + " |"
    assert "| accuracy | format accuracy |" in header and "answer follows reasoning" in header
    assert not {"acc", "fmt", "reas", "consist", "reas=ref", "n"} & {cell.strip() for cell in header.split("|")}


def test_the_stages_plot_names_only_the_models_it_shows(tmp_path, monkeypatch):
    """The x axis read "base, then each stage" on a run that evaluated no base model."""
    import matplotlib.pyplot as plt

    from sftkey_trl.run.report import _plot_stages

    monkeypatch.setattr(plt, "close", lambda figure: None)  # keep the figure to read its axis
    stages = {"sft": dict(METRICS)}
    for results, shown in (
        ({"stages": stages}, "each stage"),
        ({"base": METRICS, "stages": stages}, "the base, then each stage"),
    ):
        assert _plot_stages(results, tmp_path, tmp_path / "stages.png")
        assert plt.gcf().axes[0].get_xlabel() == f"evaluated model: {shown}"
        plt.close("all")
