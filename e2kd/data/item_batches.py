"""The item view's batch source: a DataLoader whose workers live across epochs, uint8 to the device.

Each sample goes through its view in a loader worker (decode, geometry, colour jitter), as
``data.cache: none`` trains. The batches travel as uint8 where the view leaves images uint8 (a
quarter of float32's bytes through the worker queue and the pinned copy), are copied to the device
ahead of the step (:func:`e2kd.data.prefetch.on_device_ahead`) and become float in [0, 1] there.

Workers are started once (``persistent_workers``) and reseeded at the first sample of each epoch
exactly as a fresh worker of that epoch would be seeded (``base_seed`` from a generator seeded by
``(seed, epoch)``, plus the worker's id): a run draws the augmentation it drew when workers were
restarted every epoch, and a run resumed at an epoch boundary draws what the uninterrupted run drew.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler, get_worker_info
from torch.utils.data import Dataset as TorchDataset

from .prefetch import ReusedBuffers, on_device_ahead


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of ``epoch``'s loader generator (worker seeds and batch order derive from it)."""
    return seed * 100_003 + epoch


def worker_base_seed(seed: int, epoch: int) -> int:
    """The ``base_seed`` a DataLoader iterator started in ``epoch`` hands its workers."""
    generator = torch.Generator().manual_seed(epoch_seed(seed, epoch))
    return int(torch.empty((), dtype=torch.int64).random_(generator=generator).item())


def _seed_worker(base_seed: int, worker_id: int) -> None:
    """Seed this worker's RNGs as DataLoader seeds a fresh worker (torch, random, numpy)."""
    random.seed(base_seed + worker_id)
    torch.manual_seed(base_seed + worker_id)
    try:
        from torch.utils.data._utils.worker import _generate_state

        np.random.seed(_generate_state(base_seed, worker_id))
    except ImportError:  # (a private helper; without it numpy keeps its stream)
        pass


class _EpochKeys(Sampler[list[tuple[int, int]]]):
    """The batches of ``sampler`` as ``(epoch, index)`` keys, so a worker knows the epoch it serves."""

    def __init__(self, sampler: Any) -> None:
        self.sampler = sampler

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch = self.sampler.epoch
        for batch in self.sampler:
            yield [(epoch, i) for i in batch]


class _EpochItems(TorchDataset):
    """``dataset[i]`` for key ``(epoch, i)``; a worker reseeds itself when the epoch changes."""

    def __init__(self, dataset: TorchDataset, seed: int) -> None:
        self.dataset, self.seed, self.epoch = dataset, seed, None

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, index = key
        worker = get_worker_info()
        if worker is not None and epoch != self.epoch:
            _seed_worker(worker_base_seed(self.seed, epoch), worker.id)
            self.epoch = epoch
        return self.dataset[index]


def to_float_images(batch: dict[str, Any], host: ReusedBuffers | None = None) -> dict[str, Any]:
    """The batch with a uint8 ``image`` as float in [0, 1] (on whatever device it is; on the CPU in
    ``host``'s reused memory where given)."""
    image = batch.get("image")
    if torch.is_tensor(image) and image.dtype == torch.uint8:
        if host is not None and image.device.type == "cpu":
            floats = host.take(tuple(image.shape)).copy_(image)
        else:
            floats = image.float()
        batch = {**batch, "image": floats.div_(255)}
    return batch


class ItemBatches:
    """Batches of a map-style dataset for :func:`e2kd.train.fit` (see the module docstring)."""

    def __init__(self, dataset: TorchDataset, *, num_workers: int = 0, seed: int = 0) -> None:
        self.dataset, self.num_workers, self.seed = dataset, num_workers, seed
        self.generator = torch.Generator()
        self.loader: DataLoader | None = None
        self._host_images = ReusedBuffers(keep=4)  # the batch ahead, the step's, the last one's

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def batches(self, sampler: Any, device: torch.device) -> Iterator[dict[str, Any]]:
        """The batches of ``sampler``'s current epoch on ``device`` (workers started on first use)."""
        if self.loader is None or self.loader.batch_sampler.sampler is not sampler:  # type: ignore[union-attr]
            self.loader = DataLoader(
                _EpochItems(self.dataset, self.seed),
                batch_sampler=_EpochKeys(sampler),
                num_workers=self.num_workers,
                persistent_workers=self.num_workers > 0,
                generator=self.generator,
                pin_memory=device.type == "cuda",
            )
        self.generator.manual_seed(epoch_seed(self.seed, sampler.epoch))  # worker seeds of a fresh start
        for batch in on_device_ahead(iter(self.loader), device):
            yield to_float_images(batch, self._host_images)
