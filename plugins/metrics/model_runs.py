"""What every metric that runs the evaluated model shares: the explained class and its maps."""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import BaseModel, Field

from e2kd.api import EvalBatch, Metric, PluginOptions


class ModelRunOptions(PluginOptions):
    """Options every metric that runs the model shares."""

    target: Literal["predicted", "teacher"] = Field(
        "predicted",
        description="explained class: the model's own top-1, or the teacher's top-1 (needs a teacher)",
    )
    chunk: int | None = Field(
        None,
        ge=1,
        description="images per model forward: several perturbation steps of a batch together (default: one step, "
        "the evaluated batch; larger helps a GPU, and on a CPU is often slower per image)",
    )


class ModelRunMetric(Metric):
    """A metric that runs the evaluated model (requirement ``model``, plus ``teacher`` when the
    explained class is the teacher's)."""

    Options = ModelRunOptions
    requires = frozenset({"model"})

    def __init__(self, options: BaseModel | None = None, **kwargs: Any) -> None:
        super().__init__(options, **kwargs)
        if self.options.target == "teacher":  # type: ignore[attr-defined]
            self.requires = frozenset({"model", "teacher"})  # type: ignore[misc]

    def explained(self, batch: EvalBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """The classes explained (the ``target`` option) and the model's maps for them (the batch's
        own maps when they are the teacher's top-1 already)."""
        if self.options.target == "teacher":  # type: ignore[attr-defined]
            classes = batch.teacher_logits.argmax(1)  # type: ignore[union-attr]
            if batch.explanations is not None:
                return classes, batch.explanations
        else:
            classes = batch.logits.argmax(1)
        return classes, batch.explain(batch.images, classes)  # type: ignore[misc]
