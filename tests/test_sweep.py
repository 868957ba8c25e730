import csv

import pytest
import yaml

from e2kd import experiment
from e2kd.cli import main
from e2kd.errors import ConfigError
from e2kd.sweep import parse_grid, run_sweep

from .conftest import TINY


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("teacher")
    cfg = root / "t.yaml"
    cfg.write_text(yaml.safe_dump({**TINY, "train": {**TINY["train"], "epochs": 1}, "out_dir": str(root / "run")}))
    assert main(["train-teacher", str(cfg)]) == 0
    return root / "run" / "model.pt"


@pytest.fixture
def base(tmp_path, teacher_ckpt):
    path = tmp_path / "base.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                **TINY,
                "train": {**TINY["train"], "epochs": 1},
                "teacher": {**TINY["model"], "checkpoint": str(teacher_ckpt)},
            }
        )
    )
    return path


class Killed(Exception):
    """Stands in for the process being killed mid-run."""


def test_parse_grid():
    assert parse_grid(["distill.lam=0,0.5", "distill.similarity=cosine,pearson"]) == {
        "distill.lam": [0, 0.5],
        "distill.similarity": ["cosine", "pearson"],
    }
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_grid(["distill.lam"])


def test_killed_sweep_resumes_and_summarises(tmp_path, base, monkeypatch):
    real = experiment.distill
    calls, kill = [], [True]

    def killed_on_third(config, **kwargs):
        calls.append(config.out_dir.name)
        if kill[0] and len(calls) == 3:
            raise Killed
        return real(config, **kwargs)

    monkeypatch.setattr(experiment, "distill", killed_on_third)
    grid = ["distill.lam=0,1", "distill.similarity=cosine,pearson"]
    out = tmp_path / "sweep"
    with pytest.raises(Killed):
        run_sweep(base, grid, [0, 1], out, log=lambda _: None)
    assert len(calls) == 3
    calls.clear()
    kill[0] = False
    rows = run_sweep(base, grid, [0, 1], out, log=lambda _: None)
    assert len(calls) == 6  # 8 runs, 2 finished before the kill
    assert len(rows) == 8 and all(r["status"] == "done" for r in rows)
    with open(out / "sweep.csv") as handle:
        table = list(csv.DictReader(handle))
    assert len(table) == 8 and {"distill.lam", "distill.similarity", "seed", "test_ood/accuracy"} <= set(table[0])
    md = (out / "sweep.md").read_text()
    assert md.count("\n") == 2 + 4 and "| 2/2 |" in md and "±" in md
    assert (out / "sweep.png").stat().st_size > 5_000
    calls.clear()
    run_sweep(base, grid, [0, 1], out, log=lambda _: None)
    assert calls == []  # everything finished: nothing reruns


def test_non_differentiable_similarity_refused_before_anything_runs(tmp_path, base, capsys):
    out = tmp_path / "sweep"
    code = main(
        [
            "sweep",
            str(base),
            "--grid",
            "distill.similarity=cosine,spearman",
            "--grid",
            "distill.lam=1",
            "--out",
            str(out),
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "similarity 'spearman' is not differentiable" in err and "\n" not in err.strip()
    assert not out.exists()


def test_sweep_shards_split_the_runs(tmp_path, base, capsys):
    out = tmp_path / "sweep"
    args = ["sweep", str(base), "--grid", "distill.lam=0,1", "--seeds", "0", "--out", str(out)]
    assert main(args + ["--shard", "0/2"]) == 0
    assert "1/2 runs finished" in capsys.readouterr().out
    assert main(args + ["--shard", "1/2"]) == 0
    assert "2/2 runs finished" in capsys.readouterr().out
    assert main(args + ["--shard", "2/2"]) == 2


def test_plot_metric_picks_the_plotted_column_and_an_unknown_one_is_named(tmp_path, base, capsys, monkeypatch):
    import e2kd.sweep as sweep

    plotted = []
    monkeypatch.setattr(
        sweep, "plot", lambda rows, keys, metric, path: plotted.append((metric, [r[metric] for r in rows]))
    )
    out = tmp_path / "sweep"
    args = ["sweep", str(base), "--grid", "distill.lam=0,1", "--seeds", "0", "--out", str(out)]
    assert main(args) == 0
    assert plotted[-1][0] == "test_ood/accuracy"  # the default
    assert main(args + ["--plot-metric", "test_id/agreement"]) == 0
    with (out / "sweep.csv").open() as f:
        column = [float(r["test_id/agreement"]) for r in csv.DictReader(f)]
    assert plotted[-1] == ("test_id/agreement", column)
    capsys.readouterr()
    assert main(args + ["--plot-metric", "test_id/agreemnt"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--plot-metric 'test_id/agreemnt': no such SPLIT/METRIC column" in err and "test_id/agreement" in err
    assert "\n" not in err
