"""Labels as the loss and the explanations see them: class indices (single-label data) or multi-hot
vectors (multi-label data), as sets of present classes, and the label loss of either kind."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def padded_sets(member: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, K) bool membership -> (B, k) class indices and (B, k) float weights, k = the largest set;
    each row lists its members first (ascending), padded with weight-0 entries."""
    k = max(1, int(member.sum(1).max()))
    order = torch.sort(member.to(torch.int8), dim=1, descending=True, stable=True).indices[:, :k]
    return order, member.gather(1, order).to(torch.float32)


def label_sets(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, k) present label classes and (B, k) float weights: the label itself for class indices,
    every present class (padded with weight-0 entries) for multi-hot labels."""
    if labels.dim() == 2:
        return padded_sets(labels > 0.5)
    return labels.view(-1, 1), torch.ones(labels.shape[0], 1, device=labels.device)


def label_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy for class indices; binary cross-entropy (mean over classes) for multi-hot labels."""
    if labels.dim() == 2:
        return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))
    return F.cross_entropy(logits, labels)
