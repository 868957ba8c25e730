"""Accuracy against labels, top-1 agreement with the teacher, KL(teacher || model)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from e2kd import hookimpl
from e2kd.api import EvalBatch, Metric, PluginOptions


class AccuracyOptions(PluginOptions):
    """Options of the ``accuracy`` metric."""

    top_k: int = Field(1, ge=1, description="a sample counts as correct if its label is among the k highest logits")


class Accuracy(Metric):
    """Top-k accuracy against single labels."""

    name = "accuracy"
    description = "top-k accuracy against the labels"
    Options = AccuracyOptions
    requires = frozenset({"labels", "single_label"})

    def per_sample(self, batch: EvalBatch) -> torch.Tensor:
        k = min(self.options.top_k, batch.logits.shape[1])
        top = batch.logits.topk(k, dim=1).indices
        return (top == batch.labels.view(-1, 1)).any(dim=1).float()


class Agreement(Metric):
    """Fraction of samples whose top-1 class is the teacher's."""

    name = "agreement"
    description = "fraction of samples whose top-1 class equals the teacher's"
    requires = frozenset({"teacher"})

    category = "agreement"

    def per_sample(self, batch: EvalBatch) -> torch.Tensor:
        return (batch.logits.argmax(1) == batch.teacher_logits.argmax(1)).float()


class KLOptions(PluginOptions):
    """Options of the ``kl_divergence`` metric."""

    temperature: float = Field(1.0, gt=0, description="softmax temperature of both distributions")


class KLDivergence(Metric):
    """KL(p_teacher || p_model) of the predictive distributions, in nats."""

    name = "kl_divergence"
    description = "KL(p_teacher || p_model) of the predictive distributions, in nats (lower is better)"
    Options = KLOptions
    requires = frozenset({"teacher"})
    higher_is_better = False
    category = "agreement"

    def per_sample(self, batch: EvalBatch) -> torch.Tensor:
        t = self.options.temperature
        log_p = F.log_softmax(batch.teacher_logits.double() / t, dim=1)
        log_q = F.log_softmax(batch.logits.double() / t, dim=1)
        return (log_p.exp() * (log_p - log_q)).sum(1)


@hookimpl
def register_metrics(register) -> None:
    register(Accuracy)
    register(Agreement)
    register(KLDivergence)
