"""``waterbirds``: the group-DRO layout, ``root/metadata.csv`` + images under ``root/``.

``metadata.csv`` has (at least) the columns ``img_filename, y, place, split``: y 0 = landbird,
1 = waterbird; place 0 = land, 1 = water; split 0 = train, 1 = val, 2 = test. Group =
2·y + place; landbird-on-land and waterbird-on-water are in distribution. Waterbirds-100 (the
paper's fully spurious variant) is the same reader on its own metadata file (option ``metadata``).
"""

from __future__ import annotations

import csv
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from pydantic import Field

from e2kd import hookimpl
from e2kd.api import Dataset, PluginOptions
from e2kd.data.files import ImageFiles, drop_unreadable, files_digest, per_split, require_dir, require_file
from e2kd.errors import DataError

COLUMNS = ("img_filename", "y", "place", "split")
SPLITS = {"train": 0, "val": 1, "test": 2}


class WaterbirdsOptions(PluginOptions):
    """Options of the ``waterbirds`` dataset."""

    root: Path = Field(..., description="folder holding the metadata file and the images it names")
    metadata: str = Field("metadata.csv", description="metadata file inside root (e.g. another one for Waterbirds-100)")
    image_size: int = Field(224, ge=8, description="side of the square crops the models see")
    skip_unreadable: bool = Field(False, description="drop undecodable files (checked once, with a warning)")


class Waterbirds(Dataset):
    """Waterbirds: bird type against a spurious land/water background, with its groups."""

    name = "waterbirds"
    description = "Waterbirds (group-DRO metadata.csv layout): bird type vs spurious land/water background groups"
    Options = WaterbirdsOptions
    provides = frozenset({"group"})

    @property
    def root(self) -> Path:
        return Path(self.options.root).expanduser().resolve()

    def check(self) -> None:
        require_dir(self.root, "data.options.root")
        require_file(self.root / self.options.metadata, "data.options.metadata")
        self._rows  # noqa: B018

    def class_names(self) -> list[str]:
        return ["landbird", "waterbird"]

    def splits(self) -> tuple[str, ...]:
        return tuple(SPLITS)

    @cached_property
    def _rows(self) -> list[tuple[str, int, int, int]]:
        path = self.root / self.options.metadata
        with open(path, newline="") as handle:
            reader = csv.DictReader(handle)
            missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise DataError(f"{path}: missing column(s) {', '.join(missing)} (needs {', '.join(COLUMNS)})")
            rows = []
            for line, row in enumerate(reader, start=2):
                try:
                    y, place, split = int(row["y"]), int(row["place"]), int(float(row["split"]))
                    assert y in (0, 1) and place in (0, 1) and split in (0, 1, 2)
                except (ValueError, TypeError, AssertionError):
                    raise DataError(
                        f"{path}, line {line}: y and place must be 0 or 1 and split 0, 1 or 2 "
                        f"(got y={row['y']!r}, place={row['place']!r}, split={row['split']!r})"
                    ) from None
                rows.append((row["img_filename"], y, place, split))
        return rows

    @per_split
    def _split_rows(self, split: str) -> list[tuple[str, int, int, int]]:
        if split not in SPLITS:
            raise DataError(f"waterbirds: no split {split!r} (known: {', '.join(SPLITS)})")
        rows = [r for r in self._rows if r[3] == SPLITS[split]]
        if self.options.skip_unreadable:
            rows = [rows[i] for i in drop_unreadable([self.root / r[0] for r in rows])]
        return rows

    def samples(self, split: str) -> ImageFiles:
        rows = self._split_rows(split)
        y = torch.tensor([r[1] for r in rows], dtype=torch.long)
        place = torch.tensor([r[2] for r in rows], dtype=torch.long)
        return ImageFiles([self.root / r[0] for r in rows], y, {"group": 2 * y + place, "in_distribution": y == place})

    def identity(self, split: str) -> dict[str, Any]:
        rows = self._split_rows(split)
        return {
            **super().identity(split),
            "root": str(self.root),
            "files_sha256": files_digest([self.root / r[0] for r in rows], self.root),
            "num_files": len(rows),
            "labels_sha256": files_digest([Path(f"{r[1]}{r[2]}") for r in rows], Path()),
        }


@hookimpl
def register_datasets(register) -> None:
    register(Waterbirds)
