"""Accuracy against labels and top-1 agreement with the teacher."""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from e2kd import hookimpl
from e2kd.api import EvalBatch, Metric


class AccuracyOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    top_k: int = Field(1, ge=1, description="a sample counts as correct if its label is among the k highest logits")


class Accuracy(Metric):
    name = "accuracy"
    description = "top-k accuracy against the labels"
    Options = AccuracyOptions
    requires = frozenset({"labels"})

    def per_sample(self, batch: EvalBatch) -> torch.Tensor:
        k = min(self.options.top_k, batch.logits.shape[1])
        top = batch.logits.topk(k, dim=1).indices
        return (top == batch.labels.view(-1, 1)).any(dim=1).float()


class Agreement(Metric):
    name = "agreement"
    description = "fraction of samples whose top-1 class equals the teacher's"
    requires = frozenset({"teacher"})

    def per_sample(self, batch: EvalBatch) -> torch.Tensor:
        return (batch.logits.argmax(1) == batch.teacher_logits.argmax(1)).float()


@hookimpl
def register_metrics(register) -> None:
    register(Accuracy)
    register(Agreement)
