"""Structural similarity (Wang et al., 2004) of explanation maps."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field

from e2kd import hookimpl
from e2kd.api import PluginOptions, Similarity


class SSIMOptions(PluginOptions):
    """Options of the ``ssim`` similarity."""

    window: int = Field(7, ge=2, description="side of the uniform window (clipped to the map size)")
    k1: float = Field(0.01, gt=0)
    k2: float = Field(0.03, gt=0)
    normalise: bool = Field(True, description="min-max scale each map to [0, 1] first (dynamic range L = 1)")


def _minmax(x: torch.Tensor) -> torch.Tensor:
    flat = x.flatten(1)
    lo, hi = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    return ((flat - lo) / (hi - lo).clamp_min(1e-12)).view_as(x)


class SSIM(Similarity):
    """Mean structural similarity over uniform windows (valid positions, every channel)."""

    name = "ssim"
    description = "mean SSIM over uniform windows (valid positions, all channels); 1 = identical"
    Options = SSIMOptions
    higher_is_better = True

    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        o = self.options
        if o.normalise:
            a, b = _minmax(a), _minmax(b)
        w = min(o.window, a.shape[-1], a.shape[-2])
        mean = lambda x: F.avg_pool2d(x, w, stride=1)  # noqa: E731  (uniform window, valid)
        mu_a, mu_b = mean(a), mean(b)
        var_a = mean(a * a) - mu_a**2
        var_b = mean(b * b) - mu_b**2
        cov = mean(a * b) - mu_a * mu_b
        c1, c2 = o.k1**2, o.k2**2  # dynamic range 1
        ssim = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
        return ssim.flatten(1).mean(1)


@hookimpl
def register_similarities(register) -> None:
    register(SSIM)
