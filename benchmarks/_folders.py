"""Generated ImageNet-layout JPEG folders for the data benchmarks, one process per class at a time."""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from e2kd.data.miniature import write_image_folder


def _one_class(args: tuple[str, str, dict[str, int], tuple[int, int], int]) -> None:
    root, name, per_split, sides, seed = args
    write_image_folder(root, [name], per_split, size=sides, seed=seed)


def write_jpeg_folder(root: Path, classes: list[str], per_split: dict[str, int], sides: tuple[int, int]) -> None:
    """``root/<split>/<class>/*.jpg`` with sides drawn from ``sides``; classes written in parallel
    (each class its own seed, so the folder does not depend on the number of processes)."""
    jobs = [(str(root), name, per_split, sides, seed) for seed, name in enumerate(classes)]
    processes = max(1, min(len(classes), os.cpu_count() or 1))
    if processes == 1:
        for job in jobs:
            _one_class(job)
        return
    with ProcessPoolExecutor(processes) as pool:
        list(pool.map(_one_class, jobs))
