"""The decoded-image cache: a split decoded once, resized, stored as uint8 in one memory-mapped file.

``e2kd prepare CONFIG`` (or the first training run with ``data.cache: decoded``) reads every sample of
the training split once, resizes it so its short side is ``data.short_side`` (default: the
evaluation view's resize, ``image_size``·256/224) with torchvision's antialiased resize, and appends
its pixels (height × width × RGB, uint8) and its masks to ``pixels.u8``. ``samples.pt`` holds each
sample's size and offset, its label and other fields, and its boxes (scaled with the image).
Reading needs no decoder: a sample is a slice of the memory map.

The cache's habits are the frozen-teacher cache's: a fingerprint (the dataset's identity, which for
image files includes a digest of the file list, and the resize) decides whether a cache fits; a
cache made for another setting is refused in one line naming the difference; the pixels are
checksummed in chunks, verified when the cache is opened; a killed build resumes from its last
whole chunk (recorded in ``progress.json``) and ends with the same bytes as an uninterrupted one;
``--force`` rebuilds.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset
from torch.utils.data import Dataset as TorchDataset
from torchvision import tv_tensors
from torchvision.transforms import v2
from tqdm.auto import tqdm

from ..errors import CacheError, StaleCacheError
from ..storage import atomic_torch_save, atomic_write_bytes, atomic_write_json, describe_difference, e2kd_cache_dir
from .augment import EVAL_RESIZE_RATIO

FORMAT = 1
INDEX, PIXELS, SAMPLES, PROGRESS = "index.json", "pixels.u8", "samples.pt", "progress.json"
#: Samples per checksummed chunk (and per durable step of a build).
CHUNK = 256
RESIZE = "torchvision v2.Resize(short_side, antialias=True) of uint8 RGB; masks nearest; boxes scaled"


def default_short_side(image_size: int) -> int:
    """The stored short side when ``data.short_side`` is unset: the evaluation view's resize."""
    return round(image_size * EVAL_RESIZE_RATIO)


def decoded_fingerprint(identity: dict[str, Any], short_side: int) -> dict[str, Any]:
    """Everything the stored bytes depend on: the split's identity and the resize."""
    return {"format": FORMAT, "dataset": identity, "short_side": short_side, "resize": RESIZE}


def default_root(fingerprint: dict[str, Any], base: str | Path | None = None) -> Path:
    """``base`` (default ``$E2KD_CACHE_DIR``, else ``~/.cache/e2kd``) / ``decoded-<dataset>-<split>-<hash>``."""
    base = Path(base).expanduser() if base else e2kd_cache_dir()
    identity = fingerprint["dataset"]
    digest = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:12]
    return base / f"decoded-{identity.get('dataset', 'data')}-{identity.get('split', 'split')}-{digest}"


class Resized:
    """Item transform of the build: the image as uint8 with its short side ``short_side`` (masks and
    boxes resized with it); every other field unchanged."""

    def __init__(self, short_side: int) -> None:
        self.resize = v2.Resize(short_side, antialias=True)

    def __call__(self, item: dict[str, Any]) -> dict[str, Any]:
        image = item["image"]
        if image.is_floating_point():
            image = image.mul(255).round_().clamp_(0, 255).to(torch.uint8)
        inputs: dict[str, Any] = {"image": tv_tensors.Image(image)}
        if "mask" in item:
            inputs["mask"] = tv_tensors.Mask(torch.as_tensor(item["mask"]))
        if "boxes" in item:
            inputs["boxes"] = item["boxes"]
        moved = self.resize(inputs)
        out = {**item, "image": moved["image"].as_subclass(torch.Tensor)}
        if "mask" in item:
            mask = moved["mask"].as_subclass(torch.Tensor)
            out["mask"] = (
                mask.round().clamp(0, 255).to(torch.uint8) if mask.is_floating_point() else mask.to(torch.uint8)
            )
        if "boxes" in item:
            out["boxes"] = moved["boxes"]
        return out


class _Items(TorchDataset):
    def __init__(self, samples: TorchDataset, transform: Resized) -> None:
        self.samples, self.transform = samples, transform

    def __len__(self) -> int:
        return len(self.samples)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.transform(self.samples[index])


def _sha256(path: Path, start: int, end: int) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        handle.seek(start)
        left = end - start
        while left > 0:
            block = handle.read(min(left, 1 << 24))
            if not block:
                break
            digest.update(block)
            left -= len(block)
    return digest.hexdigest()


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text())
        assert isinstance(value, dict) and "fingerprint" in value
        return value
    except (ValueError, AssertionError):
        raise CacheError(
            f"{path}: unreadable; run `e2kd prepare CONFIG --force` to rebuild the decoded cache"
        ) from None


def _stale(root: Path, stored: dict[str, Any], current: dict[str, Any]) -> StaleCacheError:
    return StaleCacheError(
        f"{root}: decoded cache was made for another setting: {'; '.join(describe_difference(stored, current))}. "
        f"Run `e2kd prepare CONFIG --force` to rebuild it, or set data.cache_dir elsewhere"
    )


def _record(item: dict[str, Any]) -> tuple[bytes, dict[str, Any]]:
    """A resized item's bytes (pixels HWC, then masks KHW) and what ``samples.pt`` keeps of it."""
    image = item["image"]
    data = image.permute(1, 2, 0).contiguous().numpy().tobytes()
    meta: dict[str, Any] = {"size": tuple(image.shape[-2:]), "mask_channels": 0}
    if "mask" in item:
        mask = item["mask"]
        meta["mask_channels"] = mask.shape[0]
        data += mask.contiguous().numpy().tobytes()
    if "boxes" in item:
        meta["boxes"] = item["boxes"].as_subclass(torch.Tensor).float().clone()
        meta["box_labels"] = torch.as_tensor(item["box_labels"]).clone()
    meta["fields"] = {
        k: torch.as_tensor(v).clone() for k, v in item.items() if k not in ("image", "mask", "boxes", "box_labels")
    }
    return data, meta


def build_decoded(
    root: str | Path,
    samples: TorchDataset,
    fingerprint: dict[str, Any],
    *,
    short_side: int,
    num_workers: int = 0,
    progress: bool = True,
    force: bool = False,
    chunk: int = CHUNK,
) -> Path:
    """Decode, resize and store every sample of ``samples`` under ``root`` (see the module docstring).

    A complete cache of this fingerprint is left as it is; an interrupted build of it is resumed;
    one of another fingerprint is refused unless ``force`` (which deletes ``root`` first).
    """
    root = Path(root)
    if force and root.exists():
        shutil.rmtree(root)
    index = _read_json(root / INDEX)
    if index is not None:
        if index["fingerprint"] != fingerprint:
            raise _stale(root, index["fingerprint"], fingerprint)
        return root
    state = _read_json(root / PROGRESS)
    if state is not None and state["fingerprint"] != fingerprint:
        raise _stale(root, state["fingerprint"], fingerprint)
    n = len(samples)  # type: ignore[arg-type]
    state = state or {"fingerprint": fingerprint, "samples": 0, "bytes": 0, "chunks": []}
    root.mkdir(parents=True, exist_ok=True)
    pixels = root / PIXELS
    with pixels.open("ab") as handle:
        handle.truncate(state["bytes"])  # drop what a killed build wrote after its last whole chunk
    loader = DataLoader(
        Subset(_Items(samples, Resized(short_side)), range(state["samples"], n)),
        batch_size=chunk,
        num_workers=num_workers,
        collate_fn=list,
    )
    bar = tqdm(total=n, initial=state["samples"], desc="decoding images", unit="img", disable=not progress, leave=False)
    with pixels.open("ab") as handle:
        for items in loader:
            records = [_record(item) for item in items]
            data = b"".join(r[0] for r in records)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
            part = len(state["chunks"])
            atomic_torch_save([r[1] for r in records], root / f"part-{part:05d}.pt")
            state["chunks"].append(
                {"samples": len(items), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            )
            state["samples"] += len(items)
            state["bytes"] += len(data)
            atomic_write_json(root / PROGRESS, state)
            bar.update(len(items))
    bar.close()
    _finish(root, state, short_side)
    return root


def _finish(root: Path, state: dict[str, Any], short_side: int) -> None:
    """Merge the chunks' records into ``samples.pt`` and write the index: the cache is complete."""
    metas: list[dict[str, Any]] = []
    for part in range(len(state["chunks"])):
        metas += torch.load(root / f"part-{part:05d}.pt", weights_only=True)
    sizes = torch.tensor([m["size"] for m in metas], dtype=torch.long).reshape(-1, 2)
    mask_channels = torch.tensor([m["mask_channels"] for m in metas], dtype=torch.long)
    lengths = sizes[:, 0] * sizes[:, 1] * (3 + mask_channels)
    offsets = torch.cumsum(lengths, 0) - lengths
    names = list(metas[0]["fields"]) if metas else []
    record = {
        "sizes": sizes,
        "offsets": offsets,
        "mask_channels": mask_channels,
        "fields": {k: torch.stack([m["fields"][k] for m in metas]) for k in names},
    }
    if metas and "boxes" in metas[0]:
        record["boxes"] = [m["boxes"] for m in metas]
        record["box_labels"] = [m["box_labels"] for m in metas]
    buffer = io.BytesIO()  # (saved from memory: the archive's inner name, and so its bytes, never vary)
    torch.save(record, buffer)
    atomic_write_bytes(root / SAMPLES, buffer.getvalue())
    index = {
        "format": FORMAT,
        "fingerprint": state["fingerprint"],
        "num_samples": state["samples"],
        "short_side": short_side,
        "bytes": state["bytes"],
        "chunks": state["chunks"],
        "samples_sha256": hashlib.sha256((root / SAMPLES).read_bytes()).hexdigest(),
    }
    atomic_write_json(root / INDEX, index)
    (root / PROGRESS).unlink(missing_ok=True)  # (an empty split never wrote one)
    for part in range(len(state["chunks"])):
        (root / f"part-{part:05d}.pt").unlink()


class DecodedCache:
    """A complete, verified decoded cache: :meth:`samples` reads it, :attr:`sizes` gives every image's
    (height, width)."""

    def __init__(self, root: Path, index: dict[str, Any]) -> None:
        self.root, self.index = root, index
        record = torch.load(root / SAMPLES, weights_only=True)
        self.sizes: torch.Tensor = record["sizes"]
        self.offsets, self.mask_channels = record["offsets"], record["mask_channels"]
        self.fields: dict[str, torch.Tensor] = record["fields"]
        self.boxes, self.box_labels = record.get("boxes"), record.get("box_labels")
        # copy-on-write: writable views for torch, and nothing is ever written back to the file
        self.pixels = torch.from_numpy(np.memmap(root / PIXELS, dtype=np.uint8, mode="c")) if index["bytes"] else None

    @classmethod
    def open(
        cls,
        root: str | Path,
        fingerprint: dict[str, Any] | None = None,
        *,
        checksum: bool = True,
        progress: bool = False,
    ) -> DecodedCache:
        """Open ``root``; refuse it in one line if missing, unfinished, stale or damaged."""
        root = Path(root)
        index = _read_json(root / INDEX)
        if index is None:
            what = "an unfinished decoded cache" if (root / PROGRESS).is_file() else "no decoded cache"
            raise CacheError(f"{root}: {what} here; run `e2kd prepare CONFIG` to build it")
        if fingerprint is not None and index["fingerprint"] != fingerprint:
            raise _stale(root, index["fingerprint"], fingerprint)
        pixels, fix = root / PIXELS, "run `e2kd prepare CONFIG --force` to rebuild it"
        size = pixels.stat().st_size if pixels.is_file() else None
        if size != index["bytes"]:
            found = "missing" if size is None else f"{size} bytes, expected {index['bytes']}"
            raise CacheError(f"{pixels}: truncated or resized ({found}); {fix}")
        if (
            not (root / SAMPLES).is_file()
            or hashlib.sha256((root / SAMPLES).read_bytes()).hexdigest() != index["samples_sha256"]
        ):
            raise CacheError(f"{root / SAMPLES}: missing or corrupt (checksum mismatch); {fix}")
        if checksum:
            start = 0
            bar = tqdm(
                total=index["bytes"],
                desc="verifying decoded cache",
                unit="B",
                unit_scale=True,
                disable=not progress,
                leave=False,
            )
            for number, entry in enumerate(index["chunks"]):
                if _sha256(pixels, start, start + entry["bytes"]) != entry["sha256"]:
                    raise CacheError(f"{pixels}: chunk {number} is corrupt (checksum mismatch); {fix}")
                start += entry["bytes"]
                bar.update(entry["bytes"])
            bar.close()
        return cls(root, index)

    def __len__(self) -> int:
        return len(self.sizes)

    def samples(self) -> DecodedSamples:
        """The cached samples (uint8 images at their stored sizes)."""
        return DecodedSamples(self)


class DecodedSamples(TorchDataset):
    """``{"image": uint8 (3, h, w), "label": ..., <fields>, ["mask"], ["boxes", "box_labels"]}`` of a
    decoded cache: slices of its memory map, no decoding."""

    def __init__(self, cache: DecodedCache) -> None:
        self.cache = cache

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, index: int) -> dict[str, Any]:
        cache = self.cache
        if not 0 <= index < len(cache):
            raise IndexError(index)
        (height, width), start = cache.sizes[index].tolist(), int(cache.offsets[index])
        end = start + height * width * 3
        assert cache.pixels is not None
        item: dict[str, Any] = {"image": cache.pixels[start:end].view(height, width, 3).permute(2, 0, 1)}
        channels = int(cache.mask_channels[index])
        if channels:
            item["mask"] = cache.pixels[end : end + channels * height * width].view(channels, height, width)
        if cache.boxes is not None:
            item["boxes"] = tv_tensors.BoundingBoxes(cache.boxes[index], format="XYXY", canvas_size=(height, width))
            item["box_labels"] = cache.box_labels[index]  # type: ignore[index]
        item.update({k: v[index] for k, v in cache.fields.items()})
        return item
