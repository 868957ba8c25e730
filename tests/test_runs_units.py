"""Helpers of ``e2kd.runs`` by value: the git revision and environment recorded with a run, and run
identity (atomic writes: tests/test_storage.py)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from e2kd import runs

from .test_sweep_units import BASE  # the same small teacher run


class _Done:
    def __init__(self, returncode=0, stdout=""):
        self.returncode, self.stdout = returncode, stdout


@pytest.mark.parametrize(
    "answers, want",
    [
        ([_Done(0, "abc123\n"), _Done(0, "")], "abc123"),
        ([_Done(0, "abc123\n"), _Done(0, " M e2kd/runs.py\n")], "abc123-dirty"),
        ([_Done(128, "")], None),
        ([OSError("no git")], None),
        ([_Done(0, "abc\n"), subprocess.TimeoutExpired("git", 5)], None),
    ],
    ids=["clean", "dirty", "not a repository", "no git", "slow"],
)
def test_git_revision_of_the_source_tree(monkeypatch, answers, want):
    calls = []

    def run(args, **kwargs):
        calls.append((args, kwargs))
        answer = answers[len(calls) - 1]
        if isinstance(answer, BaseException):
            raise answer
        return answer

    monkeypatch.setattr(subprocess, "run", run)
    assert runs.git_revision() == want
    root = Path(runs.__file__).resolve().parent.parent
    assert calls[0] == (["git", "rev-parse", "HEAD"], {"cwd": root, "capture_output": True, "text": True, "timeout": 5})
    if len(calls) > 1:
        assert calls[1] == (
            ["git", "status", "--porcelain", "--untracked-files=no"],
            {"cwd": root, "capture_output": True, "text": True, "timeout": 5},
        )


def _config(tmp_path, **train):
    from e2kd.config import load_config_dict

    return load_config_dict({**BASE, "train": {**BASE["train"], **train}, "out_dir": str(tmp_path / "run")}, source="t")


def test_environment_records_seed_versions_revision_and_command(monkeypatch):
    import platform
    import sys

    monkeypatch.setattr(runs, "git_revision", lambda: "rev")
    env = runs.environment(7)
    assert list(env) == ["seed", "python", "platform", "packages", "git_revision", "command"]
    assert (env["seed"], env["python"], env["platform"], env["git_revision"], env["command"]) == (
        7,
        platform.python_version(),
        platform.platform(),
        "rev",
        sys.argv,
    )
    assert set(env["packages"]) >= {"torch", "timm", "captum"} and env["packages"]["torch"].startswith(
        torch.__version__.split("+")[0]
    )


def test_identity_problems_are_named_in_one_line(tmp_path):
    config = _config(tmp_path)
    out = tmp_path / "run"
    assert runs._identity_problem(out, config) is None  # nothing there yet
    runs.prepare_run_dir(config)
    assert runs._identity_problem(out, config) is None
    other = _config(tmp_path, epochs=2, batch_size=2, lr=0.5, weight_decay=0.25)
    problem = runs._identity_problem(out, other)
    parts = problem.split("; ")
    assert len(parts) == 3 and problem.endswith(" (+1 more)") and "train.epochs" in problem
    assert runs._identity_problem(out, _config(tmp_path, epochs=2, batch_size=2, lr=0.5)).count("; ") == 2
    assert "more)" not in runs._identity_problem(out, _config(tmp_path, epochs=2, batch_size=2, lr=0.5))
    env = json.loads((out / "env.json").read_text())
    del env["produced_by"]
    (out / "env.json").write_text(json.dumps(env))
    assert runs._identity_problem(out, config) == "it records no e2kd and plugin versions (written by an older e2kd)"
    (out / "env.json").write_text("{not json")
    assert runs._identity_problem(out, config) == "it records no e2kd and plugin versions (written by an older e2kd)"
    (out / "config.yaml").write_text("train: {epochs: -3}\n")
    assert runs._identity_problem(out, config) == "its config.yaml no longer validates"


def test_rerun_removes_what_was_trained_unless_torchrun_restarted_the_worker(tmp_path, monkeypatch):
    config = _config(tmp_path)
    out = runs.prepare_run_dir(config)

    def fill():
        for name in runs.TRAINED_FILES:
            (out / name).write_text("x")
        (out / "tensorboard").mkdir(exist_ok=True)
        (out / "tensorboard" / "events").write_text("x")

    fill()
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    runs.prepare_run_dir(config, rerun=True)
    assert all((out / n).exists() for n in runs.TRAINED_FILES) and (out / "tensorboard" / "events").exists()
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    runs.prepare_run_dir(config)  # not a rerun: the trained files stay
    assert all((out / n).exists() for n in runs.TRAINED_FILES)
    runs.prepare_run_dir(config, rerun=True)
    assert not any((out / n).exists() for n in runs.TRAINED_FILES) and not (out / "tensorboard").exists()
    assert runs.TRAINED_FILES == ("model.pt", "checkpoint.pt", "metrics.json", "steps.csv", "epochs.csv")
    runs.prepare_run_dir(config, rerun=True)  # nothing left to remove is fine


@pytest.mark.parametrize("left", ["model.pt", "checkpoint.pt"])
def test_a_directory_with_a_trained_file_of_another_run_is_refused(tmp_path, left):
    from e2kd.errors import ConfigError

    out = runs.prepare_run_dir(_config(tmp_path))
    (out / left).write_text("x")
    with pytest.raises(
        ConfigError,
        match=rf"^{out}: run directory holds a different run \(.*train.epochs.*\); train it "
        r"again with --rerun, choose another out_dir \(--out\) or delete it$",
    ):
        runs.prepare_run_dir(_config(tmp_path, epochs=3))
    (out / left).unlink()
    runs.prepare_run_dir(_config(tmp_path, epochs=3))  # nothing trained: taken over
