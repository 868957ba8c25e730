"""Where training logs go: the trackers a config names (``train.loggers``), fanned out.

By default (``train.loggers`` unset) a run writes ``steps.csv`` / ``epochs.csv`` and, when the
``tensorboard`` package is installed, TensorBoard event files. Each tracker's own state (an
MLflow or W&B run id) is kept in the run directory's ``trackers.json``, so a resumed run goes on
logging to the same tracked run.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

from .api import TrackedRun, Tracker
from .storage import atomic_write_json

STATE_FILE = "trackers.json"


def default_loggers() -> list[str]:
    """The trackers of a config that names none: CSV, and TensorBoard when it is installed."""
    return ["csv", *(["tensorboard"] if importlib.util.find_spec("tensorboard") is not None else [])]


class Tracking:
    """Several trackers as one; no trackers (another process than the main one, no run folder): a no-op."""

    def __init__(self, trackers: list[Tracker], folder: Path | None = None, config: dict[str, Any] | None = None):
        self.trackers, self.folder, self.config = trackers, folder, config or {}
        self.started: list[Tracker] = []

    @classmethod
    def named(cls, loggers: list[Any] | None, folder: Path | None, config: dict[str, Any] | None = None) -> Tracking:
        """The trackers ``loggers`` names (registry names or ``{name, options}``; None: the defaults)."""
        from .registry import create

        if folder is None:
            return cls([])
        refs = [{"name": r} if isinstance(r, str) else dict(r) for r in (loggers or default_loggers())]
        return cls([create("tracker", r["name"], r.get("options")) for r in refs], folder, config)

    def start(self, resume_step: int = 0) -> None:
        if self.folder is None:
            return
        path = self.folder / STATE_FILE
        saved = json.loads(path.read_text()) if path.is_file() and resume_step > 0 else {}
        states = {}
        for tracker in self.trackers:
            state = dict(saved.get(tracker.name, {}))
            tracker.start(TrackedRun(self.folder, self.folder.name, self.config, resume_step, state))
            self.started.append(tracker)
            states[tracker.name] = state
        states = {name: state for name, state in states.items() if state}
        if states:
            atomic_write_json(path, states)

    def log_step(self, row: dict[str, float]) -> None:
        for tracker in self.trackers:
            tracker.log_step(row)

    def log_epoch(self, row: dict[str, float]) -> None:
        for tracker in self.trackers:
            tracker.log_epoch(row)

    def log_results(self, results: dict[str, Any]) -> None:
        """metrics.json's evaluation (its ``splits``)."""
        for tracker in self.trackers:
            tracker.log_results(results.get("splits", {}))

    def close(self, failed: bool = False) -> None:
        """Close the trackers that were started (each once); ``failed``: training did not finish."""
        while self.started:
            self.started.pop().close(failed=failed)


def numbers(values: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The numeric leaves of a nested dict, keyed ``a/b/c`` (booleans, lists and text left out)."""
    flat: dict[str, float] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(numbers(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[f"{prefix}{key}"] = float(value)
    return flat
