"""Cosine similarity of flattened explanation maps (the paper's choice)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from e2kd import hookimpl
from e2kd.api import PluginOptions, Similarity
from e2kd.upsampling import upsampled_inner


class CosineOptions(PluginOptions):
    """Options of the ``cosine`` similarity."""

    eps: float = Field(1e-8, gt=0, description="guards against zero norms (PyTorch's default)")


class Cosine(Similarity):
    """Cosine similarity of the maps flattened over C x H x W (the paper's choice)."""

    name = "cosine"
    description = "cosine similarity of maps flattened over C x H x W"
    Options = CosineOptions
    differentiable = True
    higher_is_better = True
    feature_resolution = True

    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return F.cosine_similarity(a.flatten(1), b.flatten(1), dim=1, eps=self.options.eps)

    def upsampled(self, a: torch.Tensor, b: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return gram_cosine(a, b, size, self.options.eps)


def gram_cosine(a: torch.Tensor, b: torch.Tensor, size: tuple[int, int], eps: float) -> torch.Tensor:
    """Cosine of the bilinearly upsampled maps from inner products (:mod:`e2kd.upsampling`); the
    norms' product is clamped at ``eps`` (no infinite gradient for an all-zero map)."""
    norms = (upsampled_inner(a, a, size) * upsampled_inner(b, b, size)).clamp_min(eps * eps).sqrt()
    return upsampled_inner(a, b, size) / norms


@hookimpl
def register_similarities(register) -> None:
    register(Cosine)
