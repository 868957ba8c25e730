"""Loader throughput: e2kd's dataset seam vs what a user writes by hand, images/s, in one run.

    python benchmarks/bench_loader.py                        # 400 JPEGs of 224 px, workers 0 and 2
    python benchmarks/bench_loader.py --json benchmarks/results/loader.json

A folder of 224-px JPEGs (ImageNet layout) is generated once; each mode reads every image
once through a DataLoader (JPEG decode + view), the modes interleaved with alternating order:

- ``e2kd train``: ``split_view(dataset, "train", "train")`` — random resized crop + flip, float;
- ``e2kd eval``: ``split_view(dataset, "val", "eval")`` — resize 256, centre crop 224;
- ``hand train`` / ``hand eval``: torchvision ``ImageFolder`` + ``transforms.v2`` doing the same.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from _report import emit, environment
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder
from torchvision.transforms import v2

from e2kd.data import make_loader, open_dataset, split_view
from e2kd.data.miniature import write_image_folder


def hand_dataset(root: Path, split: str, train: bool) -> ImageFolder:
    geometry = (
        [v2.RandomResizedCrop(224, antialias=True), v2.RandomHorizontalFlip()]
        if train
        else [v2.Resize(256, antialias=True), v2.CenterCrop(224)]
    )
    return ImageFolder(
        str(root / split), transform=v2.Compose([v2.PILToTensor(), *geometry, v2.ToDtype(torch.float32, scale=True)])
    )


def drain(loader) -> int:
    n = 0
    for batch in loader:
        images = batch["image"] if isinstance(batch, dict) else batch[0]
        n += images.shape[0]
    return n


def measure(args: argparse.Namespace, root: Path) -> dict:
    dataset = open_dataset("image_folder", {"root": str(root), "image_size": 224})
    results = {}
    for workers in args.workers:
        loaders = {
            "e2kd train": make_loader(split_view(dataset, "train", "train"), args.batch_size, num_workers=workers),
            "hand train": DataLoader(hand_dataset(root, "train", True), args.batch_size, num_workers=workers),
            "e2kd eval": make_loader(split_view(dataset, "val", "eval"), args.batch_size, num_workers=workers),
            "hand eval": DataLoader(hand_dataset(root, "val", False), args.batch_size, num_workers=workers),
        }
        times = {name: [] for name in loaders}
        names = list(loaders)
        for rep in range(args.repeats):
            for name in names if rep % 2 == 0 else names[::-1]:
                start = time.perf_counter()
                n = drain(loaders[name])
                times[name].append(n / (time.perf_counter() - start))
        rates = {name: statistics.median(v) for name, v in times.items()}
        results[f"workers_{workers}"] = {
            "images_per_s": {k: round(v, 1) for k, v in rates.items()},
            "ratio_e2kd_over_hand_train": round(rates["e2kd train"] / rates["hand train"], 3),
            "ratio_e2kd_over_hand_eval": round(rates["e2kd eval"] / rates["hand eval"], 3),
            "all_images_per_s": {k: [round(x, 1) for x in v] for k, v in times.items()},
        }
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=400, help="images per split (spread over 10 classes)")
    parser.add_argument("--size", type=int, default=224, help="side of the generated JPEGs")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=lambda s: [int(x) for x in s.split(",")], default=[0, 2])
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args(argv)
    classes = [f"class{i:02d}" for i in range(10)]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "folder"
        per_class = max(1, args.images // len(classes))
        write_image_folder(root, classes, {"train": per_class, "val": per_class}, size=args.size, seed=0)
        result = {
            "benchmark": "loader throughput (JPEG decode + view), images/s",
            **environment(),
            "images_per_split": per_class * len(classes),
            "jpeg_size": args.size,
            "batch_size": args.batch_size,
            "repeats": args.repeats,
            **measure(args, root),
        }
    emit(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
