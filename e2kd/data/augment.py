"""Geometric augmentation applied jointly to an item's image and object mask."""

from __future__ import annotations

from typing import Callable

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2


def make_augment(kind: str, image_size: int) -> Callable[[dict], dict] | None:
    """``none`` | ``flip`` | ``flip_crop`` (random crop with padding size/8, then flip)."""
    if kind == "none":
        return None
    steps = [v2.RandomHorizontalFlip()]
    if kind == "flip_crop":
        steps.insert(0, v2.RandomCrop(image_size, padding=max(1, image_size // 8), padding_mode="reflect"))
    elif kind != "flip":
        raise ValueError(f"unknown augmentation {kind!r} (known: none, flip, flip_crop)")
    transform = v2.Compose(steps)

    def apply(item: dict) -> dict:
        image, mask = transform(tv_tensors.Image(item["image"]), tv_tensors.Mask(item["mask"]))
        return {**item, "image": image.as_subclass(torch.Tensor), "mask": mask.as_subclass(torch.Tensor)}

    return apply
