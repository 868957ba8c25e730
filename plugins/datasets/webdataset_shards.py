"""``webdataset``: WebDataset tar shards (``train-{000000..000099}.tar``), read by random access.

A sample is the tar members sharing a key (the path up to the first dot of the file name): the
image under one of ``image_keys`` (``jpg``, ``png``, ...) and the class index under ``label_key``
(``cls``: its text). Each shard's member headers are read once to index where every sample's bytes
lie, so samples are read by seeking into the shard: e2kd's seeded, exactly resumable batches split
over processes by index work as for image files, and every node reads only its own samples' bytes.
Shards must be files (local or on a shared file system); ``pipe:`` and ``http(s)://`` URLs stream
and cannot be read at random, so they are refused. Needs the ``webdataset`` package (its brace
expansion; ``pip install 'e2kd[webdataset]'``).
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from pydantic import Field
from torch.utils.data import Dataset as TorchDataset

from e2kd import hookimpl
from e2kd.api import Dataset, PluginOptions
from e2kd.data.files import per_split, unreadable
from e2kd.data.subsets import per_class_draw
from e2kd.errors import DataError

HOLDOUT = "train_holdout"


class WebDatasetOptions(PluginOptions):
    """Options of the ``webdataset`` dataset."""

    shards: dict[str, str] = Field(
        ..., description="shard pattern per split, brace-expanded: {train: /d/train-{000..009}.tar, val: ...}"
    )
    class_names: list[str] = Field(..., min_length=2, description="the class names, in label order")
    image_keys: list[str] = Field(["jpg", "jpeg", "png", "webp"], min_length=1, description="image extensions")
    label_key: str = Field("cls", description="extension of the member holding the class index")
    train_split: str = Field("train", description="the split that trains")
    shots: int | None = Field(None, ge=1, description="training images per class, drawn with data.seed")
    holdout_per_class: int = Field(0, ge=0, description="images per class held out of train as split train_holdout")
    image_size: int = Field(224, ge=8, description="side of the square crops the models see")


#: (shard, offset, size) of a member's bytes
Extent = tuple[str, int, int]


def index_shard(path: Path, image_keys: list[str], label_key: str) -> list[tuple[str, Extent, int]]:
    """(key, image extent, label) of every sample of one shard, in the shard's order."""
    members: dict[str, dict[str, tarfile.TarInfo]] = {}
    try:
        with tarfile.open(path, "r:") as tar:  # uncompressed: members can be read at their offsets
            for info in tar:
                if not info.isfile():
                    continue
                directory, _, base = info.name.rpartition("/")
                stem, dot, extension = base.partition(".")
                if dot:
                    members.setdefault(f"{directory}/{stem}", {})[extension.lower()] = info
            samples = []
            for key, parts in members.items():
                image = next((parts[k] for k in image_keys if k in parts), None)
                if image is None or label_key not in parts:
                    continue
                text = tar.extractfile(parts[label_key]).read().decode().strip()  # type: ignore[union-attr]
                samples.append((key, (str(path), image.offset_data, image.size), int(text)))
    except (OSError, tarfile.TarError, ValueError) as exc:
        raise DataError(f"{path}: not a readable uncompressed WebDataset shard ({type(exc).__name__}: {exc})") from None
    if not samples:
        raise DataError(f"{path}: no samples with an image ({', '.join(image_keys)}) and a .{label_key} label")
    return samples


class ShardSamples(TorchDataset):
    """Samples read from their extents in the shards: ``{"image": uint8 (3, H, W), "label": int64}``."""

    def __init__(self, extents: list[Extent], labels: torch.Tensor) -> None:
        self.extents, self.labels = extents, labels

    def __len__(self) -> int:
        return len(self.extents)

    def __getitem__(self, index: int) -> dict[str, Any]:
        shard, offset, size = self.extents[index]
        with open(shard, "rb") as handle:
            handle.seek(offset)
            data = handle.read(size)
        try:
            with Image.open(io.BytesIO(data)) as img:
                pixels = np.array(img.convert("RGB"))
        except (OSError, ValueError, SyntaxError) as exc:
            raise unreadable(f"{shard} (offset {offset})", exc) from None
        return {"image": torch.from_numpy(pixels).permute(2, 0, 1), "label": self.labels[index]}


class WebDatasetShards(Dataset):
    """WebDataset tar shards per split, indexed once and read at random (resumable, split over processes)."""

    name = "webdataset"
    description = "WebDataset tar shards per split (brace patterns), read by random access; extra: webdataset"
    Options = WebDatasetOptions

    def check(self) -> None:
        if self.options.train_split not in self.options.shards:
            raise DataError(
                f"data.options.shards: no pattern for the training split {self.options.train_split!r} "
                f"(given: {', '.join(self.options.shards)})"
            )
        for split in self.options.shards:
            self._shards(split)

    def class_names(self) -> list[str]:
        return list(self.options.class_names)

    @property
    def train_split(self) -> str:
        return self.options.train_split

    def splits(self) -> tuple[str, ...]:
        others = tuple(s for s in self.options.shards if s != self.train_split)
        return (self.train_split,) + ((HOLDOUT,) if self.options.holdout_per_class else ()) + others

    def eval_splits(self) -> tuple[str, ...]:
        return tuple(s for s in self.splits() if s not in (self.train_split, HOLDOUT))

    @per_split
    def _shards(self, split: str) -> list[Path]:
        try:
            from braceexpand import braceexpand
        except ImportError:
            raise DataError("data: webdataset needs the webdataset package (pip install 'e2kd[webdataset]')") from None
        pattern = self.options.shards[split]
        if "://" in pattern or pattern.startswith("pipe:"):
            raise DataError(
                f"data.options.shards.{split}: {pattern!r} streams; e2kd reads shards at random (seeded, resumable "
                f"batches), so give files (local, or a shared file system)"
            )
        paths = [Path(p).expanduser() for p in braceexpand(pattern)]
        missing = [p for p in paths if not p.is_file()]
        if missing:
            raise DataError(
                f"data.options.shards.{split}: {missing[0]}: shard not found ({len(missing)} of {len(paths)} missing)"
            )
        return paths

    @per_split
    def _index(self, split: str) -> list[tuple[str, Extent, int]]:
        stored = self.train_split if split == HOLDOUT else split
        samples = [
            s
            for path in self._shards(stored)
            for s in index_shard(path, self.options.image_keys, self.options.label_key)
        ]
        bad = next((s for s in samples if not 0 <= s[2] < len(self.options.class_names)), None)
        if bad is not None:
            raise DataError(
                f"{bad[1][0]}: sample {bad[0]!r} has label {bad[2]}, outside 0..{len(self.options.class_names) - 1}"
            )
        if split not in (self.train_split, HOLDOUT) or (
            self.options.shots is None and not self.options.holdout_per_class
        ):
            return samples
        held, train = per_class_draw(
            [s[2] for s in samples],
            self.class_names(),
            shots=self.options.shots,
            holdout=self.options.holdout_per_class,
            seed=self.seed,
            where=self.options.shards[stored],
        )
        return [samples[i] for i in (held if split == HOLDOUT else train)]

    def samples(self, split: str) -> ShardSamples:
        if split not in self.splits():
            raise DataError(f"webdataset: no split {split!r} (known: {', '.join(self.splits())})")
        index = self._index(split)
        return ShardSamples([s[1] for s in index], torch.tensor([s[2] for s in index], dtype=torch.long))

    def identity(self, split: str) -> dict[str, Any]:
        index = self._index(split)
        digest = hashlib.sha256("\n".join(f"{s[0]} {s[1][0]} {s[1][2]}" for s in index).encode()).hexdigest()
        return {**super().identity(split), "samples_sha256": digest, "num_samples": len(index)}


@hookimpl
def register_datasets(register) -> None:
    register(WebDatasetShards)
