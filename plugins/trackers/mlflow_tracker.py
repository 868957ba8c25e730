"""``mlflow``: parameters, per-step and per-epoch scalars and the evaluation in an MLflow run.

By default the store is MLflow's embedded local one: the SQLite file ``mlflow.db`` beside the run
directory (sibling runs, e.g. a sweep's, share it; ``mlflow ui --backend-store-uri sqlite:///…``
shows them). MLflow 3 refuses its older ``./mlruns`` file store unless ``MLFLOW_ALLOW_FILE_STORE``
is set, so that is not the default; any tracking URI can be given (``$MLFLOW_TRACKING_URI`` too).
"""

from __future__ import annotations

import os
import re
import time
from typing import Any

from pydantic import Field

from e2kd import hookimpl
from e2kd.api import PluginOptions, TrackedRun, Tracker
from e2kd.errors import ConfigError

_NOT_IN_KEY = re.compile(r"[^\w\-. /]")  # characters MLflow refuses in metric and parameter names


def mlflow_key(key: str) -> str:
    """``key`` with the characters MLflow refuses replaced by ``_`` (``a[b=c]`` -> ``a_b_c_``)."""
    return _NOT_IN_KEY.sub("_", key)


def flat_params(values: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """A nested config as MLflow parameters ``a.b.c`` -> text (at most 6000 characters, MLflow's limit)."""
    params: dict[str, str] = {}
    for key, value in values.items():
        if isinstance(value, dict) and value:
            params.update(flat_params(value, f"{prefix}{key}."))
        else:
            params[mlflow_key(f"{prefix}{key}")] = str(value)[:6000]
    return params


class MlflowOptions(PluginOptions):
    """Options of the ``mlflow`` tracker."""

    tracking_uri: str | None = Field(
        None, description="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite mlflow.db beside the run)"
    )
    experiment: str = Field("e2kd", min_length=1, description="MLflow experiment name")
    every: int = Field(1, ge=1, description="log the scalars of every N-th step (epochs and results always)")


class MlflowTracker(Tracker):
    """Logs to an MLflow run named after the run directory (resumed with it)."""

    name = "mlflow"
    description = "an MLflow run (default store: sqlite mlflow.db beside the run directory; extra: mlflow)"
    Options = MlflowOptions

    def start(self, run: TrackedRun) -> None:
        try:
            from mlflow.entities import Param
            from mlflow.exceptions import MlflowException
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise ConfigError("train.loggers: mlflow needs the mlflow package (pip install 'e2kd[mlflow]')") from None
        self.uri = (
            self.options.tracking_uri
            or os.environ.get("MLFLOW_TRACKING_URI")
            or f"sqlite:///{(run.folder.parent / 'mlflow.db').resolve()}"
        )
        self.client = MlflowClient(self.uri)
        self.run_id = run.state.get("run_id")
        if self.run_id is not None:
            try:
                self.client.get_run(self.run_id)
                self.client.update_run(self.run_id, status="RUNNING")
            except MlflowException:
                self.run_id = None  # that store no longer has the run: start a new one
        if self.run_id is None:
            experiment = self.client.get_experiment_by_name(self.options.experiment)
            experiment_id = (
                experiment.experiment_id if experiment else self.client.create_experiment(self.options.experiment)
            )
            self.run_id = self.client.create_run(experiment_id, run_name=run.name).info.run_id
            params = [Param(k, v) for k, v in flat_params(run.config).items()]
            for i in range(0, len(params), 100):  # MLflow takes at most 100 parameters per batch
                self.client.log_batch(self.run_id, params=params[i : i + 100])
            run.state["run_id"] = self.run_id
        self.last_step = run.resume_step

    def _log(self, values: dict[str, float], step: int, prefix: str) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(mlflow_key(f"{prefix}{k}"), float(v), now, step) for k, v in values.items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def log_step(self, row: dict[str, float]) -> None:
        self.last_step = int(row["step"])
        if self.last_step % self.options.every == 0:
            self._log({k: v for k, v in row.items() if k != "step"}, self.last_step, "step/")

    def log_epoch(self, row: dict[str, float]) -> None:
        self._log({k: v for k, v in row.items() if k not in ("epoch", "last_step")}, int(row["epoch"]), "epoch/")

    def log_results(self, results: dict) -> None:
        from e2kd.tracking import numbers

        self._log(numbers(results), self.last_step, "")

    def close(self, failed: bool = False) -> None:
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


@hookimpl
def register_trackers(register) -> None:
    register(MlflowTracker)
