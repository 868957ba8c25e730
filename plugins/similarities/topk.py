"""Overlap of the most important pixels of two maps."""

from __future__ import annotations

import torch
from pydantic import Field

from e2kd import hookimpl
from e2kd.api import PluginOptions, Similarity


class TopKOptions(PluginOptions):
    """Options of the ``topk_overlap`` similarity."""

    percent: float = Field(10.0, gt=0, le=100, description="share of pixels (of C x H x W) kept from each map")


def topk_mask(x: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean (B, N) mask of the k largest entries of each flattened sample (ties by position)."""
    flat = x.flatten(1)
    mask = torch.zeros_like(flat, dtype=torch.bool)
    return mask.scatter_(1, flat.topk(k, dim=1).indices, True)


class TopKOverlap(Similarity):
    """IoU of the top-k % pixels of the two maps."""

    name = "topk_overlap"
    description = "IoU of the top-k% pixels of the two maps (evaluation only)"
    Options = TopKOptions
    differentiable = False
    higher_is_better = True

    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        n = a[0].numel()
        k = max(1, round(n * self.options.percent / 100))
        ma, mb = topk_mask(a.detach(), k), topk_mask(b.detach(), k)
        return (ma & mb).sum(1).float() / (ma | mb).sum(1).float()


@hookimpl
def register_similarities(register) -> None:
    register(TopKOverlap)
