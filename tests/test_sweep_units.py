"""The sweep's parts (``e2kd.sweep``) against hand-written results: grid parsing, the plan's cells,
names and configs, the CSV and Markdown summaries, the plot read back from its artists, and the
run loop's order, skips and log lines (with recorded runs instead of training)."""

from __future__ import annotations

import csv
import io
import math
import statistics
from pathlib import Path

import numpy as np
import pytest
import yaml

from e2kd import sweep
from e2kd.errors import ConfigError

BASE = {
    "data": {
        "name": "synthetic",
        "options": {"num_classes": 3, "image_size": 16, "train_per_class": 2, "test_per_class": 2},
    },
    "model": {"name": "small_resnet", "options": {"widths": [4]}},
    "train": {"epochs": 1, "batch_size": 4, "progress": False},
    "eval": {"metrics": ["accuracy"]},
}


def test_grid_values_are_yaml_scalars_and_keys_unique():
    assert sweep.parse_grid(["train.lr=0.1, 0.001", "distill.similarity=cosine", "a.b=x=y", "c=1,,true"]) == {
        "train.lr": [0.1, 0.001],
        "distill.similarity": ["cosine"],
        "a.b": ["x=y"],
        "c": [1, "", True],
    }
    with pytest.raises(ConfigError, match=r"^--grid 'train.lr=2': key 'train.lr' given twice$"):
        sweep.parse_grid(["train.lr=1", "train.lr=2"])


def test_run_names_are_the_cell_and_seed_made_safe_for_folders():
    run = sweep.SweepRun({"distill.similarity": "top k", "train.lr": 0.1}, 3, None)
    assert run.name == "distill.similarity=top-k_train.lr=0.1_seed=3"
    assert sweep._slug("a/b c:d=e_f.g-h") == "a-b-c-d=e_f.g-h" and sweep._slug("Top K") == "Top-K"


def test_the_plan_is_the_cross_product_times_seeds_each_config_validated(tmp_path):
    runs = sweep.plan(
        BASE,
        {"train.lr": [0.1, 0.01], "train.epochs": [2, 3]},
        [0, 5],
        tmp_path,
        "base.yaml",
        overrides=["train.batch_size=2"],
    )
    assert [(r.cell["train.lr"], r.cell["train.epochs"], r.seed) for r in runs] == [
        (0.1, 2, 0),
        (0.1, 2, 5),
        (0.1, 3, 0),
        (0.1, 3, 5),
        (0.01, 2, 0),
        (0.01, 2, 5),
        (0.01, 3, 0),
        (0.01, 3, 5),
    ]
    first, last = runs[0].config, runs[-1].config
    assert (first.train.lr, first.train.epochs, first.seed, first.train.batch_size) == (0.1, 2, 0, 2)
    assert (last.train.lr, last.train.epochs, last.seed) == (0.01, 3, 5)
    assert first.out_dir == (tmp_path / "runs" / "train.lr=0.1_train.epochs=2_seed=0").resolve()
    assert BASE["train"]["epochs"] == 1  # the base is not modified by the cells
    assert runs[1].config.train.lr == 0.1 and runs[2].config.train.epochs == 3  # no cell leaks into the next
    with pytest.raises(ConfigError, match=r"base.yaml \(sweep cell \{'train.epochs': -1\}\)"):
        sweep.plan(BASE, {"train.epochs": [-1]}, [0], tmp_path, "base.yaml")
    with pytest.raises(
        ConfigError, match=r"^base.yaml \(sweep cell \{'train.nothing': 1\}\): train.nothing: unknown key"
    ):
        sweep.plan(BASE, {"train.nothing": [1]}, [0], tmp_path, "base.yaml")
    with pytest.raises(ConfigError, match=r"--grid train.lr.x"):
        sweep.plan(BASE, {"train.lr.x": [1]}, [0], tmp_path, "base.yaml")
    with pytest.raises(ConfigError, match=r"^base.yaml: "):
        sweep.plan({**BASE, "train": {"epochs": -1}}, {"train.lr": [0.1]}, [0], tmp_path, "base.yaml")


ROWS = [
    {"run": "a", "x": 0.1, "y": "p", "seed": 0, "status": "done", "val/accuracy": 0.5, "val/acc.y0_g1": 9.0},
    {"run": "b", "x": 0.1, "y": "p", "seed": 1, "status": "done", "val/accuracy": 0.7, "val/acc.y0_g1": 9.0},
    {"run": "c", "x": 1.0, "y": "p", "seed": 0, "status": "done", "val/accuracy": 0.9},
    {"run": "d", "x": 1.0, "y": "p", "seed": 1, "status": "missing"},
    {"run": "e", "x": 0.1, "y": "q", "seed": 0, "status": "missing"},
]


def test_markdown_is_mean_and_std_over_finished_seeds_per_cell():
    got = sweep.markdown_table(ROWS, ["x", "y"], ["val/accuracy"])
    std = statistics.stdev([0.5, 0.7])
    assert got == (
        "| x | y | n | val/accuracy |\n|---|---|---|---|\n"
        f"| 0.1 | p | 2/2 | 0.6 ± {std:.2g} |\n| 1.0 | p | 1/2 | 0.9 |\n| 0.1 | q | 0/1 | — |\n"
    )


def test_summaries_write_every_row_to_csv_and_leave_per_cell_columns_out_of_the_table(tmp_path, monkeypatch):
    plotted = []
    monkeypatch.setattr(sweep, "plot", lambda rows, keys, metric, path: plotted.append((len(rows), metric, path)))
    sweep.write_summaries(ROWS, ["x", "y"], tmp_path)
    table = list(csv.DictReader(io.StringIO((tmp_path / "sweep.csv").read_text())))
    assert [r["run"] for r in table] == ["a", "b", "c", "d", "e"] and table[3]["val/accuracy"] == ""
    assert list(table[0]) == ["run", "x", "y", "seed", "status", "val/accuracy", "val/acc.y0_g1"]
    md = (tmp_path / "sweep.md").read_text()
    assert md.splitlines()[0] == "| x | y | n | val/accuracy |"  # per-group values are left out
    assert plotted == [(3, "val/accuracy", tmp_path / "sweep.png")]
    ood = [{**r, "test_ood/accuracy": 0.3} for r in ROWS[:3]]
    sweep.write_summaries(ood, ["x"], tmp_path)
    assert plotted[-1][1] == "test_ood/accuracy"  # preferred when there is one
    sweep.write_summaries(ood, ["x"], tmp_path, plot_metric="val/accuracy")
    assert plotted[-1][1] == "val/accuracy"
    with pytest.raises(
        ConfigError,
        match=r"^--plot-metric 'val/loss': no such SPLIT/METRIC column in "
        r".*sweep.csv \(known: val/accuracy, test_ood/accuracy\)$",
    ):
        sweep.write_summaries(ood, ["x"], tmp_path, plot_metric="val/loss")
    plotted.clear()
    sweep.write_summaries([ROWS[3], ROWS[4]], ["x"], tmp_path, plot_metric="val/loss")  # nothing finished: no plot
    no_metrics = [{k: v for k, v in r.items() if "/" not in k} for r in ROWS[:2]]
    sweep.write_summaries(no_metrics, ["x"], tmp_path)  # finished, but no metric was asked for: no plot
    assert plotted == []


def _captured_plot(monkeypatch, rows, keys, metric):
    import e2kd.viz

    figures = []
    monkeypatch.setattr(e2kd.viz, "save_figure", lambda fig, path: figures.append((fig, path)))
    sweep.plot(rows, keys, metric, Path("/tmp/p.png"))
    ((fig, path),) = figures
    assert path == Path("/tmp/p.png")
    return fig.axes[0]


def test_the_plot_is_the_metric_against_the_first_key_one_line_per_other_combination(monkeypatch):
    rows = [
        {"x": x, "y": y, "seed": s, "m": x * 10 + s + (100 if y == "b" else 0)}
        for x in (0.5, 2.0)
        for y in ("a", "b")
        for s in (0, 1)
    ]
    rows.append({"x": 1.0, "y": "a", "seed": 0})  # no value: not drawn
    ax = _captured_plot(monkeypatch, rows, ["x", "y"], "m")
    lines = [c for c in ax.containers]
    assert [c.get_label() for c in lines] == ["y=a", "y=b"]
    data = [c.lines[0].get_xydata().tolist() for c in lines]
    assert data == [[[0.5, 5.5], [2.0, 20.5]], [[0.5, 105.5], [2.0, 120.5]]]
    segments = lines[0].lines[2][0].get_segments()  # error bars: mean ± std over the two seeds
    assert np.allclose(segments[0], [[0.5, 5.5 - math.sqrt(0.5)], [0.5, 5.5 + math.sqrt(0.5)]])
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("x", "m")
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["y=a", "y=b"]


def test_points_are_drawn_in_the_order_of_the_swept_value(monkeypatch):
    rows = [{"x": x, "seed": 0, "m": v} for x, v in ((2.0, 1.0), (0.5, 5.0), (1.0, 3.0))]
    (line,) = _captured_plot(monkeypatch, rows, ["x"], "m").containers
    assert line.lines[0].get_xydata().tolist() == [[0.5, 5.0], [1.0, 3.0], [2.0, 1.0]]


def test_the_line_label_names_every_other_key(monkeypatch):
    rows = [{"x": 1, "y": "a", "z": 2, "seed": 0, "m": 1.0}, {"x": 2, "y": "a", "z": 2, "seed": 0, "m": 2.0}]
    (line,) = _captured_plot(monkeypatch, rows, ["x", "y", "z"], "m").containers
    assert line.get_label() == "y=a, z=2"


def test_the_plot_places_words_and_flags_evenly_and_a_single_key_is_labelled_by_the_metric(monkeypatch):
    rows = [{"s": s, "seed": 0, "m": v} for s, v in (("cosine", 1.0), ("pearson", 2.0))]
    ax = _captured_plot(monkeypatch, rows, ["s"], "m")
    (line,) = ax.containers
    assert line.get_label() == "m" and line.lines[0].get_xydata().tolist() == [[0, 1.0], [1, 2.0]]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["cosine", "pearson"]
    assert np.allclose(line.lines[2][0].get_segments()[0], [[0, 1.0], [0, 1.0]])  # one seed: no spread
    flags = [{"f": f, "seed": 0, "m": v} for f, v in ((True, 1.0), (False, 3.0))]
    (line,) = _captured_plot(monkeypatch, flags, ["f"], "m").containers
    assert line.lines[0].get_xydata().tolist() == [[0, 1.0], [1, 3.0]]  # booleans are not numbers here


def test_run_sweep_runs_its_shard_in_order_skips_finished_runs_and_logs_each(tmp_path, monkeypatch):
    import e2kd.experiment
    import e2kd.runs

    config = tmp_path / "base.yaml"
    config.write_text(yaml.safe_dump(BASE))
    trained, logs = [], []
    finished = {"train.lr=0.2_seed=0"}
    monkeypatch.setattr(
        e2kd.experiment,
        "train_teacher",
        lambda c, rerun: (
            trained.append((c.out_dir.name, rerun))
            if c.train.epochs == 1
            else trained.append((c.out_dir.name, rerun, c.train.epochs))
        ),
    )
    monkeypatch.setattr(
        e2kd.runs,
        "finished_results",
        lambda c: {"splits": {"val": {"accuracy": c.train.lr}}} if c.out_dir.name in finished else None,
    )
    rows = sweep.run_sweep(config, ["train.lr=0.1,0.2,0.3"], [0], tmp_path / "out", shard=(0, 2), log=logs.append)
    assert trained == [("train.lr=0.1_seed=0", False), ("train.lr=0.3_seed=0", False)]
    assert logs == ["[sweep 1/2] train.lr=0.1_seed=0", "[sweep 2/2] train.lr=0.3_seed=0"]
    assert [r["status"] for r in rows] == ["missing", "done", "missing"] and rows[1]["val/accuracy"] == 0.2
    assert [r["run"] for r in rows] == ["train.lr=0.1_seed=0", "train.lr=0.2_seed=0", "train.lr=0.3_seed=0"]
    logs.clear()
    sweep.run_sweep(config, ["train.lr=0.1,0.2,0.3"], [0], tmp_path / "out", shard=(1, 2), log=logs.append)
    assert logs == ["[sweep 1/1] train.lr=0.2_seed=0 (finished, skipped)"]
    trained.clear()
    sweep.run_sweep(
        config, ["train.lr=0.2"], [0], tmp_path / "out", log=logs.append, rerun=True, overrides=["train.epochs=2"]
    )
    assert trained == [("train.lr=0.2_seed=0", True, 2)]  # the overrides reach every run
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**BASE, "train": {"epochs": 0}}))
    with pytest.raises(ConfigError, match=rf"^{bad}"):
        sweep.run_sweep(bad, ["train.lr=0.1"], [0], tmp_path / "out")
    with pytest.raises(ConfigError, match=r"^sweep needs at least one --grid KEY=V1,V2$"):
        sweep.run_sweep(config, [], [0], tmp_path / "out")
