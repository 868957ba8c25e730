"""Views of a sample: geometry applied jointly to image, stored teacher map, masks and boxes.

Three views exist. ``train`` augments (the ``train.augment`` kind); ``eval`` is deterministic
(resize the short side to size·256/224, centre crop); ``whole`` squeezes the whole image to
size × size (what the frozen teacher sees once, so its map covers the whole image). Images
stored at the training size already (``fixed_size`` datasets such as the synthetic shapes)
are left as they are by ``eval`` and ``whole``.

The teacher's stored explanation (frozen-teacher training) is resized to the image size and
stacked with the image as extra channels, so one geometric transform with one set of random
parameters moves both; masks and bounding boxes go through the same call. Boxes are then
rasterised into one mask per class. Photometric augmentation touches the image alone.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torchvision import tv_tensors
from torchvision.transforms import v2

AUGMENTATIONS = ("none", "flip", "flip_crop", "resized_crop_flip")
VIEWS = ("train", "eval", "whole")
#: Resize-then-centre-crop ratio of the evaluation view (ImageNet convention: 256 -> 224).
EVAL_RESIZE_RATIO = 256 / 224


def eval_geometry(image_size: int) -> v2.Transform:
    """Resize the short side to ``image_size * 256 / 224`` (antialiased), centre crop ``image_size``."""
    return v2.Compose([v2.Resize(round(image_size * EVAL_RESIZE_RATIO), antialias=True), v2.CenterCrop(image_size)])


def geometric_transform(kind: str, image_size: int, *, fixed_size: bool = True) -> v2.Transform | None:
    """The training geometry ``kind``.

    For ``fixed_size`` images (already ``image_size``): ``none`` | ``flip`` | ``flip_crop`` (pad
    size/8 by reflection, random crop, flip) | ``resized_crop_flip`` (random resized crop, scale
    0.35-1, then flip). For images of any size: ``none`` is the evaluation view, ``flip`` adds a
    flip to it, ``flip_crop`` resizes the short side as the evaluation view does and takes a random
    crop, ``resized_crop_flip`` is the standard ImageNet random resized crop (scale 0.08-1) + flip.
    """
    if kind not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {kind!r} (known: {', '.join(AUGMENTATIONS)})")
    flip = v2.RandomHorizontalFlip()
    if fixed_size:
        if kind == "none":
            return None
        if kind == "flip":
            return flip
        if kind == "flip_crop":
            return v2.Compose(
                [v2.RandomCrop(image_size, padding=max(1, image_size // 8), padding_mode="reflect"), flip]
            )
        return v2.Compose([v2.RandomResizedCrop(image_size, scale=(0.35, 1.0), antialias=True), flip])
    if kind == "none":
        return eval_geometry(image_size)
    if kind == "flip":
        return v2.Compose([eval_geometry(image_size), flip])
    if kind == "flip_crop":
        return v2.Compose(
            [v2.Resize(round(image_size * EVAL_RESIZE_RATIO), antialias=True), v2.RandomCrop(image_size), flip]
        )
    return v2.Compose([v2.RandomResizedCrop(image_size, antialias=True), flip])


def view_geometry(view: str, image_size: int, *, fixed_size: bool, augment: str = "none") -> v2.Transform | None:
    """The geometry of ``view`` (see the module docstring)."""
    if view == "train":
        return geometric_transform(augment, image_size, fixed_size=fixed_size)
    if view not in VIEWS:
        raise ValueError(f"unknown view {view!r} (known: {', '.join(VIEWS)})")
    if fixed_size:
        return None
    if view == "eval":
        return eval_geometry(image_size)
    return v2.Resize((image_size, image_size), antialias=True)


def resize_map(teacher_map: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A stored (C, h, w) map bilinearly resized to ``size`` (unchanged if it already fits)."""
    teacher_map = teacher_map.float()
    if tuple(teacher_map.shape[-2:]) == tuple(size):
        return teacher_map
    return F.interpolate(teacher_map[None], size=size, mode="bilinear", align_corners=False)[0]


def boxes_to_masks(boxes: torch.Tensor, labels: torch.Tensor, num_classes: int, size: tuple[int, int]) -> torch.Tensor:
    """(K, H, W) uint8 masks: pixel (r, c) is in class k's mask when its centre (c + .5, r + .5)
    lies in one of the class's XYXY boxes."""
    h, w = size
    device = boxes.device
    masks = torch.zeros(num_classes, h, w, dtype=torch.uint8, device=device)
    if boxes.shape[0] == 0:
        return masks
    b = boxes.as_subclass(torch.Tensor).float()
    ys = torch.arange(h, dtype=torch.float32, device=device) + 0.5
    xs = torch.arange(w, dtype=torch.float32, device=device) + 0.5
    rows = (ys[None] >= b[:, 1:2]) & (ys[None] < b[:, 3:4])
    cols = (xs[None] >= b[:, 0:1]) & (xs[None] < b[:, 2:3])
    inside = rows[:, :, None] & cols[:, None, :]
    labels = labels.long()
    for k in labels.unique().tolist():
        masks[k] = inside[labels == k].any(0)
    return masks


class View:
    """Item transform: geometry on image + ``teacher_map`` + ``mask`` + ``boxes`` jointly, boxes
    rasterised to per-class masks, uint8 images made float in [0, 1], then colour on the image.
    With ``uint8`` a uint8 image stays uint8 when nothing needs it as float (no colour jitter, no
    teacher map): the batch is made float on the training device (``to_float_images``).

    A class (not a closure) so DataLoader workers can receive it under any start method.
    """

    def __init__(
        self, geometry: v2.Transform | None, color_jitter: float = 0.0, num_classes: int = 0, *, uint8: bool = False
    ) -> None:
        self.geometry = geometry
        self.colour = v2.ColorJitter(color_jitter, color_jitter, color_jitter) if color_jitter > 0 else None
        self.num_classes, self.uint8 = num_classes, uint8

    def __call__(self, item: dict[str, Any]) -> dict[str, Any]:
        out = dict(item)
        image = item["image"]
        if image.dtype == torch.uint8 and "teacher_map" in item:
            image = image.float().div_(255)  # stacking with a float map needs a float image
        if self.geometry is not None and not ({"teacher_map", "mask", "boxes"} & item.keys()):
            image = self.geometry(image)  # the image alone: the plain-tensor path (no pytree of a dict)
        elif self.geometry is not None:
            has_map = "teacher_map" in item
            stacked = torch.cat([image, resize_map(item["teacher_map"], image.shape[-2:])]) if has_map else image
            inputs: dict[str, Any] = {"image": tv_tensors.Image(stacked)}
            if "mask" in item:
                inputs["mask"] = tv_tensors.Mask(item["mask"])
            if "boxes" in item:
                inputs["boxes"] = item["boxes"]
            moved = self.geometry(inputs)
            stacked = moved["image"].as_subclass(torch.Tensor)
            image = stacked[:3]
            if has_map:
                out["teacher_map"] = stacked[3:]
            if "mask" in item:
                out["mask"] = moved["mask"].as_subclass(torch.Tensor)
            if "boxes" in item:
                out["boxes"] = moved["boxes"]
        if "boxes" in out:
            boxes = v2.functional.clamp_bounding_boxes(out.pop("boxes"))
            out["mask"] = boxes_to_masks(boxes, out.pop("box_labels"), self.num_classes, tuple(image.shape[-2:]))
        if image.dtype == torch.uint8 and not (self.uint8 and self.colour is None):
            image = image.float().div_(255)
        if self.colour is not None:
            image = self.colour(image)
        out["image"] = image
        return out


def make_view(
    view: str,
    image_size: int,
    *,
    fixed_size: bool = True,
    augment: str = "none",
    color_jitter: float = 0.0,
    num_classes: int = 0,
    uint8: bool = False,
) -> View:
    """The item transform of ``view``; colour jitter applies to the ``train`` view only."""
    geometry = view_geometry(view, image_size, fixed_size=fixed_size, augment=augment)
    return View(geometry, color_jitter if view == "train" else 0.0, num_classes, uint8=uint8)
