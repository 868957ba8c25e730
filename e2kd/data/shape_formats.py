"""Shape images (:mod:`e2kd.data.shapes`) written in the real on-disk formats of the paper's data.

The same dataset plugins that read a real copy then read these, so an experiment run on them goes
through the full-size code path, and the images carry the structure each claim of the paper is
about: the class is the shape, the background can be a shortcut, and the boxes are where the
objects are.

- :func:`write_shapes_folder` — the ImageNet layout ``root/<split>/<class>/*.jpg``;
- :func:`write_shapes_waterbirds` — the Waterbirds layout: two shapes ("landbird" = the first,
  "waterbird" = the second) on two background types ("land", "water"), ``metadata.csv`` with
  ``y``, ``place`` and ``split``; the group sizes set how spurious the background is;
- :func:`write_shapes_voc` — the VOCdevkit layout: one to ``max_objects`` shapes of different
  classes per image (the first VOC class names), each with its bounding box.

Every writer returns a manifest of what it wrote, object masks included, so a reader can be checked
against it. Images are square JPEGs (quality 95).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .miniature import write_waterbirds
from .shapes import BACKGROUNDS, SHAPES, _background, _shape_mask, render
from .voc_format import VOC_CLASSES, VOC_OBJECT, VOC_XML


def _pil(image: np.ndarray) -> Image.Image:
    """A (3, H, W) float image in [0, 1] as an RGB PIL image."""
    return Image.fromarray(np.clip(np.round(image.transpose(1, 2, 0) * 255), 0, 255).astype(np.uint8))


def _save(image: np.ndarray, path: Path) -> None:
    """A (3, H, W) float image in [0, 1] as a JPEG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _pil(image).save(path, quality=95)


def _background_for(label: int, bias: float, kinds: int, rng: np.random.Generator) -> int:
    return label if rng.random() < bias else int(rng.integers(kinds))


def write_shapes_folder(
    root: str | Path,
    per_class: dict[str, int],
    *,
    num_classes: int = 4,
    size: int = 64,
    bias: float = 0.0,
    seed: int = 0,
) -> dict[str, list[dict[str, Any]]]:
    """``root/<split>/<shape>/<i>.jpg``: ``per_class[split]`` images per class; with probability
    ``bias`` the background type is the class's own. Manifest: split -> [{path, label, background, mask}]."""
    if not 2 <= num_classes <= len(SHAPES):
        raise ValueError(f"num_classes must be in [2, {len(SHAPES)}] (got {num_classes})")
    rng = np.random.default_rng(seed)
    names = sorted(SHAPES[:num_classes])  # the folder plugin orders classes by sorted folder name
    manifest: dict[str, list[dict[str, Any]]] = {}
    for split, count in per_class.items():
        manifest[split] = []
        for name in names:
            shape = SHAPES.index(name)
            for i in range(count):
                background = _background_for(shape, bias, num_classes, rng)
                image, mask = render(shape, background, size, rng)
                path = Path(root) / split / name / f"{name}_{i:05d}.jpg"
                _save(image, path)
                manifest[split].append(
                    {"path": path, "label": names.index(name), "background": background, "mask": mask}
                )
    return manifest


def write_shapes_waterbirds(
    root: str | Path, counts: dict[str, dict[tuple[int, int], int]], *, size: int = 64, seed: int = 0
) -> list[dict[str, Any]]:
    """``counts[split][(y, place)]`` images of shape ``y`` on background type ``place``, in the
    Waterbirds layout (:func:`e2kd.data.miniature.write_waterbirds`). Returns the rows, each with
    its object's ``mask``."""

    def draw(rng: np.random.Generator, y: int, place: int) -> tuple[Image.Image, dict[str, Any]]:
        image, mask = render(y, place, size, rng)
        return _pil(image), {"mask": mask}

    return write_waterbirds(root, counts, seed=seed, draw=draw)


def render_scene(labels: list[int], size: int, rng: np.random.Generator) -> tuple[np.ndarray, list[np.ndarray]]:
    """One (3, H, W) image with a shape per label, side by side in equal columns (so they do not
    overlap), on a random background; returns the image and each object's (H, W) mask."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    period = rng.uniform(4.0, 7.0)
    texture = _background(int(rng.integers(len(BACKGROUNDS))), x, y, period, rng.uniform(0, period))
    dark, light = rng.uniform(0.05, 0.3, 3), rng.uniform(0.35, 0.6, 3)
    image = dark[:, None, None] + (light - dark)[:, None, None] * texture[None]
    width = size / len(labels)
    masks = []
    for i, label in enumerate(labels):
        radius = rng.uniform(0.55, 0.8) * min(width, size) / 2
        cx = rng.uniform(i * width + radius, (i + 1) * width - radius)
        cy = rng.uniform(radius, size - radius)
        mask = _shape_mask(label, (x - cx) / radius, (y - cy) / radius)
        image = np.where(mask[None], rng.uniform(0.65, 1.0, 3)[:, None, None], image)
        masks.append(mask)
    image = image + rng.normal(0.0, 0.03, image.shape)
    return np.clip(image, 0.0, 1.0).astype(np.float32), masks


def write_shapes_voc(
    root: str | Path,
    images: dict[str, int],
    *,
    num_classes: int = 4,
    size: int = 96,
    max_objects: int = 2,
    year: str = "2007",
    seed: int = 0,
) -> dict[str, list[dict[str, Any]]]:
    """``images[split]`` images in ``root/VOCdevkit/VOC<year>`` (image set ``<split>.txt``), each
    with 1..``max_objects`` shapes of different classes; shape k is VOC's k-th class, its box the
    bounding box of its mask (VOC's 1-based inclusive pixel coordinates). Manifest: split ->
    [{id, objects: [(class index, (x1, y1, x2, y2), mask)]}]."""
    if not 2 <= num_classes <= len(SHAPES) or not 1 <= max_objects <= num_classes:
        raise ValueError(f"need 2 <= num_classes <= {len(SHAPES)} and 1 <= max_objects <= num_classes")
    rng = np.random.default_rng(seed)
    base = Path(root) / "VOCdevkit" / f"VOC{year}"
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    manifest: dict[str, list[dict[str, Any]]] = {}
    for split, count in images.items():
        manifest[split] = []
        for i in range(count):
            ident = f"{split}_{i:05d}"
            labels = [
                int(c) for c in rng.choice(num_classes, size=int(rng.integers(1, max_objects + 1)), replace=False)
            ]
            image, masks = render_scene(labels, size, rng)
            _save(image, base / "JPEGImages" / f"{ident}.jpg")
            objects = []
            for label, mask in zip(labels, masks):
                rows, cols = np.nonzero(mask)
                box = (int(cols.min()) + 1, int(rows.min()) + 1, int(cols.max()) + 1, int(rows.max()) + 1)
                objects.append((label, box, mask))
            xml = "".join(
                VOC_OBJECT.format(cls=VOC_CLASSES[c], difficult=0, x1=b[0], y1=b[1], x2=b[2], y2=b[3])
                for c, b, _ in objects
            )
            (base / "Annotations" / f"{ident}.xml").write_text(
                VOC_XML.format(year=year, name=ident, w=size, h=size, objects=xml)
            )
            manifest[split].append({"id": ident, "objects": objects})
        (base / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{e['id']}\n" for e in manifest[split]))
    return manifest
