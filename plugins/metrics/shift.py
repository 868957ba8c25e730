"""Shift equivariance of explanations: does the map move with the image?

For diagonal shifts of 0..max_shift pixels, the image is translated down-right (vacated
pixels are zero) and explained for the class the model predicts on the unshifted image;
the score is the cosine similarity, per sample, between the shifted image's map and the
unshifted map on their overlapping region. One value per shift: a curve per model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from e2kd import hookimpl
from e2kd.api import EvalBatch, Metric, PluginOptions


class ShiftOptions(PluginOptions):
    """Options of the ``shift_equivariance`` metric."""

    max_shift: int = Field(8, ge=1, description="largest diagonal shift in pixels")
    step: int = Field(1, ge=1, description="shift increment in pixels")


def shift_diagonal(x: torch.Tensor, t: int) -> torch.Tensor:
    """Translate (B, C, H, W) images down-right by t pixels, filling with zeros."""
    if t == 0:
        return x
    out = torch.zeros_like(x)
    out[..., t:, t:] = x[..., :-t, :-t]
    return out


def overlap_cosine(shifted_maps: torch.Tensor, maps: torch.Tensor, t: int) -> torch.Tensor:
    """(B,) cosine between the shifted image's map and the original map where both see the same pixels."""
    h, w = maps.shape[-2:]
    a, b = shifted_maps[..., t:, t:], maps[..., : h - t, : w - t]
    return F.cosine_similarity(a.flatten(1), b.flatten(1), dim=1, eps=1e-8)


class ShiftEquivariance(Metric):
    """Cosine of the explanations of shifted images on their overlap, per shift (a curve)."""

    name = "shift_equivariance"
    description = "cosine of explanations on the overlap after diagonal shifts of 0..max_shift px (a curve)"
    Options = ShiftOptions
    requires = frozenset({"model"})
    category = "robustness"

    def shifts(self) -> list[int]:
        return list(range(0, self.options.max_shift + 1, self.options.step))

    def reset(self) -> None:
        self._sums = {t: 0.0 for t in self.shifts()}
        self._count = 0

    def update(self, batch: EvalBatch) -> None:
        x, target = batch.images, batch.logits.argmax(1)
        maps = batch.explain(x, target)
        for t in self.shifts():
            shifted = batch.explain(shift_diagonal(x, t), target) if t else maps
            self._sums[t] += float(overlap_cosine(shifted, maps, t).double().sum())
        self._count += x.shape[0]

    def compute(self) -> dict[str, float]:
        return {f"shift_{t}": s / self._count for t, s in self._sums.items()} if self._count else {}


@hookimpl
def register_metrics(register) -> None:
    register(ShiftEquivariance)
