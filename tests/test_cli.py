import json
import subprocess
import sys

import pytest
import yaml

from e2kd.cli import main
from e2kd.runs import load_run

from .conftest import TINY


def _write(path, data):
    path.write_text(yaml.safe_dump(data))
    return path


def test_plugins_json_lists_kind_name_distribution_description():
    out = subprocess.run(
        [sys.executable, "-m", "e2kd", "plugins", "--json"], capture_output=True, text=True, check=True
    )
    items = json.loads(out.stdout)
    assert {"kind", "name", "distribution", "description"} <= set(items[0])
    assert ("explainer", "gradcam") in {(i["kind"], i["name"]) for i in items}
    assert "PydanticUndefined" not in out.stdout  # default_factory defaults are shown as values
    by_name = {(i["kind"], i["name"]): i for i in items}
    assert by_name[("metric", "explanation_similarity")]["options"]["similarity_options"]["default"] == {}
    assert by_name[("dataset", "image_folder")]["options"]["root"]["required"] is True
    assert ".jpg" in by_name[("dataset", "image_folder")]["options"]["extensions"]["default"]


def test_plugins_kind_lists_that_kind_only(capsys):
    from e2kd.registry import list_plugins

    assert main(["plugins", "--kind", "similarity"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["KIND", "NAME", "DISTRIBUTION"]
    listed = sorted(line.split()[1] for line in lines[1:] if line.strip() and not line.startswith(" "))
    assert listed == sorted(i.name for i in list_plugins("similarity")) and "cosine" in listed
    assert all(line.split()[0] == "similarity" for line in lines[1:] if line.strip() and not line.startswith(" "))


def test_train_distill_evaluate_round_trip(tmp_path, capsys):
    teacher_cfg = _write(tmp_path / "teacher.yaml", {**TINY, "out_dir": str(tmp_path / "teacher")})
    assert main(["train-teacher", str(teacher_cfg)]) == 0
    teacher_dir = tmp_path / "teacher"
    for name in ("config.yaml", "env.json", "metrics.json", "model.pt", "checkpoint.pt"):
        assert (teacher_dir / name).is_file(), name
    env = json.loads((teacher_dir / "env.json").read_text())
    assert env["seed"] == 0 and env["packages"]["torch"]

    student_cfg = _write(
        tmp_path / "student.yaml",
        {
            **TINY,
            "model": {"name": "small_resnet", "options": {"widths": [4, 4]}},
            "teacher": {**TINY["model"], "checkpoint": str(teacher_dir / "model.pt")},
            "distill": {"lam": 1.0},
            "out_dir": str(tmp_path / "unused"),
        },
    )
    assert (
        main(["distill", str(student_cfg), "--set", "distill.temperature=2", "--out", str(tmp_path / "student")]) == 0
    )
    metrics = json.loads((tmp_path / "student" / "metrics.json").read_text())
    assert set(metrics["splits"]) == {"test_id", "test_ood"}
    assert set(metrics["splits"]["test_ood"]) == {"accuracy", "agreement", "explanation_similarity"}
    assert len(metrics["history"]) == 2 and metrics["history"][0]["explanation"] > 0
    saved = yaml.safe_load((tmp_path / "student" / "config.yaml").read_text())
    assert saved["distill"]["temperature"] == 2.0

    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "student")]) == 0
    printed = capsys.readouterr().out
    assert "test_ood: accuracy" in printed
    again = json.loads((tmp_path / "student" / "metrics.json").read_text())
    assert again["splits"] == metrics["splits"]  # deterministic re-evaluation


def test_teacher_alone_skips_teacher_metrics(tmp_path):
    cfg = _write(tmp_path / "t.yaml", {**TINY, "train": {**TINY["train"], "epochs": 1}, "out_dir": str(tmp_path / "t")})
    assert main(["train-teacher", str(cfg)]) == 0
    metrics = json.loads((tmp_path / "t" / "metrics.json").read_text())
    assert set(metrics["splits"]["test_id"]) == {"accuracy"}
    assert metrics["skipped"] == {"agreement": "needs teacher", "explanation_similarity": "needs explanations"}


def test_interrupted_training_resumes(tmp_path, monkeypatch):
    from e2kd import train as train_mod

    cfg = {**TINY, "train": {**TINY["train"], "epochs": 3}, "out_dir": str(tmp_path / "a")}
    assert main(["train-teacher", str(_write(tmp_path / "a.yaml", cfg))]) == 0
    straight = json.loads((tmp_path / "a" / "metrics.json").read_text())

    calls = {"n": 0}
    real_save = train_mod.atomic_torch_save

    def crash_after_two_epochs(obj, path):
        real_save(obj, path)
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt

    cfg_b = {**cfg, "out_dir": str(tmp_path / "b")}
    path_b = _write(tmp_path / "b.yaml", cfg_b)
    monkeypatch.setattr(train_mod, "atomic_torch_save", crash_after_two_epochs)
    assert main(["train-teacher", str(path_b)]) == 130
    assert not (tmp_path / "b" / "model.pt").exists()
    monkeypatch.setattr(train_mod, "atomic_torch_save", real_save)
    assert main(["train-teacher", str(path_b)]) == 0
    resumed = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert [h["epoch"] for h in resumed["history"]] == [1, 2, 3]
    assert resumed["history"][2]["loss"] == pytest.approx(straight["history"][2]["loss"], rel=1e-5)
    for split, values in straight["splits"].items():
        assert resumed["splits"][split] == pytest.approx(values)


@pytest.mark.parametrize(
    "args, message",
    [
        (["distill", "missing.yaml"], "missing.yaml: config file not found"),
        (["train-teacher", "{bad}"], None),
    ],
)
def test_cli_errors_are_one_line_with_exit_code_2(tmp_path, capsys, args, message):
    if message is None:
        bad = tmp_path / "bad.yaml"
        bad.write_text("train: {epochs: [\n")
        args, message = ["train-teacher", str(bad)], "malformed YAML"
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("e2kd: error:") and message in err and "\n" not in err


def test_distill_without_trained_teacher_is_refused(tmp_path, capsys):
    cfg = _write(
        tmp_path / "s.yaml",
        {**TINY, "teacher": {**TINY["model"], "checkpoint": str(tmp_path / "none.pt")}, "out_dir": str(tmp_path / "s")},
    )
    assert main(["distill", str(cfg)]) == 2
    assert "none.pt: file not found" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_run_dir_with_other_config_is_refused(tmp_path, capsys):
    cfg = {**TINY, "train": {**TINY["train"], "epochs": 1}, "out_dir": str(tmp_path / "r")}
    assert main(["train-teacher", str(_write(tmp_path / "r.yaml", cfg))]) == 0
    assert main(["train-teacher", str(_write(tmp_path / "r.yaml", cfg)), "--set", "seed=5"]) == 2
    assert "holds a different run (seed (0 there, 5 now))" in capsys.readouterr().err


def test_demo_quick_smoke(tmp_path, capsys):
    assert main(["demo", "--quick", "--seeds", "0", "--out", str(tmp_path / "demo")]) == 0
    lines = capsys.readouterr().out.splitlines()
    results = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert (tmp_path / "demo" / "explanations.png").stat().st_size > 10_000
    assert set(results["runs"]) == {"teacher", "KD", "e2KD", "e2KD frozen"}
    assert "| e2KD |" in results["table_percent"]
    assert any(line.startswith("e2KD - KD") for line in lines)
    assert any(line.startswith("e2KD frozen - KD") for line in lines)


def test_corrupt_resume_checkpoint_is_refused(tmp_path, capsys):
    out = tmp_path / "c"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"not a checkpoint")
    cfg = _write(tmp_path / "c.yaml", {**TINY, "out_dir": str(out)})
    assert main(["train-teacher", str(cfg)]) == 2
    assert "cannot resume from this checkpoint" in capsys.readouterr().err


def test_missing_layer_in_config_fails_before_training(tmp_path, capsys):
    teacher_cfg = _write(
        tmp_path / "t.yaml", {**TINY, "train": {**TINY["train"], "epochs": 1}, "out_dir": str(tmp_path / "t")}
    )
    assert main(["train-teacher", str(teacher_cfg)]) == 0
    cfg = _write(
        tmp_path / "s.yaml",
        {
            **TINY,
            "teacher": {**TINY["model"], "checkpoint": str(tmp_path / "t" / "model.pt")},
            "distill": {"explainer": {"name": "gradcam", "options": {"layer": "stages.9"}}},
            "out_dir": str(tmp_path / "s"),
        },
    )
    capsys.readouterr()
    assert main(["distill", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert "no layer 'stages.9'; did you mean 'stages." in err and "\n" not in err
    assert not (tmp_path / "s" / "checkpoint.pt").exists()


@pytest.mark.slow
def test_demo_e2kd_beats_kd_over_three_seeds(tmp_path):
    """The demo's claim, checked on its real settings (about 2.5 minutes on 2 cores)."""
    from e2kd.demo import run_demo

    results = run_demo(tmp_path / "demo", seeds=[0, 1, 2], log=lambda *_: None)

    def mean(name, split, metric):
        runs = results["runs"][name]
        return sum(r[split][metric] for r in runs) / len(runs)

    assert mean("teacher", "test_ood", "accuracy") > 0.95
    assert mean("e2KD", "test_ood", "explanation_similarity") > mean("KD", "test_ood", "explanation_similarity") + 0.05
    assert mean("e2KD", "test_id", "explanation_similarity") > mean("KD", "test_id", "explanation_similarity") + 0.05
    assert mean("e2KD", "test_ood", "accuracy") >= mean("KD", "test_ood", "accuracy")
    assert mean("e2KD", "test_id", "agreement") >= mean("KD", "test_id", "agreement")
    # the frozen teacher keeps the benefit
    assert (
        mean("e2KD frozen", "test_ood", "explanation_similarity")
        > mean("KD", "test_ood", "explanation_similarity") + 0.05
    )
    assert mean("e2KD frozen", "test_ood", "accuracy") >= mean("KD", "test_ood", "accuracy")


def test_evaluate_report_over_runs_with_every_metric_kind(tmp_path, capsys):
    teacher_cfg = _write(tmp_path / "t.yaml", {**TINY, "out_dir": str(tmp_path / "teacher")})
    assert main(["train-teacher", str(teacher_cfg)]) == 0
    base = {**TINY, "teacher": {**TINY["model"], "checkpoint": str(tmp_path / "teacher" / "model.pt")}}
    for name, lam in (("kd", 0.0), ("e2kd", 1.0)):
        cfg = _write(tmp_path / f"{name}.yaml", {**base, "distill": {"lam": lam}, "out_dir": str(tmp_path / name)})
        assert main(["distill", str(cfg)]) == 0
    capsys.readouterr()
    metrics = (
        "accuracy,agreement,kl_divergence,explanation_similarity,epg,explanation_iou,group_accuracy,shift_equivariance,"
        "deletion,insertion,road,model_randomisation"
    )
    assert (
        main(
            [
                "evaluate",
                str(tmp_path / "kd"),
                str(tmp_path / "e2kd"),
                "--out",
                str(tmp_path / "report"),
                "--metrics",
                metrics,
            ]
        )
        == 0
    )
    report = json.loads((tmp_path / "report" / "metrics.json").read_text())
    ood = report["e2kd"]["splits"]["test_ood"]
    assert set(ood) == set(metrics.split(","))
    assert 0 <= ood["epg"] <= 1 and set(ood["shift_equivariance"]) == {f"shift_{t}" for t in range(9)}
    curve = ood["shift_equivariance"]  # (its values are checked by hand in test_metrics)
    assert all(-1 - 1e-6 <= v <= 1 + 1e-6 for v in curve.values()) and curve["shift_8"] < 0.999
    assert ood["group_accuracy"]["out_of_distribution"] == pytest.approx(
        ood["accuracy"]
    )  # OOD set: no matching background
    md = (tmp_path / "report" / "report.md").read_text()
    assert md.startswith("| run | test_id/accuracy") and "| kd |" in md and "| e2kd |" in md
    for name in ("explanations.png", "shift.png", "faithfulness.png", "randomisation.png"):
        assert (tmp_path / "report" / name).stat().st_size > 5_000
    # the teacher is evaluated with the faithfulness and randomisation metrics, as a run of its own would be
    model_metrics = ["deletion", "insertion", "road", "model_randomisation"]
    assert set(report["teacher"]["splits"]["test_ood"]) == set(model_metrics)
    assert report["teacher"]["categories"] == {
        "deletion": "faithfulness",
        "insertion": "faithfulness",
        "road": "faithfulness",
        "model_randomisation": "randomisation",
    }
    assert report["e2kd"]["details"]["explanation_similarity"] == "cosine"  # the run's training similarity
    assert report["e2kd"]["higher_is_better"]["deletion"] is False and report["e2kd"]["higher_is_better"]["insertion"]
    assert report["e2kd"]["curve_labels"]["deletion"] == [
        "share of patches removed",
        "probability of the explained class",
    ]
    own = load_run(tmp_path / "teacher").evaluate(model_metrics)["splits"]["test_ood"]
    assert report["teacher"]["splits"]["test_ood"] == own
    assert "| teacher |" in md and "deletion.auc (MoRF, 8 px patches) ↓" in md and ".curve." not in md
    assert report["e2kd"]["splits"]["test_ood"]["deletion"] != own["deletion"]  # (a different model)
    # a teacher run alone: teacher-only metrics are skipped, the rest works
    assert main(["evaluate", str(tmp_path / "teacher"), "--metrics", "accuracy,agreement,epg"]) == 0
    alone = json.loads((tmp_path / "teacher" / "metrics.json").read_text())
    assert set(alone["splits"]["test_id"]) == {"accuracy", "epg"} and alone["skipped"] == {"agreement": "needs teacher"}


@pytest.mark.parametrize(
    "argv, line",
    [
        (
            ["distil", "x.yaml"],
            "e2kd: error: unknown command 'distil'; did you mean 'distill'? (known: plugins, weights, train-teacher, distill, ",
        ),
        (
            ["plugins", "--kind", "explainr"],
            "e2kd plugins: error: unknown choice 'explainr'; did you mean 'explainer'?",
        ),
        (["distill"], "e2kd distill: error: the following arguments are required: config (see e2kd distill --help)"),
    ],
)
def test_command_line_mistakes_are_one_line(argv, line, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(line), err
