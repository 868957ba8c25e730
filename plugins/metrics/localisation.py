"""Localisation of explanations against object masks: energy pointing game and IoU.

Both score the model's map for each **label** class against that class's object mask (the
union of the class's boxes for box-annotated data), one value per (image, present class) pair,
averaged over the pairs. Multi-channel maps are summed over
channels first. Batch-native; the tests and the benchmark compare it with the straightforward
per-sample definitions in ``tests/reference.py``.
"""

from __future__ import annotations

import torch
from pydantic import Field

from e2kd import hookimpl
from e2kd.api import EvalBatch, Metric, PluginOptions

EPS = 1e-7
CHUNK = 2048  # samples per vectorised step (bounds the memory of intermediates)


def _chunks(maps: torch.Tensor, masks: torch.Tensor):
    """(B, N) attribution (channels summed) and float {0, 1} mask (any channel > 0), in chunks of
    samples, from (B, C, H, W) maps and masks."""
    a, m = maps.sum(1).flatten(1), masks.amax(1).flatten(1)
    for start in range(0, a.shape[0], CHUNK):
        yield a[start : start + CHUNK], (m[start : start + CHUNK] > 0).to(a.dtype)


def _dot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Row-wise dot products through a batched matmul (BLAS), the fastest reduction of a product."""
    return (x.unsqueeze(1) @ y.unsqueeze(2)).view(-1)


def energy_pointing_game(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """(B,) share of positive attribution inside the mask; 0 where the positive total < 1e-7."""
    out = []
    for a, m in _chunks(maps, masks):
        pos = torch.relu(a)
        total = pos.sum(1)
        out.append(torch.where(total < EPS, torch.zeros_like(total), _dot(pos, m) / total.clamp_min(EPS)))
    return torch.cat(out)


def explanation_iou(maps: torch.Tensor, masks: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """(B,) IoU of the binarised positive map (min-max normalised, > threshold) with the mask.

    Normalisation: (A+ - min) / (max - min), or A+ / max when max - min < 1e-7 (an all-zero
    map stays zero); the IoU is 0 when the union is empty. Since min and max of A+ = max(A, 0)
    are those of A clamped at 0, the binarisation is ``A > min + threshold * (max - min)``
    (or ``A > threshold * max``), computed without forming A+.
    """
    out = []
    for a, m in _chunks(maps, masks):
        lo = a.amin(1).clamp_min(0)
        hi = a.amax(1).clamp_min(0)
        span = hi - lo
        cut = torch.where(span < EPS, threshold * hi, lo + threshold * span)
        binary = (a > cut[:, None]).to(a.dtype)
        inter = _dot(binary, m)
        union = binary.sum(1) + m.sum(1) - inter
        out.append(torch.where(union > 0, inter / union.clamp_min(1), torch.zeros_like(union)))
    return torch.cat(out)


class EPG(Metric):
    """Energy pointing game: the share of the positive map inside the class's mask, per (image, class)."""

    name = "epg"
    description = (
        "energy pointing game: share of the positive label-class map inside the class's mask, per (image, class)"
    )
    requires = frozenset({"label_explanations", "masks"})
    category = "localisation"

    def per_sample(self, batch: EvalBatch) -> torch.Tensor:
        return energy_pointing_game(batch.label_explanations, batch.label_masks)


class IoUOptions(PluginOptions):
    """Options of the ``explanation_iou`` metric."""

    threshold: float = Field(0.5, gt=0, lt=1, description="binarisation threshold of the min-max normalised map")


class ExplanationIoU(Metric):
    """IoU of the binarised positive map with the object's mask."""

    name = "explanation_iou"
    description = "IoU of the binarised positive label-class map with the object mask"
    Options = IoUOptions
    requires = frozenset({"label_explanations", "masks"})
    category = "localisation"

    def per_sample(self, batch: EvalBatch) -> torch.Tensor:
        return explanation_iou(batch.label_explanations, batch.label_masks, self.options.threshold)


@hookimpl
def register_metrics(register) -> None:
    register(EPG)
    register(ExplanationIoU)
