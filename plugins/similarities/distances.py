"""Distances between explanation maps seen as distributions (lower is better)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field

from e2kd import hookimpl
from e2kd.api import PluginOptions, Similarity


class NormalisedOptions(PluginOptions):
    """Options of the ``l1`` and ``l2`` distances."""

    eps: float = Field(1e-12, gt=0, description="guards against all-zero maps")


def unit_sum(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Flatten to (B, N) and divide by the sum of absolute values (= unit sum for maps >= 0)."""
    x = x.flatten(1)
    return x / x.abs().sum(dim=1, keepdim=True).clamp_min(eps)


class L1(Similarity):
    """L1 distance between maps normalised to unit sum (lower is better)."""

    name = "l1"
    description = "L1 distance between maps normalised to unit sum (lower is better)"
    Options = NormalisedOptions
    higher_is_better = False

    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (unit_sum(a, self.options.eps) - unit_sum(b, self.options.eps)).abs().sum(1)


class L2(Similarity):
    """L2 distance between maps normalised to unit sum (lower is better)."""

    name = "l2"
    description = "L2 distance between maps normalised to unit sum (lower is better)"
    Options = NormalisedOptions
    higher_is_better = False

    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        diff = unit_sum(a, self.options.eps) - unit_sum(b, self.options.eps)
        return diff.pow(2).sum(1).clamp_min(1e-30).sqrt()


class JSDOptions(PluginOptions):
    """Options of the ``jsd`` divergence."""

    temperature: float = Field(
        1.0,
        gt=0,
        description="softmax temperature over the pixels, applied to maps scaled to unit maximum absolute value",
    )
    eps: float = Field(1e-12, gt=0, description="guards against all-zero maps")


def unit_max(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Flatten to (B, N) and divide by the largest absolute value, so a softmax sees the map's shape,
    not its scale (Grad-CAM values of ~1e-2 would otherwise look nearly uniform)."""
    x = x.flatten(1)
    return x / x.abs().amax(dim=1, keepdim=True).clamp_min(eps)


class JensenShannon(Similarity):
    """Jensen-Shannon divergence of the maps' spatial softmax distributions (lower is better)."""

    name = "jsd"
    description = (
        "Jensen-Shannon divergence of spatial softmax distributions of scale-normalised maps (nats; lower is better)"
    )
    Options = JSDOptions
    higher_is_better = False

    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        t, eps = self.options.temperature, self.options.eps
        log_p = F.log_softmax(unit_max(a, eps) / t, dim=1)
        log_q = F.log_softmax(unit_max(b, eps) / t, dim=1)
        log_m = torch.logaddexp(log_p, log_q) - math.log(2.0)
        kl_pm = (log_p.exp() * (log_p - log_m)).sum(1)
        kl_qm = (log_q.exp() * (log_q - log_m)).sum(1)
        return 0.5 * (kl_pm + kl_qm)


@hookimpl
def register_similarities(register) -> None:
    register(L1)
    register(L2)
    register(JensenShannon)
