"""Mixup (Zhang et al., 2018) as the paper uses it on Waterbirds: "consistent teaching".

Each training step draws λ ~ Beta(α, α) and a permutation π of the batch, from the run's seed and
the step number (so a resumed run draws the same). The model sees x̃ = λ·x + (1 − λ)·x[π]; when
distilling, the teacher sees the same x̃, so the KD and explanation terms are taken on it, and a
label loss is mixed the same way: λ·L(z, y) + (1 − λ)·L(z, y[π]).
"""

from __future__ import annotations

import numpy as np
import torch

from .labels import label_loss


def draw(alpha: float, batch_size: int, seed: int, step: int) -> tuple[float, torch.Tensor]:
    """λ ~ Beta(alpha, alpha) and a permutation of ``batch_size``, a function of (seed, step)."""
    rng = np.random.default_rng([seed, step])
    return float(rng.beta(alpha, alpha)), torch.from_numpy(rng.permutation(batch_size))


def mix(x: torch.Tensor, lam: float, perm: torch.Tensor) -> torch.Tensor:
    """λ·x + (1 − λ)·x[perm] along the batch dimension."""
    return lam * x + (1 - lam) * x[perm.to(x.device)]


def mixed_label_loss(logits: torch.Tensor, labels: torch.Tensor, lam: float, perm: torch.Tensor) -> torch.Tensor:
    """λ·L(z, y) + (1 − λ)·L(z, y[perm]) with L the label loss (cross-entropy, or BCE for multi-hot
    labels — where it equals BCE against the mixed targets)."""
    return lam * label_loss(logits, labels) + (1 - lam) * label_loss(logits, labels[perm.to(labels.device)])
