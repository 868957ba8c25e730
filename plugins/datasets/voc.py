"""``voc``: PASCAL VOC, ``VOCdevkit/VOC<year>/{Annotations,JPEGImages,ImageSets/Main}``.

Multi-hot targets over the 20 classes from the XML annotations (objects marked ``difficult``
are left out unless the option says otherwise); each object's box travels through the same
geometric transforms as the image and is rasterised into a per-class mask for EPG / IoU.
``root`` may be the folder holding ``VOCdevkit``, ``VOCdevkit`` itself or ``VOC<year>``.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from pydantic import Field
from torch.utils.data import Dataset as TorchDataset
from torchvision import tv_tensors

from e2kd import hookimpl
from e2kd.api import Dataset, PluginOptions
from e2kd.data.files import drop_unreadable, files_digest, per_split, read_image, require_dir, require_file
from e2kd.data.voc_format import VOC_CLASSES
from e2kd.errors import DataError

CLASSES = VOC_CLASSES


class VOCOptions(PluginOptions):
    """Options of the ``voc`` dataset."""

    root: Path = Field(..., description="folder holding VOCdevkit (or VOCdevkit, or VOC<year> itself)")
    year: str = Field("2007", description="the VOC<year> folder to read")
    image_set: str = Field("train", description="ImageSets/Main/<image_set>.txt that trains")
    eval_image_sets: list[str] = Field(["val"], description="image sets evaluated by default")
    difficult: bool = Field(False, description="count objects marked difficult as present (labels and boxes)")
    image_size: int = Field(224, ge=8, description="side of the square crops the models see")
    skip_unreadable: bool = Field(False, description="drop undecodable files (checked once, with a warning)")


class VOCSamples(TorchDataset):
    """Items: uint8 image, multi-hot ``label`` (20,), ``boxes`` (XYXY, pixels) and ``box_labels``."""

    def __init__(self, images: list[Path], objects: list[list[tuple[int, tuple[float, float, float, float]]]]) -> None:
        self.images, self.objects = images, objects

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image = read_image(self.images[index])
        objects = self.objects[index]
        label = torch.zeros(len(CLASSES))
        classes = torch.tensor([c for c, _ in objects], dtype=torch.long)
        label[classes] = 1.0
        boxes = torch.tensor([b for _, b in objects], dtype=torch.float32).reshape(-1, 4)
        return {
            "image": image,
            "label": label,
            "box_labels": classes,
            "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=tuple(image.shape[-2:])),
        }


class VOC(Dataset):
    """PASCAL VOC: multi-hot labels and the objects' boxes from the annotation XML."""

    name = "voc"
    description = "PASCAL VOC (VOCdevkit layout): 20-class multi-hot labels from the XML, boxes as per-class masks"
    Options = VOCOptions
    label_type = "multi"
    provides = frozenset({"boxes"})

    @cached_property
    def year_dir(self) -> Path:
        root = Path(self.options.root).expanduser().resolve()
        name = f"VOC{self.options.year}"
        for candidate in (root / "VOCdevkit" / name, root / name, root):
            if candidate.name == name and candidate.is_dir():
                return candidate
        raise DataError(f"data.options.root: {root}: no {name} folder (expected {root / 'VOCdevkit' / name})")

    def check(self) -> None:
        require_dir(Path(self.options.root).expanduser(), "data.options.root")
        for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
            require_dir(self.year_dir / sub, "data.options.root")
        for split in self.splits():
            require_file(self._set_file(split), "data.options.image_set/eval_image_sets")

    def class_names(self) -> list[str]:
        return list(CLASSES)

    def splits(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys([self.options.image_set, *self.options.eval_image_sets]))

    def _set_file(self, split: str) -> Path:
        return self.year_dir / "ImageSets" / "Main" / f"{split}.txt"

    def _ids(self, split: str) -> list[str]:
        if split not in self.splits():
            raise DataError(f"voc: no split {split!r} (known: {', '.join(self.splits())})")
        path = require_file(self._set_file(split), "data.options.image_set/eval_image_sets")
        return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]

    def _objects(self, image_id: str) -> list[tuple[int, tuple[float, float, float, float]]]:
        path = self.year_dir / "Annotations" / f"{image_id}.xml"
        try:
            tree = ET.parse(path)
        except FileNotFoundError:
            raise DataError(f"{path}: annotation file not found") from None
        except ET.ParseError as exc:
            raise DataError(f"{path}: malformed XML ({exc})") from None
        objects = []
        for obj in tree.getroot().iter("object"):
            name = (obj.findtext("name") or "").strip()
            if name not in CLASSES:
                raise DataError(f"{path}: unknown class {name!r} (VOC classes: {', '.join(CLASSES)})")
            if (obj.findtext("difficult") or "0").strip() == "1" and not self.options.difficult:
                continue
            box = obj.find("bndbox")
            try:
                x1, y1, x2, y2 = (float(box.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
            except (AttributeError, TypeError, ValueError):
                raise DataError(f"{path}: object {name!r} has no valid bndbox (xmin, ymin, xmax, ymax)") from None
            objects.append((CLASSES.index(name), (x1 - 1, y1 - 1, x2, y2)))  # 1-based inclusive -> pixel edges
        return objects

    @per_split
    def _split(self, split: str) -> tuple[list[Path], list[list]]:
        ids = self._ids(split)
        images = [self.year_dir / "JPEGImages" / f"{i}.jpg" for i in ids]
        objects = [self._objects(i) for i in ids]
        if self.options.skip_unreadable:
            keep = drop_unreadable(images)
            images, objects = [images[i] for i in keep], [objects[i] for i in keep]
        return images, objects

    def samples(self, split: str) -> VOCSamples:
        return VOCSamples(*self._split(split))

    def identity(self, split: str) -> dict[str, Any]:
        images, objects = self._split(split)
        return {
            **super().identity(split),
            "root": str(self.year_dir),
            "files_sha256": files_digest(images, self.year_dir),
            "num_files": len(images),
            "objects_sha256": files_digest([Path(repr(o)) for o in objects], Path()),
        }


@hookimpl
def register_datasets(register) -> None:
    register(VOC)
