"""Helpers for datasets stored as image files: decoding, folder listing, file-list digests."""

from __future__ import annotations

import functools
import hashlib
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset as TorchDataset
from tqdm.auto import tqdm

from ..errors import DataError

T = TypeVar("T")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def per_split(method: Callable[[Any, str], T]) -> Callable[[Any, str], T]:
    """Memoise a dataset method of one split (file lists, parsed annotations, checks) per instance
    and seed, so samples, identity and views of a split read the disk once."""

    @functools.wraps(method)
    def wrapper(self, split: str) -> T:
        memo = self.__dict__.setdefault("_per_split", {})
        key = (method.__name__, split, getattr(self, "seed", None))
        if key not in memo:
            memo[key] = method(self, split)
        return memo[key]

    return wrapper


def read_image(path: str | Path) -> torch.Tensor:
    """(3, H, W) uint8 RGB tensor of an image file (grayscale, palette, CMYK, alpha: converted).

    An unreadable or truncated file raises :class:`DataError` naming it.
    """
    try:
        with Image.open(path) as img:
            img.load()  # decodes fully: a truncated file fails here
            rgb = img if img.mode == "RGB" else img.convert("RGB")
            pixels = np.array(rgb)
    except FileNotFoundError:
        raise DataError(f"{path}: image file not found") from None
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
        raise unreadable(path, exc) from None
    return torch.from_numpy(pixels).permute(2, 0, 1)


def unreadable(path: str | Path, exc: Exception) -> DataError:
    """The one-line error of an image file that does not decode."""
    return DataError(
        f"{path}: unreadable or truncated image ({type(exc).__name__}: {exc}); replace or remove it, "
        f"or set data.options.skip_unreadable: true"
    )


def require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise DataError(f"{what}: {path}: folder not found")
    return path


def require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise DataError(f"{what}: {path}: file not found")
    return path


def list_images(folder: Path, extensions: Sequence[str]) -> list[Path]:
    """Image files directly in ``folder`` (any depth below it too), sorted, by extension (case-insensitive)."""
    exts = {e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions}
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in exts and p.is_file())


def files_digest(paths: Sequence[Path], root: Path) -> str:
    """SHA-256 of the file list (paths relative to ``root``), for cache fingerprints."""
    digest = hashlib.sha256()
    for p in paths:
        digest.update(str(Path(p).relative_to(root)).encode() + b"\n")
    return digest.hexdigest()


def drop_unreadable(paths: Sequence[Path], *, progress: bool = True) -> list[int]:
    """Indices of ``paths`` that decode; warns once with the count of those that do not."""
    good, bad = [], []
    for i, p in enumerate(tqdm(paths, desc="checking images", unit="img", disable=not progress, leave=False)):
        try:
            read_image(p)
            good.append(i)
        except DataError:
            bad.append(p)
    if bad:
        warnings.warn(f"e2kd: skipped {len(bad)} unreadable image(s), e.g. {bad[0]}")  # noqa: B028
    return good


class ImageFiles(TorchDataset):
    """Samples read from image files: ``{"image": uint8 (3, H, W), "label": labels[i], k: fields[k][i]}``."""

    def __init__(
        self, paths: Sequence[Path], labels: torch.Tensor, fields: dict[str, torch.Tensor] | None = None
    ) -> None:
        fields = fields or {}
        if any(len(v) != len(paths) for v in [labels, *fields.values()]):
            raise ValueError("labels and every field need one entry per path")
        self.paths, self.labels, self.fields = list(paths), labels, fields

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = {"image": read_image(self.paths[index]), "label": self.labels[index]}
        item.update({k: v[index] for k, v in self.fields.items()})
        return item


class EncodedFiles(TorchDataset):
    """The samples of :class:`ImageFiles` with each image as its file's bytes (1-D uint8), not
    decoded: for decoding on the training device (``data.decode: device``)."""

    def __init__(self, files: ImageFiles) -> None:
        self.paths, self.labels, self.fields = files.paths, files.labels, files.fields

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path = self.paths[index]
        try:
            data = Path(path).read_bytes()
        except FileNotFoundError:
            raise DataError(f"{path}: image file not found") from None
        item = {"image": torch.frombuffer(bytearray(data), dtype=torch.uint8), "label": self.labels[index]}
        item.update({k: v[index] for k, v in self.fields.items()})
        return item
