"""The data seam: a dataset plugin's samples, seen through a view, read by a DataLoader.

The core names no dataset: ``open_dataset`` asks the registry for the one a config names.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset

from ..api import Dataset
from .augment import make_view

if TYPE_CHECKING:
    from ..config import ExperimentConfig

__all__ = ["Dataset", "ViewDataset", "open_dataset", "dataset_of", "split_view", "make_loader"]


def open_dataset(name: str, options: dict[str, Any] | None = None, *, seed: int = 0, check: bool = True) -> Dataset:
    """The registered dataset ``name`` with validated ``options``; ``check`` verifies its files exist."""
    from ..registry import create

    dataset = create("dataset", name, options)
    dataset.seed = seed
    if check:
        dataset.check()
    return dataset


def dataset_of(config: ExperimentConfig) -> Dataset:
    """The dataset a config names (``data``), its files checked."""
    return open_dataset(config.data.name, config.data.options, seed=config.data.seed)


class ViewDataset(TorchDataset):
    """``transform(samples[i])``: one split of a dataset seen through a view."""

    def __init__(self, samples: TorchDataset, transform: Callable[[dict], dict] | None) -> None:
        self.samples, self.transform = samples, transform

    def __len__(self) -> int:
        return len(self.samples)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.samples[index]
        return self.transform(item) if self.transform is not None else item


def split_view(
    dataset: Dataset,
    split: str,
    view: str,
    *,
    augment: str = "auto",
    color_jitter: float = 0.0,
    samples: TorchDataset | None = None,
    uint8: bool = False,
) -> ViewDataset:
    """``split`` of ``dataset`` through ``view`` (``train`` | ``eval`` | ``whole``).

    ``augment: auto`` is the dataset's own default; ``samples`` replaces the split's raw samples
    (e.g. the same samples with a replayed teacher); ``uint8`` leaves uint8 images uint8 where nothing
    needs them as float (the training loop makes them float on its device).
    """
    kind = dataset.default_augment if augment == "auto" else augment
    transform = make_view(
        view,
        dataset.image_size,
        fixed_size=dataset.fixed_size,
        augment=kind,
        color_jitter=color_jitter,
        num_classes=dataset.num_classes,
        uint8=uint8,
    )
    return ViewDataset(samples if samples is not None else dataset.samples(split), transform)


def make_loader(
    dataset: TorchDataset, batch_size: int, *, num_workers: int = 0, device: torch.device | str = "cpu"
) -> DataLoader:
    """An in-order DataLoader for evaluation, caching and figures (pinned memory for CUDA).
    Training batches come from :class:`e2kd.train.EpochBatches` instead."""
    batch = max(1, min(batch_size, len(dataset)))  # type: ignore[arg-type]
    return DataLoader(
        dataset, batch_size=batch, num_workers=num_workers, pin_memory=torch.device(device).type == "cuda"
    )
