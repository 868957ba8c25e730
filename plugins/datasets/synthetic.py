"""``synthetic``: images whose class is the shape of a foreground object.

The background texture is correlated with the class at a chosen strength, which makes
it a shortcut a student can learn instead of the shape (as land/water is in
Waterbirds). Every sample is generated from ``(seed, stream, index)`` alone, so a
dataset is reproducible bit for bit and independent of how many samples are drawn.
"""

from __future__ import annotations

import copy
from typing import Callable

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch.utils.data import Dataset

from e2kd import hookimpl
from e2kd.api import Dataset as DatasetPlugin
from e2kd.data.files import per_split

#: Bump when rendering changes, so caches made from older images are refused.
GENERATOR_VERSION = 1
SHAPES = ("square", "disk", "triangle", "cross", "ring", "diamond")
BACKGROUNDS = ("h-stripes", "v-stripes", "checker", "diagonal", "dots", "grid")


def _shape_mask(shape: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    r = np.sqrt(u * u + v * v)
    if shape == 0:
        return np.maximum(np.abs(u), np.abs(v)) <= 0.8
    if shape == 1:
        return r <= 1.0
    if shape == 2:
        return (v <= 0.8) & (np.abs(u) <= (v + 1.0) * 0.55)
    if shape == 3:
        return ((np.abs(u) <= 0.3) & (np.abs(v) <= 1.0)) | ((np.abs(v) <= 0.3) & (np.abs(u) <= 1.0))
    if shape == 4:
        return (r <= 1.0) & (r >= 0.55)
    if shape == 5:
        return np.abs(u) + np.abs(v) <= 1.0
    raise ValueError(f"shape index {shape} out of range")


def _background(kind: int, x: np.ndarray, y: np.ndarray, period: float, phase: float) -> np.ndarray:
    """A binary texture (H, W) in {0, 1}."""
    if kind == 0:
        t = (y + phase) / period
    elif kind == 1:
        t = (x + phase) / period
    elif kind == 2:
        return ((np.floor((x + phase) / period) + np.floor((y + phase) / period)) % 2).astype(np.float32)
    elif kind == 3:
        t = (x + y + phase) / period
    elif kind == 4:
        cx = (x + phase) % period - period / 2
        cy = (y + phase) % period - period / 2
        return (cx * cx + cy * cy <= (period / 3.2) ** 2).astype(np.float32)
    elif kind == 5:
        return (((x + phase) % period < 1.5) | ((y + phase) % period < 1.5)).astype(np.float32)
    else:
        raise ValueError(f"background index {kind} out of range")
    return (np.floor(t) % 2).astype(np.float32)


def render(label: int, background: int, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One image (3, H, W) in [0, 1] and its object mask (H, W)."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    period = rng.uniform(4.0, 7.0)
    texture = _background(background, x, y, period, rng.uniform(0, period))
    dark, light = rng.uniform(0.05, 0.3, 3), rng.uniform(0.35, 0.6, 3)
    image = dark[:, None, None] + (light - dark)[:, None, None] * texture[None]
    radius = rng.uniform(0.22, 0.32) * size
    cx, cy = rng.uniform(radius, size - radius, 2)
    mask = _shape_mask(label, (x - cx) / radius, (y - cy) / radius)
    colour = rng.uniform(0.65, 1.0, 3)
    image = np.where(mask[None], colour[:, None, None], image)
    image = image + rng.normal(0.0, 0.03, image.shape)
    return np.clip(image, 0.0, 1.0).astype(np.float32), mask.astype(np.float32)


class SyntheticShapes(Dataset):
    """Balanced synthetic classification data; each item is a dict of tensors.

    Items: ``image`` (3, H, W) float in [0, 1], ``label`` (class = shape), ``mask``
    (1, H, W) object mask, ``group`` (the background type), ``in_distribution`` (the
    background type equals the class).

    Args:
        per_class: samples per class.
        num_classes: classes (at most ``len(SHAPES)``).
        image_size: side of the square images in pixels.
        bias: with this probability the background type equals the class; otherwise it is
            drawn uniformly from all types (0 = independent, 1 = always matching).
        mismatched: draw the background uniformly from the types of the *other* classes
            (an out-of-distribution set for a biased training set); ``bias`` is ignored.
        seed, stream: identify the dataset; different streams never share samples.
        transform: optional callable applied to each item dict.
    """

    def __init__(
        self,
        per_class: int,
        num_classes: int = 4,
        image_size: int = 32,
        bias: float = 0.0,
        *,
        mismatched: bool = False,
        seed: int = 0,
        stream: int = 0,
        transform: Callable[[dict], dict] | None = None,
    ) -> None:
        if not 2 <= num_classes <= len(SHAPES):
            raise ValueError(f"num_classes must be in [2, {len(SHAPES)}] (got {num_classes})")
        if not 0.0 <= bias <= 1.0:
            raise ValueError(f"bias must be in [0, 1] (got {bias})")
        if per_class < 1 or image_size < 16:
            raise ValueError(f"per_class must be >= 1 and image_size >= 16 (got {per_class}, {image_size})")
        self.num_classes, self.image_size, self.bias, self.mismatched = num_classes, image_size, bias, mismatched
        self.per_class, self.seed, self.stream = per_class, seed, stream
        self.transform = transform
        n = per_class * num_classes
        images = np.empty((n, 3, image_size, image_size), np.float32)
        masks = np.empty((n, 1, image_size, image_size), np.float32)
        labels = np.arange(n) % num_classes
        groups = np.empty(n, np.int64)
        for i in range(n):
            rng = np.random.default_rng([seed, stream, i])
            label = int(labels[i])
            if mismatched:
                bg = int((label + rng.integers(1, num_classes)) % num_classes)
            elif rng.random() < bias:
                bg = label
            else:
                bg = int(rng.integers(num_classes))
            images[i], masks[i, 0] = render(label, bg, image_size, rng)
            groups[i] = bg
        self.images = torch.from_numpy(images)
        self.masks = torch.from_numpy(masks)
        self.labels = torch.from_numpy(labels.astype(np.int64))
        self.groups = torch.from_numpy(groups)

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        item = {"image": self.images[index], "label": self.labels[index], "mask": self.masks[index],
                "group": self.groups[index], "in_distribution": self.groups[index] == self.labels[index]}
        return self.transform(item) if self.transform is not None else item

    def without_transform(self) -> "SyntheticShapes":
        """The same samples (shared tensors), un-augmented."""
        plain = copy.copy(self)
        plain.transform = None
        return plain

    def identity(self) -> dict:
        """What determines the samples (for cache fingerprints); the transform is not part of it."""
        return {"kind": "synthetic_shapes", "generator_version": GENERATOR_VERSION, "per_class": self.per_class,
                "num_classes": self.num_classes, "image_size": self.image_size, "bias": self.bias,
                "mismatched": self.mismatched, "seed": self.seed, "stream": self.stream}

    @property
    def matched_fraction(self) -> float:
        """Fraction of samples whose background type equals the class."""
        return float((self.groups == self.labels).float().mean())


class SyntheticOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    num_classes: int = Field(4, ge=2, le=len(SHAPES), description="classes (object shapes)")
    image_size: int = Field(32, ge=16, description="side of the square images in pixels")
    train_per_class: int = Field(100, ge=1, description="training images per class")
    test_per_class: int = Field(100, ge=1, description="images per class of each test split")
    bias: float = Field(0.0, ge=0.0, le=1.0,
                        description="background/class correlation of train and test_id (test_ood: never matching)")


class Synthetic(DatasetPlugin):
    name = "synthetic"
    description = "shapes on textured backgrounds (class = shape; background a tunable shortcut); generated, no files"
    Options = SyntheticOptions
    provides = frozenset({"mask", "group"})
    fixed_size = True
    default_augment = "flip_crop"
    #: split -> (stream, mismatched backgrounds)
    SPLITS = {"train": (0, False), "test_id": (1, False), "test_ood": (2, True)}

    def splits(self) -> tuple[str, ...]:
        return tuple(self.SPLITS)

    def class_names(self) -> list[str]:
        return list(SHAPES[: self.options.num_classes])

    def _arguments(self, split: str) -> dict:
        o = self.options
        stream, mismatched = self.SPLITS[split]
        return {"per_class": o.train_per_class if split == "train" else o.test_per_class, "num_classes": o.num_classes,
                "image_size": o.image_size, "bias": 0.0 if mismatched else o.bias, "mismatched": mismatched,
                "seed": self.seed, "stream": stream}

    @per_split
    def samples(self, split: str) -> SyntheticShapes:
        return SyntheticShapes(**self._arguments(split))  # generating costs time: once per split

    def identity(self, split: str) -> dict:
        return {"kind": "synthetic_shapes", "generator_version": GENERATOR_VERSION, **self._arguments(split)}


@hookimpl
def register_datasets(register) -> None:
    register(Synthetic)
