"""Independent reference computations the tests (and benchmarks) compare the library against:
straightforward per-sample definitions, written from the formulas in the method spec."""

import torch

EPS = 1e-7


def epg_loop(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """EPG per (image, class): Σ_{p in mask} A⁺_p / Σ_p A⁺_p, 0 when the denominator < 1e-7; channels summed."""
    out = []
    for a, m in zip(maps, masks):
        a = (a.sum(0) if a.dim() == 3 else a).clamp_min(0)
        m = (m.amax(0) if m.dim() == 3 else m) > 0
        total = float(a.sum())
        out.append(0.0 if total < EPS else float(a[m].sum()) / total)
    return torch.tensor(out, dtype=maps.dtype)


def iou_loop(maps: torch.Tensor, masks: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """IoU of the min-max normalised A⁺ binarised at > threshold with the mask (0 for an empty union)."""
    out = []
    for a, m in zip(maps, masks):
        a = (a.sum(0) if a.dim() == 3 else a).clamp_min(0)
        m = (m.amax(0) if m.dim() == 3 else m) > 0
        lo, hi = float(a.min()), float(a.max())
        if hi - lo >= EPS:
            a = (a - lo) / (hi - lo)
        elif hi > 0:
            a = a / hi
        b = a > threshold
        union = int((b | m).sum())
        out.append(int((b & m).sum()) / union if union else 0.0)
    return torch.tensor(out, dtype=maps.dtype)
