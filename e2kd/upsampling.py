"""Sums and inner products of bilinearly upsampled maps, computed without forming them.

Bilinear upsampling (``F.interpolate(m, size, mode="bilinear", align_corners=False)``) is a fixed
linear map, separable over the two axes: ``up(m) = U_h m U_wᵀ`` with ``U_h`` of shape (H, h). So

    <up(a), up(b)> = sum(a ⊙ (U_ahᵀ U_bh · b · U_bwᵀ U_aw))

uses two small Gram matrices (7 x 7 for a 7 x 7 map) instead of two 224 x 224 maps, and
``sum(up(a)) = sum(a ⊙ (U_hᵀ1)(U_wᵀ1)ᵀ)``. Each map may be at its own resolution, or already at
the output size (then its matrices are the identity). Each row of U sums to one, so
``up(a) - c = up(a - c)`` for a constant c: centring can be done before upsampling.
Similarities that declare ``feature_resolution`` build on these (see :class:`e2kd.api.Similarity`).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

Size = tuple[int, int]


@functools.lru_cache(maxsize=128)
def interpolation_matrix(n_in: int, n_out: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(n_out, n_in) matrix of 1-D linear interpolation, ``align_corners=False`` (torch's weights,
    taken by interpolating the identity in float64)."""
    eye = torch.eye(n_in, dtype=torch.float64)[:, None, :]
    weights = F.interpolate(eye, size=n_out, mode="linear", align_corners=False)[:, 0, :]
    return weights.t().contiguous().to(device=device, dtype=dtype)


@functools.lru_cache(maxsize=128)
def _gram(n_a: int, n_b: int, n_out: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor | None:
    """U_aᵀ U_b (n_a, n_b) for maps of n_a and n_b pixels along an axis upsampled to n_out; None
    for the identity (both already at n_out)."""
    if n_a == n_out and n_b == n_out:
        return None
    cpu = torch.device("cpu")
    u_a = interpolation_matrix(n_a, n_out, cpu, torch.float64) if n_a != n_out else None
    u_b = interpolation_matrix(n_b, n_out, cpu, torch.float64) if n_b != n_out else None
    gram = u_b if u_a is None else (u_a.t() if u_b is None else u_a.t() @ u_b)
    return gram.to(device=device, dtype=dtype)


def _check(x: torch.Tensor, size: Size) -> None:
    if x.dim() != 4 or x.shape[-2] > size[0] or x.shape[-1] > size[1]:
        raise ValueError(f"expected (B, C, h, w) maps no larger than {tuple(size)}, got {tuple(x.shape)}")


def upsampled_inner(a: torch.Tensor, b: torch.Tensor, size: Size) -> torch.Tensor:
    """Per-sample ``<up(a), up(b)>`` over C x H x W, ``up`` = bilinear upsampling to ``size``: (B,)."""
    _check(a, size)
    _check(b, size)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"maps with {a.shape[1]} and {b.shape[1]} channels cannot be compared")
    (h_a, w_a), (h_b, w_b) = a.shape[-2:], b.shape[-2:]
    if h_a * w_a > h_b * w_b:  # carry the smaller map through the Gram matrices
        a, b, (h_a, w_a), (h_b, w_b) = b, a, (h_b, w_b), (h_a, w_a)
    rows = _gram(h_a, h_b, size[0], a.device, a.dtype)
    cols = _gram(w_b, w_a, size[1], a.device, a.dtype)
    t = b if rows is None else rows @ b
    t = t if cols is None else t @ cols
    return (a * t).flatten(1).sum(1)


def upsampled_sum(a: torch.Tensor, size: Size) -> torch.Tensor:
    """Per-sample sum of ``up(a)`` over C x H x W: (B,)."""
    _check(a, size)
    (h, w), device = a.shape[-2:], a.device
    rows = interpolation_matrix(h, size[0], device, a.dtype).sum(0) if h != size[0] else a.new_ones(h)
    cols = interpolation_matrix(w, size[1], device, a.dtype).sum(0) if w != size[1] else a.new_ones(w)
    return (a * (rows[:, None] * cols[None, :])).flatten(1).sum(1)


def centred(a: torch.Tensor, size: Size) -> torch.Tensor:
    """``a`` minus the mean of ``up(a)``, so that ``up(centred(a)) = up(a) - mean(up(a))``."""
    mean = upsampled_sum(a, size) / (a.shape[1] * size[0] * size[1])
    return a - mean[:, None, None, None]


def upsample(a: torch.Tensor, size: Size) -> torch.Tensor:
    """``up(a)`` itself (the reference path; a map already at ``size`` is returned as is)."""
    if tuple(a.shape[-2:]) == tuple(size):
        return a
    return F.interpolate(a, size=tuple(size), mode="bilinear", align_corners=False)
