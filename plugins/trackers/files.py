"""``csv`` (steps.csv / epochs.csv in the run directory) and ``tensorboard`` (event files under
``tensorboard/``): the logs every run had before trackers were plugins."""

from __future__ import annotations

import csv
from pathlib import Path

from e2kd import hookimpl
from e2kd.api import TrackedRun, Tracker
from e2kd.errors import ConfigError


class CsvTracker(Tracker):
    """``steps.csv`` and ``epochs.csv`` in the run directory (rows after a resumed checkpoint dropped)."""

    name = "csv"
    description = "steps.csv and epochs.csv in the run directory"

    def start(self, run: TrackedRun) -> None:
        self.folder = run.folder
        for name, key in (("steps.csv", "step"), ("epochs.csv", "last_step")):  # drop rows after the checkpoint
            path = run.folder / name
            if path.is_file():
                with path.open(newline="") as handle:
                    rows = list(csv.DictReader(handle))
                kept = [r for r in rows if int(float(r[key])) <= run.resume_step]
                if len(kept) != len(rows):
                    self._write(path, kept, mode="w")

    @staticmethod
    def _write(path: Path, rows: list[dict], mode: str = "a") -> None:
        if not rows:
            if mode == "w":
                path.unlink(missing_ok=True)
            return
        new = mode == "w" or not path.is_file()
        with path.open(mode, newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            if new:
                writer.writeheader()
            writer.writerows(rows)

    def log_step(self, row: dict[str, float]) -> None:
        self._write(self.folder / "steps.csv", [row])

    def log_epoch(self, row: dict[str, float]) -> None:
        self._write(self.folder / "epochs.csv", [row])


class TensorBoardTracker(Tracker):
    """TensorBoard event files under ``tensorboard/`` (``step/<scalar>``, ``epoch/<scalar>``, ``<split>/<metric>``)."""

    name = "tensorboard"
    description = "TensorBoard event files under tensorboard/ in the run directory (extra: tensorboard)"

    def start(self, run: TrackedRun) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError(
                "train.loggers: tensorboard needs the tensorboard package (pip install 'e2kd[tensorboard]')"
            ) from None
        purge = run.resume_step + 1 if run.resume_step else None  # events after the checkpoint are replaced
        self.writer = SummaryWriter(str(run.folder / "tensorboard"), purge_step=purge)
        self.last_step = 0

    def log_step(self, row: dict[str, float]) -> None:
        self.last_step = int(row["step"])
        for key, value in row.items():
            if key != "step":
                self.writer.add_scalar(f"step/{key}", value, self.last_step)

    def log_epoch(self, row: dict[str, float]) -> None:
        for key, value in row.items():
            if key not in ("epoch", "last_step"):
                self.writer.add_scalar(f"epoch/{key}", value, int(row["epoch"]))

    def log_results(self, results: dict) -> None:
        from e2kd.tracking import numbers

        for key, value in numbers(results).items():
            self.writer.add_scalar(key, value, self.last_step)

    def close(self, failed: bool = False) -> None:
        self.writer.close()


@hookimpl
def register_trackers(register) -> None:
    register(CsvTracker)
    register(TensorBoardTracker)
