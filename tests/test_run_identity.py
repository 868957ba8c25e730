"""A run directory is matched to its config by what changes results, and can be moved."""

import shutil

import yaml

import e2kd
from e2kd.cli import main

from .conftest import TINY


def _write(path, data):
    path.write_text(yaml.safe_dump(data))
    return path


def test_volatile_fields_and_new_fields_do_not_make_a_run_different(tmp_path, capsys):
    cfg = _write(
        tmp_path / "t.yaml", {**TINY, "train": {**TINY["train"], "epochs": 1}, "out_dir": str(tmp_path / "elsewhere")}
    )
    out = tmp_path / "run"
    assert main(["train-teacher", str(cfg), "--out", str(out)]) == 0
    stamp = (out / "model.pt").stat().st_mtime_ns
    # progress bar, loader workers and the output folder named differently: the same run, reused
    assert (
        main(
            [
                "train-teacher",
                str(cfg),
                "--out",
                str(out),
                "--set",
                "train.progress=true",
                "--set",
                "data.num_workers=1",
            ]
        )
        == 0
    )
    assert (out / "model.pt").stat().st_mtime_ns == stamp
    # a run written before a field existed (here: warm-up, eval splits) is the same run
    stored = yaml.safe_load((out / "config.yaml").read_text())
    del stored["train"]["warmup_epochs"], stored["eval"]["splits"], stored["data"]["num_workers"]
    (out / "config.yaml").write_text(yaml.safe_dump(stored))
    assert main(["train-teacher", str(cfg), "--out", str(out)]) == 0
    assert (out / "model.pt").stat().st_mtime_ns == stamp
    # a value that changes results does make it different, and the message names it
    capsys.readouterr()
    assert main(["train-teacher", str(cfg), "--out", str(out), "--set", "train.lr=0.5"]) == 2
    assert "train.lr (0.001 there, 0.5 now)" in capsys.readouterr().err


def test_out_is_a_path_never_yaml(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = _write(tmp_path / "t.yaml", {**TINY, "train": {**TINY["train"], "epochs": 1}})
    assert main(["train-teacher", str(cfg), "--out", "yes"]) == 0
    assert (tmp_path / "yes" / "model.pt").is_file()
    assert main(["train-teacher", str(cfg), "--out", "[x]"]) == 0
    assert (tmp_path / "[x]" / "model.pt").is_file()


def test_a_moved_experiment_folder_still_loads_its_teacher(tmp_path, monkeypatch):
    exp = tmp_path / "exp"
    teacher = _write(
        tmp_path / "t.yaml", {**TINY, "train": {**TINY["train"], "epochs": 1}, "out_dir": str(exp / "teacher")}
    )
    assert main(["train-teacher", str(teacher)]) == 0
    monkeypatch.chdir(exp)  # a relative checkpoint path is resolved against the working directory at load
    student = _write(
        tmp_path / "s.yaml",
        {
            **TINY,
            "model": {"name": "small_resnet", "options": {"widths": [4, 4]}},
            "teacher": {**TINY["model"], "checkpoint": "teacher/model.pt"},
            "train": {**TINY["train"], "epochs": 1},
            "out_dir": str(exp / "student"),
        },
    )
    assert main(["distill", str(student)]) == 0
    stored = yaml.safe_load((exp / "student" / "config.yaml").read_text())
    assert stored["teacher"]["checkpoint"] == str(exp / "teacher" / "model.pt")
    shutil.move(str(exp), str(tmp_path / "moved"))
    monkeypatch.chdir(tmp_path)
    run = e2kd.load_run(tmp_path / "moved" / "student")
    assert run.config.teacher.checkpoint == tmp_path / "moved" / "teacher" / "model.pt"
    assert run.teacher is not None
    assert main(["evaluate", str(tmp_path / "moved" / "student")]) == 0


def _train(cfg, *extra):
    return main(["train-teacher", str(cfg), *extra])


def test_a_finished_run_is_reused_with_one_line_and_rerun_trains_again(tmp_path, capsys):
    cfg = _write(tmp_path / "t.yaml", {**TINY, "train": {**TINY["train"], "epochs": 1}, "out_dir": str(tmp_path / "t")})
    assert _train(cfg) == 0
    stamp = (tmp_path / "t" / "model.pt").stat().st_mtime_ns
    capsys.readouterr()
    assert _train(cfg) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"e2kd: {tmp_path / 't'} holds a finished run of this config (same e2kd, plugin versions and "
        f"checkpoints): reused, not trained again (--rerun trains it again)"
    ]
    assert (tmp_path / "t" / "model.pt").stat().st_mtime_ns == stamp
    assert _train(cfg, "--rerun") == 0
    assert "reused" not in capsys.readouterr().err
    assert (tmp_path / "t" / "model.pt").stat().st_mtime_ns != stamp
    steps = [r.split(",")[0] for r in (tmp_path / "t" / "steps.csv").read_text().splitlines()[1:]]
    assert steps == ["1", "2"]  # the earlier run's log rows are gone, not doubled


def test_a_run_made_by_another_plugin_version_or_teacher_file_is_not_reused(tmp_path, capsys):
    import json

    teacher = _write(
        tmp_path / "t.yaml", {**TINY, "train": {**TINY["train"], "epochs": 1}, "out_dir": str(tmp_path / "t")}
    )
    assert _train(teacher) == 0
    student = _write(
        tmp_path / "s.yaml",
        {
            **TINY,
            "model": {"name": "small_resnet", "options": {"widths": [4, 4]}},
            "teacher": {**TINY["model"], "checkpoint": str(tmp_path / "t" / "model.pt")},
            "train": {**TINY["train"], "epochs": 1},
            "out_dir": str(tmp_path / "s"),
        },
    )
    assert main(["distill", str(student)]) == 0
    env = json.loads((tmp_path / "s" / "env.json").read_text())
    record = env["produced_by"]
    assert record["plugins"]["explainer gradcam"] == f"e2kd {record['e2kd']}" and record["e2kd"]
    assert set(record["checkpoints"]) == {"teacher"}
    # the same config, a plugin of another version: refused, naming it
    env["produced_by"]["plugins"]["explainer gradcam"] = "e2kd 0.0.0"
    (tmp_path / "s" / "env.json").write_text(json.dumps(env))
    capsys.readouterr()
    assert main(["distill", str(student)]) == 2
    err = capsys.readouterr().err
    assert "holds a different run (plugins.explainer gradcam ('e2kd 0.0.0' there, " in err
    assert "train it again with --rerun" in err
    assert main(["distill", str(student), "--rerun"]) == 0
    # the teacher retrained (another seed): its file changed, the student is not reused
    assert _train(teacher, "--rerun", "--set", "seed=1") == 0
    capsys.readouterr()
    assert main(["distill", str(student)]) == 2
    assert "checkpoints.teacher (sha256 " in capsys.readouterr().err
    # a run directory written before runs recorded their code is not taken for this one
    assert main(["distill", str(student), "--rerun"]) == 0
    env = json.loads((tmp_path / "s" / "env.json").read_text())
    del env["produced_by"]
    (tmp_path / "s" / "env.json").write_text(json.dumps(env))
    assert main(["distill", str(student)]) == 2
    assert "it records no e2kd and plugin versions (written by an older e2kd)" in capsys.readouterr().err
