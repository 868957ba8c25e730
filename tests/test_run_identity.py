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
    cfg = _write(tmp_path / "t.yaml", {**TINY, "train": {**TINY["train"], "epochs": 1}, "out_dir": str(tmp_path / "elsewhere")})
    out = tmp_path / "run"
    assert main(["train-teacher", str(cfg), "--out", str(out)]) == 0
    stamp = (out / "model.pt").stat().st_mtime_ns
    # progress bar, loader workers and the output folder named differently: the same run, reused
    assert main(["train-teacher", str(cfg), "--out", str(out), "--set", "train.progress=true",
                 "--set", "data.num_workers=1"]) == 0
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
    teacher = _write(tmp_path / "t.yaml", {**TINY, "train": {**TINY["train"], "epochs": 1}, "out_dir": str(exp / "teacher")})
    assert main(["train-teacher", str(teacher)]) == 0
    monkeypatch.chdir(exp)  # a relative checkpoint path is resolved against the working directory at load
    student = _write(tmp_path / "s.yaml", {**TINY, "model": {"name": "small_resnet", "options": {"widths": [4, 4]}},
                                            "teacher": {**TINY["model"], "checkpoint": "teacher/model.pt"},
                                            "train": {**TINY["train"], "epochs": 1}, "out_dir": str(exp / "student")})
    assert main(["distill", str(student)]) == 0
    stored = yaml.safe_load((exp / "student" / "config.yaml").read_text())
    assert stored["teacher"]["checkpoint"] == str(exp / "teacher" / "model.pt")
    shutil.move(str(exp), str(tmp_path / "moved"))
    monkeypatch.chdir(tmp_path)
    run = e2kd.load_run(tmp_path / "moved" / "student")
    assert run.config.teacher.checkpoint == tmp_path / "moved" / "teacher" / "model.pt"
    assert run.teacher is not None
    assert main(["evaluate", str(tmp_path / "moved" / "student")]) == 0
