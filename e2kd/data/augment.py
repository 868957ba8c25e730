"""Training augmentation: geometry applied jointly to image, stored teacher map and mask.

The teacher's stored explanation (frozen-teacher training) is resized to the image size and
stacked with the image as extra channels, so one geometric transform with one set of random
parameters moves both; the object mask goes through the same call (nearest interpolation).
Photometric augmentation is applied to the image alone, afterwards.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torchvision import tv_tensors
from torchvision.transforms import v2

AUGMENTATIONS = ("none", "flip", "flip_crop", "resized_crop_flip")


def geometric_transform(kind: str, image_size: int) -> v2.Transform | None:
    """``none`` | ``flip`` | ``flip_crop`` (pad size/8 by reflection, random crop, flip) |
    ``resized_crop_flip`` (random resized crop, scale 0.35-1, as in the paper, then flip)."""
    if kind == "none":
        return None
    if kind == "flip":
        return v2.RandomHorizontalFlip()
    if kind == "flip_crop":
        return v2.Compose([v2.RandomCrop(image_size, padding=max(1, image_size // 8), padding_mode="reflect"),
                           v2.RandomHorizontalFlip()])
    if kind == "resized_crop_flip":
        return v2.Compose([v2.RandomResizedCrop(image_size, scale=(0.35, 1.0), antialias=True),
                           v2.RandomHorizontalFlip()])
    raise ValueError(f"unknown augmentation {kind!r} (known: {', '.join(AUGMENTATIONS)})")


def resize_map(teacher_map: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A stored (C, h, w) map bilinearly resized to ``size`` (unchanged if it already fits)."""
    teacher_map = teacher_map.float()
    if tuple(teacher_map.shape[-2:]) == tuple(size):
        return teacher_map
    return F.interpolate(teacher_map[None], size=size, mode="bilinear", align_corners=False)[0]


def make_augment(kind: str, image_size: int, color_jitter: float = 0.0) -> Callable[[dict], dict] | None:
    """Item transform: geometry on image + ``teacher_map`` + ``mask`` jointly, then colour on the image."""
    geometry = geometric_transform(kind, image_size)
    colour = v2.ColorJitter(color_jitter, color_jitter, color_jitter) if color_jitter > 0 else None
    if geometry is None and colour is None:
        return None

    def apply(item: dict) -> dict:
        image = item["image"]
        out = dict(item)
        if geometry is not None:
            has_map = "teacher_map" in item
            stacked = torch.cat([image, resize_map(item["teacher_map"], image.shape[-2:])]) if has_map else image
            inputs = [tv_tensors.Image(stacked)]
            if "mask" in item:
                inputs.append(tv_tensors.Mask(item["mask"]))
            moved = geometry(*inputs)
            stacked = moved[0].as_subclass(torch.Tensor)
            image = stacked[: image.shape[0]]
            if has_map:
                out["teacher_map"] = stacked[image.shape[0]:]
            if "mask" in item:
                out["mask"] = moved[1].as_subclass(torch.Tensor)
        if colour is not None:
            image = colour(image)
        out["image"] = image
        return out

    return apply
