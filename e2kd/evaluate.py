"""Evaluate a model (and optionally its teacher) with registered metrics."""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from .api import EvalBatch, Explainer, Metric


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
) -> tuple[dict[str, Any], dict[str, str]]:
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
    needs = set().union(*(m.requires for m in metrics.values())) if metrics else set()
    pair_maps = "explanations" in needs and teacher is not None and explainer is not None
    label_maps = "label_explanations" in needs and explainer is not None
    active: dict[str, Metric] | None = None
    skipped: dict[str, str] = {}
    for batch in batches:
        images = batch["image"].to(device)
        labels = _get(batch, "label", device)
        maps = t_maps = None
        if pair_maps:
            logits, t_logits, maps, t_maps = explain_pair(explainer, model, teacher, images)
        else:
            with torch.no_grad():
                logits = model(images)
                t_logits = teacher(images) if teacher is not None else None
        eval_batch = EvalBatch(
            logits=logits, teacher_logits=t_logits, explanations=maps, teacher_explanations=t_maps,
            label_explanations=explainer.explain(model, images, labels) if label_maps and labels is not None else None,
            labels=labels, masks=_get(batch, "mask", device), groups=_get(batch, "group", device),
            images=images, model=model, explainer=explainer,
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


def flatten_metrics(values: dict[str, Any]) -> dict[str, float]:
    """``{"a": 1, "g": {"worst": 2}}`` -> ``{"a": 1, "g.worst": 2}``."""
    flat: dict[str, float] = {}
    for name, value in values.items():
        if isinstance(value, dict):
            flat.update({f"{name}.{k}": v for k, v in flatten_metrics(value).items()})
        else:
            flat[name] = value
    return flat


def _get(batch: dict[str, torch.Tensor], key: str, device: str | torch.device) -> torch.Tensor | None:
    value = batch.get(key)
    return value.to(device) if value is not None else None
