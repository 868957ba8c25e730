"""Trackers (``train.loggers``): a tiny run logs to MLflow's local store and to an offline W&B run,
and what each library's own reader gets back equals steps.csv, epochs.csv and metrics.json."""

from __future__ import annotations

import csv
import json
import struct
import sys
import time
from pathlib import Path

import pytest

from e2kd.config import load_config_dict
from e2kd.errors import ConfigError
from e2kd.experiment import train_teacher
from e2kd.tracking import STATE_FILE, Tracking, numbers

from .conftest import TINY


def _train(tmp_path: Path, loggers: list, name: str = "run") -> Path:
    config = load_config_dict({**TINY, "train": {**TINY["train"], "loggers": loggers}, "out_dir": str(tmp_path / name)})
    train_teacher(config)
    return tmp_path / name


def _csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_mlflow_store_holds_the_runs_steps_epochs_results_and_config(tmp_path):
    from mlflow.tracking import MlflowClient

    out = _train(tmp_path, ["csv", {"name": "mlflow", "options": {"experiment": "tiny"}}])
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")  # the default store: beside the run directory
    [run] = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert run.info.run_name == "run" and run.info.status == "FINISHED"
    assert json.loads((out / STATE_FILE).read_text()) == {"mlflow": {"run_id": run.info.run_id}}
    steps = _csv(out / "steps.csv")
    history = client.get_metric_history(run.info.run_id, "step/loss")
    assert [(m.step, m.value) for m in history] == [(int(r["step"]), float(r["loss"])) for r in steps]
    epochs = _csv(out / "epochs.csv")
    history = client.get_metric_history(run.info.run_id, "epoch/loss")
    assert [(m.step, m.value) for m in history] == [(int(r["epoch"]), float(r["loss"])) for r in epochs]
    results = json.loads((out / "metrics.json").read_text())["splits"]
    assert {k: run.data.metrics[k] for k in numbers(results)} == numbers(results)
    assert run.data.params["train.lr"] == "0.001" and run.data.params["model.name"] == "small_resnet"
    assert not {"step/step", "epoch/epoch", "epoch/last_step"} & set(run.data.metrics)  # counters are the axes


def test_a_resumed_run_logs_to_the_same_mlflow_run(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'store.db'}"
    folder = tmp_path / "r"
    folder.mkdir()
    first = Tracking.named([{"name": "mlflow", "options": {"tracking_uri": uri, "every": 2}}], folder, {"seed": 1})
    first.start()
    for step in (1, 2, 3, 4):
        first.log_step({"step": step, "loss": 1 / step})
    first.close()
    again = Tracking.named([{"name": "mlflow", "options": {"tracking_uri": uri, "every": 2}}], folder, {"seed": 1})
    again.start(resume_step=4)
    client = MlflowClient(uri)
    assert client.get_run(json.loads((folder / STATE_FILE).read_text())["mlflow"]["run_id"]).info.status == "RUNNING"
    before = time.time() * 1000
    again.log_step({"step": 6, "loss": 0.125})
    again.log_results({"splits": {"test": {"accuracy": 0.5, "explanation_similarity[similarity=ssim]": 0.25}}})
    again.close()
    client = MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name("e2kd").experiment_id])
    history = client.get_metric_history(run.info.run_id, "step/loss")
    assert [(m.step, m.value) for m in history] == [(2, 0.5), (4, 0.25), (6, 0.125)]  # every second step
    assert before - 1 <= history[-1].timestamp <= time.time() * 1000 + 1  # milliseconds since the epoch
    assert run.data.metrics["test/explanation_similarity_similarity_ssim_"] == 0.25  # a key MLflow accepts


def _wandb_records(path: Path) -> list:
    """The records of a W&B ``.wandb`` run file: a 7-byte header, then LevelDB-log blocks of 32 KiB whose
    records (7-byte header: CRC, length, type FULL/FIRST/MIDDLE/LAST) carry protobuf ``Record``s."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, position, pending, records = path.read_bytes(), 7, b"", []
    assert data[:4] == b":W&B"
    while position + 7 <= len(data):
        left = 32768 - position % 32768
        if left < 7:  # the block's tail is padding
            position += left
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        if length == 0 and kind == 0:
            break
        pending += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def _key(item) -> str:
    """An item's key: W&B stores keys with a '/' as their parts (nested_key)."""
    return item.key or "/".join(item.nested_key)


def test_wandb_offline_writes_a_run_file_with_the_steps_and_results(tmp_path):
    out = _train(tmp_path, ["csv", "wandb"])
    [run_file] = (out / "wandb").glob("offline-run-*/run-*.wandb")
    run_id = json.loads((out / STATE_FILE).read_text())["wandb"]["id"]
    assert run_file.name == f"run-{run_id}.wandb"
    records = _wandb_records(run_file)
    history = [
        {_key(item): json.loads(item.value_json) for item in r.history.item}
        for r in records
        if r.WhichOneof("record_type") == "history"
    ]
    steps = _csv(out / "steps.csv")
    logged = [(h["_step"], h["step/loss"]) for h in history if "step/loss" in h]
    assert logged == [(int(r["step"]), pytest.approx(float(r["loss"]))) for r in steps]
    epochs = [h for h in history if "epoch/loss" in h]
    assert [(h["_step"], h["epoch/epoch"]) for h in epochs] == [
        (int(r["last_step"]), int(r["epoch"])) for r in _csv(out / "epochs.csv")
    ]
    summary = {}
    for r in records:
        if r.WhichOneof("record_type") == "summary":
            summary.update({_key(item): json.loads(item.value_json) for item in r.summary.update})
    results = numbers(json.loads((out / "metrics.json").read_text())["splits"])
    assert {k: summary[k] for k in results} == pytest.approx(results)
    assert not any("step/step" in h or "epoch/last_step" in h for h in history)  # counters are the axes, not values
    [run] = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert (run.project, run.display_name, run.run_id) == ("e2kd", "run", run_id)
    config = run.config
    logged_config = {item.key: json.loads(item.value_json) for item in config.update}
    assert logged_config["train"]["lr"] == 0.001 and logged_config["seed"] == 0


def test_default_loggers_are_csv_and_tensorboard_when_installed(tmp_path, monkeypatch):
    import importlib.util

    from e2kd.tracking import default_loggers

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "tensorboard" else real(name))
    assert default_loggers() == ["csv"]
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object() if name == "tensorboard" else real(name))
    assert default_loggers() == ["csv", "tensorboard"]
    assert [t.name for t in Tracking.named(None, tmp_path).trackers] == ["csv", "tensorboard"]
    assert Tracking.named(["mlflow"], None).trackers == []  # not the main process: nothing logs


@pytest.mark.parametrize("name, extra", [("mlflow", "mlflow"), ("wandb", "wandb"), ("tensorboard", "tensorboard")])
def test_a_tracker_whose_package_is_missing_is_one_line_naming_the_extra(tmp_path, monkeypatch, name, extra):
    for module in (
        "mlflow",
        "mlflow.tracking",
        "mlflow.entities",
        "mlflow.exceptions",
        "wandb",
        "torch.utils.tensorboard",
    ):
        monkeypatch.setitem(sys.modules, module, None)
    tracking = Tracking.named([name], tmp_path)
    with pytest.raises(ConfigError) as caught:
        tracking.start()
    assert str(caught.value) == f"train.loggers: {name} needs the {extra} package (pip install 'e2kd[{extra}]')"
    tracking.close()  # nothing was started: nothing to close


def test_loggers_are_checked_at_load_and_do_not_change_a_runs_identity():
    from e2kd.runs import identity_digest

    with pytest.raises(
        ConfigError, match=r"^config: train.loggers.1.name: unknown tracker 'mlfow'; did you mean 'mlflow'\?"
    ):
        load_config_dict({**TINY, "train": {**TINY["train"], "loggers": ["csv", "mlfow"]}})
    with pytest.raises(
        ConfigError, match=r"^config: train.loggers.0.options.mode: Input should be 'offline', 'online'"
    ):
        load_config_dict({**TINY, "train": {**TINY["train"], "loggers": [{"name": "wandb", "options": {"mode": "x"}}]}})
    plain = load_config_dict(TINY)
    logged = load_config_dict({**TINY, "train": {**TINY["train"], "loggers": ["csv", "wandb"]}})
    assert identity_digest(plain) == identity_digest(logged)


def test_a_fresh_start_does_not_take_over_a_saved_tracked_run(tmp_path):
    from e2kd.api import Tracker

    seen = []

    class Probe(Tracker):
        name = "probe"
        description = "records the state it starts with"

        def start(self, run):
            seen.append(dict(run.state))
            run.state.setdefault("id", f"run{len(seen)}")

    (tmp_path / STATE_FILE).write_text(json.dumps({"probe": {"id": "old"}}))
    Tracking([Probe()], tmp_path).start(resume_step=0)  # a new run (--rerun, or the first start)
    Tracking([Probe()], tmp_path).start(resume_step=1)  # resumed after its first step
    assert seen == [{}, {"id": "run1"}]


def test_mlflow_runs_share_a_store_and_start_over_when_theirs_is_gone(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'env.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # the store when the options name none
    config = {f"group{i}": {f"key{j}": j for j in range(30)} for i in range(8)}  # 240 parameters
    config["long"] = "x" * 7000
    ids = []
    for name in ("a", "b"):  # two runs in one experiment: the second finds it
        folder = tmp_path / name
        folder.mkdir()
        tracking = Tracking.named(["mlflow"], folder, config)
        tracking.start(resume_step=3)  # nothing saved: a new MLflow run, which logs results at the step resumed from
        tracking.log_results({"splits": {"val": {"accuracy": 0.5}}})
        tracking.log_epoch({"epoch": 1, "last_step": 3, "loss": 0.2})
        tracking.close()
        ids.append(json.loads((folder / STATE_FILE).read_text())["mlflow"]["run_id"])
    client = MlflowClient(uri)
    run = client.get_run(ids[0])
    assert len(run.data.params) == 241 and run.data.params["group7.key29"] == "29"
    assert run.data.params["long"] == "x" * 6000  # MLflow's limit
    assert [(m.step, m.value) for m in client.get_metric_history(ids[0], "val/accuracy")] == [(3, 0.5)]
    assert set(run.data.metrics) == {"val/accuracy", "epoch/loss"}  # the counters are axes, not metrics
    (tmp_path / "a" / STATE_FILE).write_text(json.dumps({"mlflow": {"run_id": "0" * 32}}))  # a run the store lacks
    tracking = Tracking.named(["mlflow"], tmp_path / "a", {})
    tracking.start(resume_step=5)
    tracking.close()
    new_id = json.loads((tmp_path / "a" / STATE_FILE).read_text())["mlflow"]["run_id"]
    assert new_id not in ("0" * 32, *ids) and client.get_run(new_id).info.status == "FINISHED"


def test_wandb_resumes_its_run_and_records_tags(tmp_path):
    folder = tmp_path / "w"
    folder.mkdir()
    options = {"name": "wandb", "options": {"tags": ["ablation"], "project": "p"}}
    first = Tracking.named([options], folder, {"seed": 0})
    first.start()
    first.log_step({"step": 1, "loss": 1.0})
    first.close()
    saved = json.loads((folder / STATE_FILE).read_text())["wandb"]["id"]
    again = Tracking.named([options], folder, {"seed": 0})
    again.start(resume_step=1)
    again.log_results({"splits": {"val": {"accuracy": 0.75}}})  # before any new step: at the step resumed from
    again.close()
    assert json.loads((folder / STATE_FILE).read_text())["wandb"]["id"] == saved
    files = sorted((folder / "wandb").glob("offline-run-*/run-*.wandb"))
    assert [f.name for f in files] == [f"run-{saved}.wandb"] * 2  # the same run, continued
    [run] = [r.run for r in _wandb_records(files[0]) if r.WhichOneof("record_type") == "run"]
    assert list(run.tags) == ["ablation"] and run.project == "p"


def test_a_run_that_fails_is_marked_failed_not_finished(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from e2kd import experiment

    def fail(*args, **kwargs):
        raise RuntimeError("evaluation failed")

    monkeypatch.setattr(experiment, "_finish", fail)
    with pytest.raises(RuntimeError, match="evaluation failed"):
        _train(tmp_path, ["csv", "mlflow", "wandb"])
    state = json.loads((tmp_path / "run" / STATE_FILE).read_text())
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert client.get_run(state["mlflow"]["run_id"]).info.status == "FAILED"
    [run_file] = (tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb")
    [exit_record] = [r.exit for r in _wandb_records(run_file) if r.WhichOneof("record_type") == "exit"]
    assert exit_record.exit_code == 1
    monkeypatch.undo()
    _train(tmp_path, ["csv", "mlflow", "wandb"], name="ok")
    state = json.loads((tmp_path / "ok" / STATE_FILE).read_text())
    assert client.get_run(state["mlflow"]["run_id"]).info.status == "FINISHED"
    [run_file] = (tmp_path / "ok" / "wandb").glob("offline-run-*/run-*.wandb")
    assert [r.exit.exit_code for r in _wandb_records(run_file) if r.WhichOneof("record_type") == "exit"] == [0]
