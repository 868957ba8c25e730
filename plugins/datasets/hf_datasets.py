"""``hf_datasets``: a Hugging Face ``datasets`` dataset — a ``save_to_disk`` folder, parquet files, or a hub
name (downloaded when online, from the ``datasets`` cache offline).

Images come from an ``Image`` column (decoded by PIL, like image files) and labels from a class column
(``ClassLabel`` names become the class names). ``shots`` images per class are drawn from the training
split with ``data.seed`` and ``holdout_per_class`` more are held out first, as for ``image_folder``.
Needs the ``datasets`` package (``pip install 'e2kd[datasets]'``).
"""

from __future__ import annotations

import io
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from pydantic import Field, model_validator
from torch.utils.data import Dataset as TorchDataset

from e2kd import hookimpl
from e2kd.api import Dataset, PluginOptions
from e2kd.data.files import per_split, require_dir
from e2kd.data.subsets import per_class_draw
from e2kd.errors import DataError

HOLDOUT = "train_holdout"


class HfDatasetOptions(PluginOptions):
    """Options of the ``hf_datasets`` dataset (exactly one of path, data_files, hub)."""

    path: Path | None = Field(None, description="a folder written by Dataset(Dict).save_to_disk")
    data_files: dict[str, list[str]] | None = Field(
        None, description="parquet files per split, e.g. {train: [/d/train-*.parquet], validation: [...]}"
    )
    hub: str | None = Field(None, description="a hub dataset name (e.g. ORG/NAME), online or from the cache")
    revision: str | None = Field(None, description="hub: the dataset revision")
    image_column: str = Field("image", description="the column holding the images")
    label_column: str = Field("label", description="the column holding the class index")
    train_split: str = Field("train", description="the split that trains")
    class_names: list[str] | None = Field(None, description="class names (default: the label column's ClassLabel)")
    shots: int | None = Field(None, ge=1, description="training images per class, drawn with data.seed")
    holdout_per_class: int = Field(0, ge=0, description="images per class held out of train as split train_holdout")
    image_size: int = Field(224, ge=8, description="side of the square crops the models see")

    @model_validator(mode="after")
    def _one_source(self) -> HfDatasetOptions:
        given = [k for k in ("path", "data_files", "hub") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of path, data_files, hub (got {', '.join(given) or 'none'})")
        return self


class HfRows(TorchDataset):
    """Rows of a ``datasets.Dataset`` as samples ``{"image": uint8 (3, H, W), "label": int64}``."""

    def __init__(self, rows: Any, indices: list[int], image_column: str, label_column: str) -> None:
        self.rows, self.indices = rows, indices
        self.image_column, self.label_column = image_column, label_column

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self.rows[self.indices[index]]
        return {"image": _pixels(row[self.image_column]), "label": torch.tensor(int(row[self.label_column]))}


def _pixels(image: Any) -> torch.Tensor:
    """(3, H, W) uint8 of a decoded PIL image, or of the ``{"bytes", "path"}`` of an undecoded one."""
    if isinstance(image, dict):
        image = Image.open(io.BytesIO(image["bytes"])) if image.get("bytes") else Image.open(image["path"])
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    return torch.from_numpy(np.array(rgb)).permute(2, 0, 1)


class HfDataset(Dataset):
    """A Hugging Face ``datasets`` dataset: save_to_disk folder, parquet files or hub name."""

    name = "hf_datasets"
    description = "a Hugging Face datasets dataset (save_to_disk folder, parquet files, hub name); extra: datasets"
    Options = HfDatasetOptions

    @cached_property
    def _splits(self) -> dict[str, Any]:
        try:
            import datasets
        except ImportError:
            raise DataError("data: hf_datasets needs the datasets package (pip install 'e2kd[datasets]')") from None
        o = self.options
        try:
            if o.path is not None:
                loaded = datasets.load_from_disk(str(require_dir(Path(o.path).expanduser(), "data.options.path")))
            elif o.data_files is not None:
                loaded = datasets.load_dataset("parquet", data_files=o.data_files)
            else:
                loaded = datasets.load_dataset(o.hub, revision=o.revision)
        except DataError:
            raise
        except Exception as exc:  # the library's own message, on one line
            source = o.path or o.data_files or o.hub
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise DataError(
                f"data.options: cannot load {source} with datasets ({type(exc).__name__}: {first})"
            ) from None
        splits = dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {o.train_split: loaded}
        for split, rows in splits.items():
            for column in (o.image_column, o.label_column):
                if column not in rows.column_names:
                    raise DataError(
                        f"data.options: split {split!r} has no column {column!r} (columns: {', '.join(rows.column_names)}); "
                        f"set image_column / label_column"
                    )
        if o.train_split not in splits:
            raise DataError(f"data.options.train_split: no split {o.train_split!r} (known: {', '.join(splits)})")
        return splits

    def check(self) -> None:
        self.class_names()

    def class_names(self) -> list[str]:
        if self.options.class_names is not None:
            return list(self.options.class_names)
        feature = self._splits[self.options.train_split].features[self.options.label_column]
        if hasattr(feature, "names"):
            return list(feature.names)
        raise DataError(f"data.options: column {self.options.label_column!r} is not a ClassLabel; give class_names")

    @property
    def train_split(self) -> str:
        return self.options.train_split

    def splits(self) -> tuple[str, ...]:
        others = tuple(s for s in self._splits if s != self.options.train_split)
        return (self.options.train_split,) + ((HOLDOUT,) if self.options.holdout_per_class else ()) + others

    def eval_splits(self) -> tuple[str, ...]:
        return tuple(s for s in self.splits() if s not in (self.train_split, HOLDOUT))

    @per_split
    def indices(self, split: str) -> list[int]:
        """The rows of the stored split that make up ``split`` (the shots and held-out draws for train)."""
        if split not in self.splits():
            raise DataError(f"hf_datasets: no split {split!r} (known: {', '.join(self.splits())})")
        if split not in (self.train_split, HOLDOUT):
            return list(range(len(self._splits[split])))
        o = self.options
        if o.shots is None and not o.holdout_per_class:
            return list(range(len(self._splits[split])))
        labels = self._splits[o.train_split][o.label_column]
        held, train = per_class_draw(
            labels, self.class_names(), shots=o.shots, holdout=o.holdout_per_class, seed=self.seed, where=o.train_split
        )
        return held if split == HOLDOUT else train

    def _rows(self, split: str) -> Any:
        return self._splits[self.train_split if split == HOLDOUT else split]

    def samples(self, split: str) -> HfRows:
        return HfRows(self._rows(split), self.indices(split), self.options.image_column, self.options.label_column)

    def identity(self, split: str) -> dict[str, Any]:
        rows = self._rows(split)
        return {**super().identity(split), "fingerprint": rows._fingerprint, "num_rows": len(self.indices(split))}


@hookimpl
def register_datasets(register) -> None:
    register(HfDataset)
