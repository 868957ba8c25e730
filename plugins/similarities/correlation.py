"""Pearson and Spearman correlation of flattened explanation maps."""

from __future__ import annotations

import torch
from pydantic import Field

from e2kd import hookimpl
from e2kd.api import PluginOptions, Similarity
from e2kd.upsampling import centred

from .cosine import gram_cosine


class CorrelationOptions(PluginOptions):
    """Options of the correlation similarities."""

    eps: float = Field(1e-8, gt=0, description="guards against constant maps (their correlation is 0)")


def pearson(a: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
    """Per-sample Pearson correlation of (B, ...) tensors flattened to (B, N)."""
    a = a.flatten(1) - a.flatten(1).mean(dim=1, keepdim=True)
    b = b.flatten(1) - b.flatten(1).mean(dim=1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(eps)


def ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks 0..N-1 along dim 1 of a (B, N) tensor, tied values sharing the mean of their positions
    (as scipy.stats.rankdata's "average" - 1); float64 for float64 input, else float32."""
    values, order = x.sort(dim=1)
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    starts = torch.ones_like(values, dtype=torch.bool)
    starts[:, 1:] = values[:, 1:] != values[:, :-1]
    group = starts.cumsum(1) - 1  # tie group of each sorted position
    position = torch.arange(x.shape[1], dtype=dtype, device=x.device).expand(x.shape[0], -1)
    mean = torch.zeros_like(position).scatter_add_(1, group, position) / torch.zeros_like(position).scatter_add_(
        1, group, torch.ones_like(position)
    )
    return torch.empty_like(position).scatter_(1, order, mean.gather(1, group))


class Pearson(Similarity):
    """Pearson correlation of the maps flattened over C x H x W."""

    name = "pearson"
    description = "Pearson correlation of maps flattened over C x H x W"
    Options = CorrelationOptions
    differentiable = True
    higher_is_better = True
    feature_resolution = True

    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return pearson(a, b, self.options.eps)

    def upsampled(self, a: torch.Tensor, b: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        # bilinear upsampling keeps constants: centring commutes with it
        return gram_cosine(centred(a, size), centred(b, size), size, self.options.eps)


class Spearman(Similarity):
    """Spearman rank correlation of the flattened maps (ties share their mean rank)."""

    name = "spearman"
    description = "Spearman rank correlation of flattened maps (tied values share their mean rank; evaluation only)"
    Options = CorrelationOptions
    differentiable = False
    higher_is_better = True

    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return pearson(ranks(a.flatten(1).detach()), ranks(b.flatten(1).detach()), self.options.eps)


@hookimpl
def register_similarities(register) -> None:
    register(Pearson)
    register(Spearman)
