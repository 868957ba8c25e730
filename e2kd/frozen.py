"""Frozen teacher ("❄" in the paper): logits and explanations computed once, replayed.

The teacher is run once over the un-augmented training images; its logits and maps for its
top-1 class are stored in float16 (or float32) shards with a JSON index. Training then reads
them memory-mapped, applies the image's geometric augmentation to the map too, and never
runs the teacher. The index carries a fingerprint of everything that determines the stored
values — teacher weights, explainer and options, dataset identity, preprocessing — so a
cache made for another setting is refused with the reason, and a checksum per shard file
so a corrupt or truncated cache is detected before it is read.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, Subset
from tqdm.auto import tqdm

from .api import Explainer
from .data import make_loader
from .data.augment import resize_map
from .digests import file_sha256
from .errors import CacheError, StaleCacheError
from .explaining import explained_forward
from .runtime import Runtime, at_least_fp32
from .storage import atomic_write_bytes, atomic_write_json, describe_difference

CACHE_FORMAT = 1
INDEX = "index.json"
PART_PREFIX = "index.part-"


def weights_digest(model: nn.Module) -> str:
    """SHA-256 of a model's state dict (names, dtypes, shapes and values)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return digest.hexdigest()


def make_fingerprint(
    teacher: nn.Module,
    teacher_ref: dict[str, Any],
    explainer: Explainer,
    dataset_identity: dict[str, Any],
    dtype: str,
    precision: str = "fp32",
) -> dict[str, Any]:
    """Everything the stored values depend on, component by component (``precision``: the autocast
    precision the teacher ran at, the run's ``train.precision``)."""
    return {
        "format": CACHE_FORMAT,
        "teacher": {**teacher_ref, "weights_sha256": weights_digest(teacher)},
        "explainer": {"name": explainer.name, "options": explainer.options.model_dump(mode="json")},
        "dataset": dataset_identity,
        "preprocessing": {"view": "whole un-augmented image", "storage_dtype": dtype, "precision": precision},
    }


def fingerprint_hash(fingerprint: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()


def _shard_name(shard: int, part: str) -> str:
    return f"shard-{shard:05d}.{part}.npy"


def _save_npy(path: Path, array: np.ndarray) -> dict[str, Any]:
    buffer = io.BytesIO()
    np.save(buffer, array)
    data = buffer.getvalue()
    atomic_write_bytes(path, data)
    return {"file": path.name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _read_index(root: Path) -> dict[str, Any] | None:
    path = root / INDEX
    if not path.is_file():
        return None
    try:
        index = json.loads(path.read_text())
        assert isinstance(index, dict) and "fingerprint" in index and "shards" in index
        return index
    except (ValueError, AssertionError):
        raise CacheError(f"{path}: unreadable cache index; delete {root} and run `e2kd precompute` again") from None


def _shard_ok(root: Path, entry: dict[str, Any], *, checksum: bool) -> str | None:
    """None if the shard's files are intact, else what is wrong."""
    for part in ("logits", "maps"):
        info = entry[part]
        path = root / info["file"]
        if not path.is_file():
            return f"{path.name} is missing"
        if path.stat().st_size != info["bytes"]:
            return f"{path.name} is truncated or resized ({path.stat().st_size} bytes, expected {info['bytes']})"
        if checksum and file_sha256(path) != info["sha256"]:
            return f"{path.name} is corrupt (checksum mismatch)"
    return None


def build_cache(
    root: str | Path,
    teacher: nn.Module,
    explainer: Explainer,
    images: torch.Tensor | Dataset,
    fingerprint: dict[str, Any],
    *,
    dtype: str,
    shard_size: int,
    batch_size: int,
    progress: bool,
    force: bool = False,
    num_workers: int = 0,
    runtime: Runtime | None = None,
) -> Path:
    """Compute and store the teacher's logits and maps for ``images``: a dataset whose items hold
    an ``image`` (read through a DataLoader, shard by shard, in bounded memory) or an (N, C, H, W)
    tensor. Entries are keyed by sample index. ``runtime`` gives the device (default: one CPU process).

    Resumable: shards already written and intact are kept. A cache made for another
    fingerprint is refused (``force=True`` deletes it first). Under several processes (``runtime``)
    each computes every ``world_size``-th shard and records it in its own part of the index; the
    main process merges the parts into the index when all are done (same files as one process).
    """
    root = Path(root)
    runtime = runtime or Runtime(torch.device("cpu"))
    n = len(images)
    with runtime.main_first():  # the main process checks, clears (force) and creates the folder
        index = _read_index(root)
        if index is not None and index["fingerprint"] != fingerprint:
            if not force:
                raise _stale(root, index["fingerprint"], fingerprint)
            if runtime.is_main:
                shutil.rmtree(root)
            index = None
        if index is None:
            index = {
                "format": CACHE_FORMAT,
                "fingerprint": fingerprint,
                "num_samples": n,
                "shard_size": shard_size,
                "dtype": dtype,
                "shards": {},
                "complete": False,
            }
        elif index["num_samples"] != n or index["shard_size"] != shard_size or index["dtype"] != dtype:
            raise CacheError(
                f"{root}: cache layout differs (samples/shard size/dtype); delete it or use another cache_dir"
            )
        if runtime.is_main:
            root.mkdir(parents=True, exist_ok=True)
    index["shards"].update(_parts(root, fingerprint))
    num_shards = (n + shard_size - 1) // shard_size
    np_dtype = np.float16 if dtype == "float16" else np.float32
    teacher = teacher.to(runtime.device).eval()
    mine = [s for s in range(num_shards) if s % runtime.world_size == runtime.rank]
    part = {"fingerprint": fingerprint, "shards": {}}
    bar = tqdm(
        total=sum(min(n, (s + 1) * shard_size) - s * shard_size for s in mine),
        desc="precompute teacher",
        unit="img",
        disable=not progress or not runtime.is_main,
        leave=False,
    )
    for shard in mine:
        lo, hi = shard * shard_size, min(n, (shard + 1) * shard_size)
        entry = index["shards"].get(str(shard))
        if entry is not None and _shard_ok(root, entry, checksum=True) is None:
            bar.update(hi - lo)
            continue
        logits, maps = [], []
        for batch in _batches(images, lo, hi, batch_size, num_workers, runtime.device):
            with runtime.autocast():  # the teacher a live distillation would see, at the run's precision
                z, m, _ = explained_forward(teacher, batch.to(runtime.device), explainer)
            logits.append(at_least_fp32(z).cpu())
            maps.append(at_least_fp32(m[:, 0]).cpu())
            bar.update(batch.shape[0])
        entry = {
            "logits": _save_npy(root / _shard_name(shard, "logits"), torch.cat(logits).numpy().astype(np_dtype)),
            "maps": _save_npy(root / _shard_name(shard, "maps"), torch.cat(maps).numpy().astype(np_dtype)),
        }
        if runtime.distributed:  # progress is durable after every shard, in this process's part
            part["shards"][str(shard)] = entry
            atomic_write_json(root / f"{PART_PREFIX}{runtime.rank}.json", part)
        else:
            index["shards"][str(shard)] = entry
            atomic_write_json(root / INDEX, index)
    bar.close()
    runtime.barrier()
    if runtime.is_main:
        index["shards"].update(_parts(root, fingerprint))
        index["complete"] = len(index["shards"]) == num_shards
        atomic_write_json(root / INDEX, index)
        for path in root.glob(f"{PART_PREFIX}*.json"):
            path.unlink()
    runtime.barrier()
    return root


def _parts(root: Path, fingerprint: dict[str, Any]) -> dict[str, Any]:
    """Shard entries recorded by the processes of an unfinished multi-process build of this cache."""
    shards: dict[str, Any] = {}
    for path in sorted(root.glob(f"{PART_PREFIX}*.json")):
        try:
            part = json.loads(path.read_text())
        except ValueError:
            continue  # an unreadable part: its shards are simply computed again
        if part.get("fingerprint") == fingerprint:
            shards.update(part.get("shards", {}))
    return shards


def _batches(
    images: torch.Tensor | Dataset, lo: int, hi: int, batch_size: int, num_workers: int, device: str | torch.device
) -> Iterator[torch.Tensor]:
    """The images of samples lo..hi-1 in batches."""
    if isinstance(images, torch.Tensor):
        for start in range(lo, hi, batch_size):
            yield images[start : min(hi, start + batch_size)]
        return
    loader = make_loader(Subset(images, range(lo, hi)), batch_size, num_workers=num_workers, device=device)
    for batch in loader:
        yield batch["image"]


def _stale(root: Path, stored: dict[str, Any], current: dict[str, Any]) -> StaleCacheError:
    changes = describe_difference(stored, current)
    return StaleCacheError(
        f"{root}: cache was made for another setting: {'; '.join(changes)}. "
        f"Run `e2kd precompute --force` to rebuild it, or set distill.cache_dir elsewhere"
    )


class TeacherCache:
    """Read access to a complete, verified cache: ``cache[i] -> (logits, map)`` as float32 tensors."""

    def __init__(self, root: Path, index: dict[str, Any]) -> None:
        self.root, self.index = root, index
        self.shard_size = index["shard_size"]
        shards = [index["shards"][str(s)] for s in range(len(index["shards"]))]
        self._logits = [np.load(root / e["logits"]["file"], mmap_mode="r") for e in shards]
        self._maps = [np.load(root / e["maps"]["file"], mmap_mode="r") for e in shards]

    @classmethod
    def open(
        cls, root: str | Path, fingerprint: dict[str, Any] | None = None, *, checksum: bool = True
    ) -> TeacherCache:
        """Open ``root``; refuse it if missing, incomplete, stale (fingerprint differs) or corrupt."""
        root = Path(root)
        index = _read_index(root)
        if index is None:
            raise CacheError(f"{root}: no teacher cache here; run `e2kd precompute CONFIG` first")
        if fingerprint is not None and index["fingerprint"] != fingerprint:
            raise _stale(root, index["fingerprint"], fingerprint)
        expected = (index["num_samples"] + index["shard_size"] - 1) // index["shard_size"]
        if not index.get("complete") or len(index["shards"]) != expected:
            raise CacheError(
                f"{root}: cache is incomplete ({len(index['shards'])}/{expected} shards); "
                f"rerun `e2kd precompute` to finish it"
            )
        for shard in range(expected):
            problem = _shard_ok(root, index["shards"][str(shard)], checksum=checksum)
            if problem is not None:
                raise CacheError(f"{root}: {problem}; rerun `e2kd precompute` to rebuild the damaged shard")
        return cls(root, index)

    def __len__(self) -> int:
        return self.index["num_samples"]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        shard, offset = divmod(i, self.shard_size)
        logits = torch.from_numpy(np.array(self._logits[shard][offset], dtype=np.float32))
        maps = torch.from_numpy(np.array(self._maps[shard][offset], dtype=np.float32))
        return logits, maps


class FrozenTeacherDataset(Dataset):
    """A dataset's items plus the cached ``teacher_logits`` and ``teacher_map``, then ``transform``.

    The map is resized to the item's image (for the item view, which stacks them); with
    ``resize_maps=False`` it stays as stored (the device view samples it at the image's crop)."""

    def __init__(
        self,
        base: Dataset,
        cache: TeacherCache,
        transform: Callable[[dict], dict] | None = None,
        *,
        resize_maps: bool = True,
    ) -> None:
        if len(base) != len(cache):
            raise CacheError(f"{cache.root}: cache holds {len(cache)} samples, the dataset {len(base)}")
        self.base, self.cache, self.transform, self.resize_maps = base, cache, transform, resize_maps

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        logits, teacher_map = self.cache[i]
        item = self.base[i]
        if self.resize_maps:
            teacher_map = resize_map(teacher_map, item["image"].shape[-2:])
        item = {**item, "teacher_logits": logits, "teacher_map": teacher_map}
        return self.transform(item) if self.transform is not None else item
