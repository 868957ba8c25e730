"""Micro-averaged F1 for multi-label classification (a class is predicted when its logit > 0)."""

from __future__ import annotations

import torch.nn.functional as F

from e2kd import hookimpl
from e2kd.api import EvalBatch, Metric


class MicroF1(Metric):
    """Micro-averaged F1 of logits > 0 against multi-hot labels."""

    name = "micro_f1"
    description = "micro-averaged F1 of logits > 0 against multi-hot labels (class indices are one-hot encoded)"
    requires = frozenset({"labels"})

    def reset(self) -> None:
        self._tp = self._fp = self._fn = 0.0

    def update(self, batch: EvalBatch) -> None:
        labels = batch.labels
        if labels.dim() == 1:
            labels = F.one_hot(labels, batch.logits.shape[1])
        truth, pred = labels > 0.5, batch.logits > 0
        self._tp += float((pred & truth).sum())
        self._fp += float((pred & ~truth).sum())
        self._fn += float((~pred & truth).sum())

    def compute(self) -> float:
        denom = 2 * self._tp + self._fp + self._fn
        return 2 * self._tp / denom if denom else float("nan")


@hookimpl
def register_metrics(register) -> None:
    register(MicroF1)
