"""Miniature datasets written in the real on-disk formats, for tests, benchmarks and trying configs.

Each writer returns a manifest of what it wrote (file -> label, group, boxes), so a reader can be
checked against it. Images are smooth random colour fields with noise, saved as real JPEG/PNG
files; sizes vary so resizing and cropping are exercised.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .voc_format import VOC_OBJECT, VOC_XML


def random_image(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A smooth colour field (bilinear 4x4 control points) plus noise, as an RGB image."""
    grid = rng.uniform(0, 255, (4, 4, 3)).astype(np.float32)
    small = Image.fromarray(grid.astype(np.uint8)).resize((width, height), Image.BILINEAR)
    pixels = np.asarray(small, dtype=np.float32) + rng.normal(0, 12, (height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _size(rng: np.random.Generator, size: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    lo, hi = size
    return int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1))


def write_image_folder(
    root: str | Path,
    classes: Sequence[str],
    per_class: dict[str, int],
    *,
    size: int | tuple[int, int] = (40, 64),
    seed: int = 0,
    quality: int = 90,
) -> dict[str, list[tuple[Path, int]]]:
    """``root/<split>/<class>/<i>.jpg`` for each split in ``per_class`` (e.g. train, val); class
    index = position in sorted ``classes``. Returns split -> [(path, label)]."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    manifest: dict[str, list[tuple[Path, int]]] = {}
    for split, count in per_class.items():
        manifest[split] = []
        for label, name in enumerate(sorted(classes)):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                path = folder / f"{name}_{split}_{i:04d}.jpg"
                random_image(rng, *_size(rng, size)).save(path, quality=quality)
                manifest[split].append((path, label))
    return manifest


WATERBIRDS_COLUMNS = ("img_id", "img_filename", "y", "split", "place", "place_filename")


def write_waterbirds(
    root: str | Path,
    counts: dict[str, dict[tuple[int, int], int]],
    *,
    size: int | tuple[int, int] = (40, 64),
    seed: int = 0,
    metadata: str = "metadata.csv",
    draw: Callable[[np.random.Generator, int, int], tuple[Image.Image, dict[str, Any]]] | None = None,
) -> list[dict[str, Any]]:
    """Images under ``root/<species>/`` and ``root/<metadata>`` with columns img_id, img_filename,
    y, split, place, place_filename. ``counts[split][(y, place)]`` images per group. ``draw(rng,
    y, place)`` returns an image and extra fields for its row instead of a random image. Returns the rows."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    rows: list[dict[str, Any]] = []
    split_code = {"train": 0, "val": 1, "test": 2}
    for split, groups in counts.items():
        for (y, place), n in groups.items():
            for _ in range(n):
                idx = len(rows) + 1
                name = f"{idx:03d}.{'Water' if y else 'Land'}bird/img_{idx:05d}.jpg"
                (root / name).parent.mkdir(parents=True, exist_ok=True)
                image, extra = (random_image(rng, *_size(rng, size)), {}) if draw is None else draw(rng, y, place)
                image.save(root / name, quality=95)
                rows.append(
                    {
                        "img_id": idx,
                        "img_filename": name,
                        "y": y,
                        "split": split_code[split],
                        "place": place,
                        "place_filename": f"/{'o/ocean' if place else 'b/bamboo_forest'}/x.jpg",
                        **extra,
                    }
                )
    with open(root / metadata, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(WATERBIRDS_COLUMNS), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return rows


def write_voc(
    root: str | Path,
    images: dict[str, list[dict[str, Any]]],
    *,
    year: str = "2007",
    seed: int = 0,
) -> Path:
    """``root/VOCdevkit/VOC<year>/{JPEGImages,Annotations,ImageSets/Main}``. ``images[split]`` lists
    ``{"id", "width", "height", "objects": [(class, (xmin, ymin, xmax, ymax) 1-based, difficult)]}``.
    Returns the VOC<year> folder."""
    rng = np.random.default_rng(seed)
    base = Path(root) / "VOCdevkit" / f"VOC{year}"
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    for split, entries in images.items():
        for e in entries:
            random_image(rng, e["width"], e["height"]).save(base / "JPEGImages" / f"{e['id']}.jpg", quality=90)
            objects = "".join(
                VOC_OBJECT.format(cls=c, difficult=int(d), x1=b[0], y1=b[1], x2=b[2], y2=b[3])
                for c, b, d in e["objects"]
            )
            (base / "Annotations" / f"{e['id']}.xml").write_text(
                VOC_XML.format(year=year, name=e["id"], w=e["width"], h=e["height"], objects=objects)
            )
        (base / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{e['id']}\n" for e in entries))
    return base
