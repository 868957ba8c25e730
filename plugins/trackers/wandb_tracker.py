"""``wandb``: a Weights & Biases run, offline by default (files under ``wandb/`` in the run directory,
uploaded later with ``wandb sync``); ``mode: online`` logs live (needs ``wandb login``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from e2kd import hookimpl
from e2kd.api import PluginOptions, TrackedRun, Tracker
from e2kd.errors import ConfigError


class WandbOptions(PluginOptions):
    """Options of the ``wandb`` tracker."""

    project: str = Field("e2kd", min_length=1, description="W&B project")
    entity: str | None = Field(None, description="W&B entity (user or team; default: yours)")
    mode: Literal["offline", "online", "disabled"] = Field("offline", description="offline: sync later")
    tags: list[str] = Field(default_factory=list, description="run tags")


class WandbTracker(Tracker):
    """Logs to a W&B run named after the run directory (resumed with it); steps are the global step."""

    name = "wandb"
    description = "a Weights & Biases run, offline by default (files under wandb/; extra: wandb)"
    Options = WandbOptions

    def start(self, run: TrackedRun) -> None:
        try:
            import wandb
        except ImportError:
            raise ConfigError("train.loggers: wandb needs the wandb package (pip install 'e2kd[wandb]')") from None
        o = self.options
        self.run = wandb.init(
            project=o.project,
            entity=o.entity,
            name=run.name,
            dir=str(run.folder),
            mode=o.mode,
            config=run.config,
            tags=o.tags or None,
            id=run.state.get("id"),
            resume="allow",
            reinit="create_new",
            settings=wandb.Settings(console="off", silent=True),
        )
        run.state["id"] = self.run.id

    def log_step(self, row: dict[str, float]) -> None:
        self.run.log({f"step/{k}": v for k, v in row.items() if k != "step"}, step=int(row["step"]))

    def log_epoch(self, row: dict[str, float]) -> None:
        # on the step axis (W&B's steps only increase): the epoch's means at its last step
        values = {f"epoch/{k}": v for k, v in row.items() if k not in ("epoch", "last_step")}
        self.run.log({**values, "epoch/epoch": row["epoch"]}, step=int(row["last_step"]))

    def log_results(self, results: dict) -> None:
        from e2kd.tracking import numbers

        self.run.summary.update(numbers(results))

    def close(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)


@hookimpl
def register_trackers(register) -> None:
    register(WandbTracker)
