"""A small API for interactive use: load runs, explain, compare, show.

import e2kd
run = e2kd.load_run("demo_out/e2kd_seed0")
images, labels = e2kd.sample_images(run.split("test_ood"))
maps = {"teacher": e2kd.explain(run.teacher, images), "student": e2kd.explain(run.model, images)}
e2kd.compare(maps["student"], maps["teacher"])      # {"cosine": ..., "pearson": ..., ...}
e2kd.show(images, maps, labels=labels, class_names=run.class_names)   # a matplotlib Figure
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .models import module_device
from .registry import get_explainer, get_similarity
from .report import sample_images
from .runs import LoadedRun, load_run
from .viz import plot_explanations

DEFAULT_SIMILARITIES = ("cosine", "pearson", "spearman", "ssim", "topk_overlap", "l1", "jsd")

__all__ = ["LoadedRun", "load_run", "sample_images", "explain", "compare", "show"]


def explain(
    model: nn.Module,
    images: torch.Tensor,
    explainer: str = "gradcam",
    target: torch.Tensor | int | None = None,
    **options: Any,
) -> torch.Tensor:
    """Explanations (B, C, H, W) of ``model`` for ``target`` (default: its top-1 class), detached.

    ``images`` are moved to the model's device."""
    return get_explainer(explainer, **options).explain(model.eval(), images.to(module_device(model)), target)


def compare(a: torch.Tensor, b: torch.Tensor, similarities: Sequence[str] = DEFAULT_SIMILARITIES) -> dict[str, float]:
    """Mean similarity of two explanation batches under each named similarity."""
    return {name: float(get_similarity(name)(a, b).mean()) for name in similarities}


def show(
    images: torch.Tensor,
    maps: dict[str, torch.Tensor],
    *,
    labels: torch.Tensor | None = None,
    models: dict[str, nn.Module] | None = None,
    class_names: Sequence[str] | None = None,
    title: str | None = None,
):
    """A Figure: the images, then each named map over them; ``models`` adds their predictions,
    ``class_names`` (e.g. ``run.class_names``) names the classes."""
    predictions = None
    if models:
        with torch.no_grad():
            predictions = {name: m.eval()(images.to(module_device(m))).argmax(1) for name, m in models.items()}
    return plot_explanations(
        images, maps, None, labels=labels, predictions=predictions, class_names=class_names, title=title
    )
