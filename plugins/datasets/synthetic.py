"""``synthetic``: images whose class is the shape of a foreground object.

The background texture is correlated with the class at a chosen strength, which makes
it a shortcut a student can learn instead of the shape (as land/water is in
Waterbirds). Every sample is generated from ``(seed, stream, index)`` alone, so a
dataset is reproducible bit for bit and independent of how many samples are drawn.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from pydantic import Field
from torch.utils.data import Dataset

from e2kd import hookimpl
from e2kd.api import Dataset as DatasetPlugin
from e2kd.api import PluginOptions
from e2kd.data.files import per_split
from e2kd.data.shapes import GENERATOR_VERSION, SHAPES, render


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
        item = {
            "image": self.images[index],
            "label": self.labels[index],
            "mask": self.masks[index],
            "group": self.groups[index],
            "in_distribution": self.groups[index] == self.labels[index],
        }
        return self.transform(item) if self.transform is not None else item

    def identity(self) -> dict:
        """What determines the samples (for cache fingerprints); the transform is not part of it."""
        return {
            "kind": "synthetic_shapes",
            "generator_version": GENERATOR_VERSION,
            "per_class": self.per_class,
            "num_classes": self.num_classes,
            "image_size": self.image_size,
            "bias": self.bias,
            "mismatched": self.mismatched,
            "seed": self.seed,
            "stream": self.stream,
        }

    @property
    def matched_fraction(self) -> float:
        """Fraction of samples whose background type equals the class."""
        return float((self.groups == self.labels).float().mean())


class SyntheticOptions(PluginOptions):
    """Options of the ``synthetic`` dataset."""

    num_classes: int = Field(4, ge=2, le=len(SHAPES), description="classes (object shapes)")
    image_size: int = Field(32, ge=16, description="side of the square images in pixels")
    train_per_class: int = Field(100, ge=1, description="training images per class")
    test_per_class: int = Field(100, ge=1, description="images per class of each test split")
    bias: float = Field(
        0.0, ge=0.0, le=1.0, description="background/class correlation of train and test_id (test_ood: never matching)"
    )


class Synthetic(DatasetPlugin):
    """Generated shapes on textured backgrounds; the background is a tunable shortcut (no files)."""

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
        return {
            "per_class": o.train_per_class if split == "train" else o.test_per_class,
            "num_classes": o.num_classes,
            "image_size": o.image_size,
            "bias": 0.0 if mismatched else o.bias,
            "mismatched": mismatched,
            "seed": self.seed,
            "stream": stream,
        }

    @per_split
    def samples(self, split: str) -> SyntheticShapes:
        return SyntheticShapes(**self._arguments(split))  # generating costs time: once per split

    def identity(self, split: str) -> dict:
        return {"kind": "synthetic_shapes", "generator_version": GENERATOR_VERSION, **self._arguments(split)}


@hookimpl
def register_datasets(register) -> None:
    register(Synthetic)
