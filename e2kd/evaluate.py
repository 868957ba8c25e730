"""Evaluate a model (and optionally its teacher) with registered metrics."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from .api import EvalBatch, Explainer, Metric


@torch.no_grad()
def _forward(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    return model(images)


def explain_pair(
    explainer: Explainer, model: nn.Module, teacher: nn.Module, images: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits and explanations of model and teacher, both for the teacher's top-1 class."""
    with torch.enable_grad():
        with explainer.capture(model, images, trainable=False) as cap:
            logits = model(cap.inputs)
        with explainer.capture(teacher, images, trainable=False) as t_cap:
            t_logits = teacher(t_cap.inputs)
        target = t_logits.argmax(1)
        maps = cap.explain(logits, target).detach()
        t_maps = t_cap.explain(t_logits, target).detach()
    return logits.detach(), t_logits.detach(), maps, t_maps


def evaluate(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    metrics: dict[str, Metric],
    *,
    teacher: nn.Module | None = None,
    explainer: Explainer | None = None,
    device: str | torch.device = "cpu",
) -> tuple[dict[str, float], dict[str, str]]:
    """Run ``metrics`` over ``batches``; returns (values, skipped metric -> reason).

    A metric whose requirements the data or setting cannot meet is skipped, not failed.
    Explanations are computed only when a metric needs them.
    """
    was_training = model.training
    model.eval()
    if teacher is not None:
        teacher.eval()
    for metric in metrics.values():
        metric.reset()
    need_maps = any("explanations" in m.requires for m in metrics.values()) and teacher is not None and explainer is not None
    active: dict[str, Metric] | None = None
    skipped: dict[str, str] = {}
    for batch in batches:
        images = batch["image"].to(device)
        if need_maps:
            logits, t_logits, maps, t_maps = explain_pair(explainer, model, teacher, images)
        else:
            logits = _forward(model, images)
            t_logits = _forward(teacher, images) if teacher is not None else None
            maps = t_maps = None
        eval_batch = EvalBatch(
            logits=logits, teacher_logits=t_logits, explanations=maps, teacher_explanations=t_maps,
            labels=_get(batch, "label", device), masks=_get(batch, "mask", device), groups=_get(batch, "group", device),
        )
        if active is None:
            have = eval_batch.available()
            active = {}
            for name, metric in metrics.items():
                missing = sorted(metric.requires - have)
                if missing:
                    skipped[name] = f"needs {', '.join(missing)}"
                else:
                    active[name] = metric
        for metric in active.values():
            metric.update(eval_batch)
    model.train(was_training)
    return {name: metric.compute() for name, metric in (active or {}).items()}, skipped


def _get(batch: dict[str, torch.Tensor], key: str, device: str | torch.device) -> torch.Tensor | None:
    value = batch.get(key)
    return value.to(device) if value is not None else None
