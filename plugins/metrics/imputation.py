"""Linear imputation of removed pixels from their neighbours (ROAD's debiasing), batched.

Each removed pixel takes the weighted mean of its eight neighbours — weight 1/6 for the four
direct ones, 1/12 for the diagonals, only neighbours inside the image — where neighbours that were
removed too are themselves unknowns. That is the linear system ROAD (Rong et al., 2022) solves per
image with a sparse direct solver: ``d_i x_i - sum_{removed j} w_ij x_j = sum_{kept k} w_ik v_k``
for each removed pixel i, ``d_i`` the sum of its in-image neighbour weights. The matrix is
symmetric and diagonally dominant (positive definite as long as every connected region of removed
pixels touches a kept one), so conjugate gradients solve every image and channel of a batch at
once, with 3 x 3 convolutions for the products, on any device.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

#: Neighbour weights (the centre is the pixel itself).
NEIGHBOURS = ((1 / 12, 1 / 6, 1 / 12), (1 / 6, 0.0, 1 / 6), (1 / 12, 1 / 6, 1 / 12))


def _neighbour_sum(x: torch.Tensor) -> torch.Tensor:
    """Weighted sum (:data:`NEIGHBOURS`) of each pixel's in-image neighbours: (S, 1, H, W) ->
    (S, 1, H, W). The weights are (1, 2, 1) x (1, 2, 1) / 12 without the centre: two separable
    passes of shifted adds (several times faster than a 3 x 3 convolution on a CPU)."""
    padded = F.pad(x, (1, 1, 1, 1))
    rows = padded[:, :, :-2] + 2 * padded[:, :, 1:-1] + padded[:, :, 2:]
    return (rows[..., :-2] + 2 * rows[..., 1:-1] + rows[..., 2:] - 4 * x) / 12


class _Level:
    """The system on one grid: which pixels are unknown, and each pixel's neighbour-weight sum."""

    def __init__(self, unknown: torch.Tensor) -> None:
        self.unknown = unknown
        self.degree = _neighbour_sum(torch.ones_like(unknown[:1]))
        self.inverse_diagonal = torch.where(unknown > 0, 1 / self.degree, torch.zeros_like(unknown))

    def apply(self, v: torch.Tensor) -> torch.Tensor:
        """The matrix times ``v`` (zero off the unknowns)."""
        return (self.degree * v - _neighbour_sum(v)) * self.unknown

    def smooth(self, v: torch.Tensor, rhs: torch.Tensor, sweeps: int) -> torch.Tensor:
        """Jacobi sweeps (weight 1.1, near the best smoother of this stencil's high frequencies;
        symmetric, so the V-cycle is a valid CG preconditioner)."""
        for _ in range(sweeps):
            v = v + 1.1 * self.inverse_diagonal * (rhs - self.apply(v))
        return v


def _prolong_1d(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Cell-centred linear interpolation to twice the size along ``dim`` (zero outside)."""
    n = x.shape[dim]
    padded = F.pad(x, (1, 1) if dim == 3 else (0, 0, 1, 1))
    centre, before, after = (padded.narrow(dim, k, n) for k in (1, 0, 2))
    even, odd = 0.75 * centre + 0.25 * before, 0.75 * centre + 0.25 * after
    return torch.stack([even, odd], dim + 1).flatten(dim, dim + 1)


def _restrict_1d(x: torch.Tensor, dim: int) -> torch.Tensor:
    """The transpose of :func:`_prolong_1d` (``x`` of even size along ``dim``)."""
    n = x.shape[dim] // 2
    even, odd = x.unflatten(dim, (n, 2)).unbind(dim + 1)
    pad = (1, 1) if dim == 3 else (0, 0, 1, 1)
    even, odd = F.pad(even, pad), F.pad(odd, pad)
    return 0.75 * (even.narrow(dim, 1, n) + odd.narrow(dim, 1, n)) + 0.25 * (
        even.narrow(dim, 2, n) + odd.narrow(dim, 0, n)
    )


def _restrict(x: torch.Tensor) -> torch.Tensor:
    """Full weighting to the coarse grid of ceil(H / 2) x ceil(W / 2) cells (the transpose of :func:`_prolong`)."""
    x = F.pad(x, (0, x.shape[3] % 2, 0, x.shape[2] % 2))
    return _restrict_1d(_restrict_1d(x, 2), 3)


def _prolong(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear (cell-centred) interpolation of a coarse grid to ``size``."""
    return _prolong_1d(_prolong_1d(x, 2), 3)[..., : size[0], : size[1]]


def _levels(unknown: torch.Tensor) -> list[_Level]:
    """The grid hierarchy, down to about 4 px: a coarse pixel is unknown where its whole 2 x 2 block
    is (a coarse grid that also counted partly known blocks converges several times slower)."""
    levels = [_Level(unknown)]
    while min(levels[-1].unknown.shape[-2:]) > 4:
        levels.append(_Level(-F.max_pool2d(-levels[-1].unknown, 2, ceil_mode=True)))
    return levels


def _v_cycle(levels: list[_Level], rhs: torch.Tensor, depth: int = 0, sweeps: int = 2) -> torch.Tensor:
    """One multigrid V-cycle from zero for ``levels[depth]`` (rediscretised coarse grids)."""
    level = levels[depth]
    if depth == len(levels) - 1:
        return level.smooth(torch.zeros_like(rhs), rhs, 30)
    v = level.smooth(torch.zeros_like(rhs), rhs, sweeps)
    coarse = _restrict(rhs - level.apply(v)) * levels[depth + 1].unknown
    v = v + _prolong(_v_cycle(levels, coarse, depth + 1, sweeps), rhs.shape[-2:]) * level.unknown
    return level.smooth(v, rhs, sweeps)


def linear_imputation(
    images: torch.Tensor, removed: torch.Tensor, *, tolerance: float = 1e-6, max_iterations: int = 500
) -> torch.Tensor:
    """``images`` (N, C, H, W) with the pixels where ``removed`` (N, 1, H, W) is True replaced by
    their linear imputation (module docstring), in every channel; kept pixels are unchanged.

    Solved in float64 by conjugate gradients preconditioned with a multigrid V-cycle, every image
    and channel at once, until each system's residual is at most ``tolerance`` times its
    right-hand side's norm (a warning if ``max_iterations`` is reached); returned in ``images``'
    dtype. A region of removed pixels with no kept neighbour anywhere (the whole image removed) has
    no solution; it is filled with zeros.
    """
    n, c, h, w = images.shape
    known = images.double().reshape(n * c, 1, h, w)
    unknown = removed.to(known.dtype).repeat_interleave(c, 0)
    fine = _Level(unknown)
    levels = _levels(unknown.float())  # the preconditioner in float32: twice as fast, as good
    rhs = _neighbour_sum(known * (1 - unknown)) * unknown
    solution = torch.zeros_like(known)
    residual = rhs.clone()
    dims = (1, 2, 3)
    bound = tolerance**2 * rhs.pow(2).sum(dims, keepdim=True)
    preconditioned = _v_cycle(levels, residual.float()).double()
    direction = preconditioned
    rz = (residual * preconditioned).sum(dims, keepdim=True)
    tiny = torch.finfo(known.dtype).tiny
    for _ in range(max_iterations):
        active = residual.pow(2).sum(dims, keepdim=True) > bound
        if not bool(active.any()):
            break
        product = fine.apply(direction)
        curvature = (direction * product).sum(dims, keepdim=True)
        step = torch.where(active & (curvature > 0), rz / curvature.clamp_min(tiny), torch.zeros_like(rz))
        solution += step * direction
        residual -= step * product
        preconditioned = _v_cycle(levels, residual.float()).double()
        rz_next = (residual * preconditioned).sum(dims, keepdim=True)
        direction = preconditioned + torch.where(active, rz_next / rz.clamp_min(tiny), torch.zeros_like(rz)) * direction
        rz = rz_next
    else:
        warnings.warn(
            f"linear imputation did not reach tolerance {tolerance:g} in {max_iterations} iterations",
            RuntimeWarning,
            stacklevel=2,
        )
    return torch.where(removed.repeat_interleave(c, 0), solution, known).view(n, c, h, w).to(images.dtype)
