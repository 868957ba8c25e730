"""Model guidance (Rao et al., ICCV 2023): train a model so that its explanations fall on the
annotated objects — how the paper's VOC teachers were made.

For each (image, present class) pair of an annotated image, with A the model's explanation for
that class (from the training forward, built with ``create_graph=True``), A⁺ = max(A, 0) and M
the class's box (or object) mask:

- ``energy``: 1 − Σ_{p∈M} A⁺_p / Σ_p A⁺_p (1 when the map is all zero);
- ``l1``: the mean over pixels of Â·(1 − M), Â = A⁺ min-max normalised to [0, 1] per map.

The term is averaged over the annotated pairs of the batch and added, times ``weight``, to the
classification loss. ``annotated_fraction`` keeps the masks of a seeded subset of the training
images only (guidance from few annotations).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset as TorchDataset

from .api import Explainer
from .errors import PluginError
from .explaining import check_gradient_path, explain_checked
from .labels import label_sets
from .runtime import at_least_fp32

#: Guards the divisions of both losses.
EPS = 1e-7


def energy_loss(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """(P, 1, H, W) maps and masks -> (P,) 1 − share of the positive attribution inside the mask."""
    positive = maps.clamp_min(0).flatten(1)
    inside = (positive * masks.flatten(1).to(positive.dtype)).sum(1)
    return 1 - inside / positive.sum(1).clamp_min(EPS)


def l1_loss(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """(P, 1, H, W) maps and masks -> (P,) mean over pixels of the [0, 1]-normalised positive map outside the mask."""
    positive = maps.clamp_min(0).flatten(1)
    low = positive.amin(1, keepdim=True)
    high = positive.amax(1, keepdim=True)
    normalised = (positive - low) / (high - low).clamp_min(EPS)
    return (normalised * (1 - masks.flatten(1).to(positive.dtype))).mean(1)


GUIDANCE_LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "energy": energy_loss,
    "l1": l1_loss,
}


def class_masks(masks: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """(B, K or 1, H, W) masks -> (B, k, H, W), the mask of each listed class (a single-mask
    dataset's object mask belongs to the label class)."""
    if masks.shape[1] == 1:
        return masks.expand(-1, classes.shape[1], -1, -1)
    return masks.gather(1, classes[:, :, None, None].expand(-1, -1, *masks.shape[-2:]))


class Guidance:
    """The guidance term for one batch, computed on the training forward (see the module docstring)."""

    def __init__(self, explainer: Explainer, loss: str = "energy") -> None:
        if loss not in GUIDANCE_LOSSES:
            raise ValueError(f"guidance loss must be one of {', '.join(GUIDANCE_LOSSES)} (got {loss!r})")
        self.explainer, self.loss = explainer, GUIDANCE_LOSSES[loss]
        #: Whether the guided map was checked to reach the model's parameters (first guided call).
        self.graph_checked = False

    def __call__(
        self,
        model: nn.Module,
        forward: Callable[[torch.Tensor], torch.Tensor],
        images: torch.Tensor,
        labels: torch.Tensor,
        masks: torch.Tensor,
        annotated: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, term): ``forward`` runs ``model`` (e.g. its DDP wrapper); ``annotated`` (B,)
        marks the images whose masks count. The explanation is not computed when none does."""
        if not bool(annotated.any()):
            logits = forward(images)
            return logits, at_least_fp32(logits).new_zeros(())
        with self.explainer.capture(model, images, trainable=True) as cap:
            logits = forward(cap.inputs)
        classes, weights = label_sets(labels)
        weights = weights * annotated.to(weights)[:, None]
        per_class = class_masks(masks, classes)
        losses = []
        for j in range(classes.shape[1]):
            maps = explain_checked(
                self.explainer, cap, logits, classes[:, j], images, role="guided model", create_graph=True
            )
            if maps.shape[1] != 1:
                raise PluginError(
                    f"guidance needs one-channel maps; explainer {self.explainer.name!r} gives "
                    f"{maps.shape[1]} channels (for bcos set contribution: true)"
                )
            if not self.graph_checked:
                check_gradient_path(
                    self.explainer,
                    maps,
                    model,
                    role="guided model",
                    consequence="train.guidance would guide nothing",
                    fix="remove train.guidance",
                )
                self.graph_checked = True
            losses.append(self.loss(at_least_fp32(maps), per_class[:, j : j + 1]))
        per_pair = torch.stack(losses, dim=1)
        return logits, (per_pair * weights).sum() / weights.sum()


class AnnotatedSamples(TorchDataset):
    """The samples of a split with an ``annotated`` flag: True for a seeded ``fraction`` of them."""

    def __init__(self, samples: TorchDataset, fraction: float, seed: int) -> None:
        n = len(samples)  # type: ignore[arg-type]
        count = max(1, round(fraction * n))
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        self.samples, self.annotated = samples, set(order[:count].tolist())

    def __len__(self) -> int:
        return len(self.samples)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {**self.samples[index], "annotated": index in self.annotated}
