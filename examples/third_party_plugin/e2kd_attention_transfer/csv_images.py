"""A dataset plugin: images listed in CSV files, ``root/<split>.csv`` with columns ``path,label``.

``root/classes.txt`` names the classes, one per line (line number = class index); paths in the
CSV files are relative to ``root``. The core does the rest: views (augmentation, resize, crop),
DataLoader, caching, evaluation.
"""

from __future__ import annotations

import csv
from pathlib import Path

import torch
from pydantic import Field

from e2kd.api import Dataset, PluginOptions
from e2kd.data.files import ImageFiles, files_digest, require_dir, require_file
from e2kd.errors import DataError


class CsvImagesOptions(PluginOptions):
    root: Path = Field(..., description="folder with classes.txt, <split>.csv files and the images")
    splits: list[str] = Field(["train", "test"], min_length=1, description="split names; the first trains")
    image_size: int = Field(224, ge=8, description="side of the square crops the models see")


class CsvImages(Dataset):
    name = "csv_images"
    description = "images listed in root/<split>.csv (path,label), class names in root/classes.txt"
    Options = CsvImagesOptions

    @property
    def root(self) -> Path:
        return Path(self.options.root)

    def check(self) -> None:
        require_dir(self.root, "data.options.root")
        require_file(self.root / "classes.txt", "data.options.root")
        for split in self.splits():
            require_file(self.root / f"{split}.csv", "data.options.splits")

    def splits(self) -> tuple[str, ...]:
        return tuple(self.options.splits)

    def class_names(self) -> list[str]:
        return [line.strip() for line in (self.root / "classes.txt").read_text().splitlines() if line.strip()]

    def _rows(self, split: str) -> list[tuple[Path, int]]:
        index = {name: i for i, name in enumerate(self.class_names())}
        with open(self.root / f"{split}.csv", newline="") as handle:
            rows = []
            for row in csv.DictReader(handle):
                if row["label"] not in index:
                    raise DataError(f"{self.root / f'{split}.csv'}: unknown label {row['label']!r} (see classes.txt)")
                rows.append((self.root / row["path"], index[row["label"]]))
        return rows

    def samples(self, split: str) -> ImageFiles:
        rows = self._rows(split)
        return ImageFiles([p for p, _ in rows], torch.tensor([y for _, y in rows], dtype=torch.long))

    def identity(self, split: str) -> dict:
        rows = self._rows(split)
        return {
            **super().identity(split),
            "root": str(self.root.resolve()),
            "files_sha256": files_digest([p for p, _ in rows], self.root),
            "labels": [y for _, y in rows],
        }
