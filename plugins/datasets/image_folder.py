"""``image_folder``: the ImageNet layout ``root/{train,val[,test]}/<class>/<image>``.

Class index = sorted class-folder name (torchvision ``ImageFolder`` order), taken from
``root/train``. ``shots`` images per class are drawn from train with ``data.seed``;
``holdout_per_class`` images per class are taken out of train first as the split
``train_holdout``, disjoint from the shots (the paper's protocol: 50 held out, the official val
as test). For one seed the draw is nested: the 50-shot subset is part of the 200-shot one.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from pydantic import Field

from e2kd import hookimpl
from e2kd.api import Dataset, PluginOptions
from e2kd.data.files import (
    IMAGE_EXTENSIONS,
    ImageFiles,
    drop_unreadable,
    files_digest,
    list_images,
    per_split,
    require_dir,
)
from e2kd.data.subsets import per_class_draw
from e2kd.errors import DataError

HOLDOUT = "train_holdout"


class ImageFolderOptions(PluginOptions):
    """Options of the ``image_folder`` dataset."""

    root: Path = Field(..., description="folder holding train/ and val/ (optional test/), one sub-folder per class")
    shots: int | None = Field(None, ge=1, description="training images per class, drawn with data.seed (all if unset)")
    holdout_per_class: int = Field(0, ge=0, description="images per class held out of train as split train_holdout")
    image_size: int = Field(224, ge=8, description="side of the square crops the models see")
    extensions: list[str] = Field(list(IMAGE_EXTENSIONS), min_length=1, description="image file extensions")
    skip_unreadable: bool = Field(
        False, description="drop undecodable files (checked once, with a warning) instead of stopping at the first one"
    )


class ImageFolder(Dataset):
    """An ImageNet-layout folder: k-shot training subsets, a held-out split, val as the test split."""

    name = "image_folder"
    description = "ImageNet layout root/{train,val[,test]}/<class>/*: k-shot subsets, held-out split, val as test"
    Options = ImageFolderOptions

    @property
    def root(self) -> Path:
        return Path(self.options.root).expanduser().resolve()

    def check(self) -> None:
        require_dir(self.root, "data.options.root")
        require_dir(self.root / "train", "data.options.root")
        require_dir(self.root / "val", "data.options.root")
        self.class_names()

    def class_names(self) -> list[str]:
        return list(self._class_index)

    @cached_property
    def _class_index(self) -> dict[str, int]:
        names = sorted(p.name for p in (self.root / "train").iterdir() if p.is_dir())
        if not names:
            raise DataError(f"data.options.root: {self.root / 'train'}: no class folders")
        return {name: i for i, name in enumerate(names)}

    def splits(self) -> tuple[str, ...]:
        extra = ("test",) if (self.root / "test").is_dir() else ()
        return ("train",) + ((HOLDOUT,) if self.options.holdout_per_class else ()) + ("val",) + extra

    def eval_splits(self) -> tuple[str, ...]:
        return tuple(s for s in self.splits() if s in ("val", "test"))

    def _folder_files(self, split: str) -> list[tuple[Path, int]]:
        folder = self.root / split
        files = []
        for class_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
            if class_dir.name not in self._class_index:
                raise DataError(
                    f"{class_dir}: class folder not present in {self.root / 'train'}; "
                    f"every split needs the training classes' folder names"
                )
            label = self._class_index[class_dir.name]
            files += [(p, label) for p in list_images(class_dir, self.options.extensions)]
        if not files:
            raise DataError(f"{folder}: no images with extensions {', '.join(self.options.extensions)}")
        return files

    @cached_property
    def _train_draw(self) -> dict[str, list[tuple[Path, int]]]:
        """The seeded per-class draw: held-out images first, then the shots, never overlapping."""
        files = self._folder_files("train")
        held, train = per_class_draw(
            [label for _, label in files],
            self.class_names(),
            shots=self.options.shots,
            holdout=self.options.holdout_per_class,
            seed=self.seed,
            where=str(self.root / "train"),
        )
        return {"train": [files[i] for i in train], HOLDOUT: [files[i] for i in held]}

    @per_split
    def files(self, split: str) -> list[tuple[Path, int]]:
        """(path, label) of every image of ``split``, in a fixed order."""
        if split not in self.splits():
            raise DataError(f"image_folder: no split {split!r} (known: {', '.join(self.splits())})")
        files = self._train_draw[split] if split in ("train", HOLDOUT) else self._folder_files(split)
        if self.options.skip_unreadable:
            files = [files[i] for i in drop_unreadable([p for p, _ in files])]
        return files

    def samples(self, split: str) -> ImageFiles:
        files = self.files(split)
        return ImageFiles([p for p, _ in files], torch.tensor([label for _, label in files], dtype=torch.long))

    def identity(self, split: str) -> dict[str, Any]:
        files = self.files(split)
        return {
            **super().identity(split),
            "root": str(self.root),
            "files_sha256": files_digest([p for p, _ in files], self.root),
            "num_files": len(files),
        }


@hookimpl
def register_datasets(register) -> None:
    register(ImageFolder)
