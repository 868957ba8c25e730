"""Does training through the device view (no antialiasing, pre-resized cache) learn what the item view does?

    python benchmarks/bench_view_parity.py                    # 5 paired seeds, ~2 min on 2 CPU cores
    python benchmarks/bench_view_parity.py --json benchmarks/results/view_parity.json

A folder of shape JPEGs (:func:`e2kd.data.shape_formats.write_shapes_folder`: the class is the shape,
on random backgrounds; 96-px images, trained at 48 px so every crop shrinks by up to 2×, where
antialiasing matters most). For each seed, ``e2kd train-teacher`` trains the same model twice: through
the item view (JPEG decode + torchvision per item, antialiased) and through the decoded cache + device
view. Reports both validation accuracies per seed (paired: same seed, same initial weights, same
batch order) and their mean difference with its standard error; the paths differ in their random
crops (another sampler stream) as well as in antialiasing, so the seed-to-seed spread of one path is
the yardstick.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
from pathlib import Path

from _report import emit

from e2kd.config import load_config_dict
from e2kd.data.shape_formats import write_shapes_folder
from e2kd.experiment import train_teacher


def accuracy(folder: Path, out: Path, seed: int, cache: str, args: argparse.Namespace) -> float:
    config = load_config_dict(
        {
            "seed": seed,
            "data": {
                "name": "image_folder",
                "options": {"root": str(folder), "image_size": args.image_size},
                "cache": cache,
                "cache_dir": str(out.parent / "decoded"),
            },
            "model": {"name": "small_resnet", "options": {"widths": [16, 32]}},
            "train": {"epochs": args.epochs, "batch_size": 32, "lr": 3e-3, "progress": False},
            "eval": {"metrics": ["accuracy"]},
            "out_dir": str(out),
        }
    )
    return train_teacher(config)["splits"]["val"]["accuracy"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--per-class", type=int, default=80, help="training images per class (4 classes)")
    parser.add_argument("--val-per-class", type=int, default=50)
    parser.add_argument("--side", type=int, default=96, help="side of the generated JPEGs")
    parser.add_argument("--image-size", type=int, default=48)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "shapes"
        write_shapes_folder(folder, {"train": args.per_class, "val": args.val_per_class}, size=args.side, seed=0)
        for seed in range(args.seeds):
            item = accuracy(folder, Path(tmp) / f"item-{seed}", seed, "none", args)
            device = accuracy(folder, Path(tmp) / f"device-{seed}", seed, "decoded", args)
            rows.append({"seed": seed, "item_view": item, "device_view": device})
            print(f"seed {seed}: item view {item:.3f}, device view {device:.3f}", file=sys.stderr)
    differences = [r["device_view"] - r["item_view"] for r in rows]
    spread = statistics.stdev(differences) if len(differences) > 1 else float("nan")
    emit(
        {
            "benchmark": "validation accuracy, item view vs decoded cache + device view (paired seeds)",
            "images": {"train_per_class": args.per_class, "val_per_class": args.val_per_class, "side": args.side},
            "image_size": args.image_size,
            "epochs": args.epochs,
            "runs": rows,
            "mean_item_view": statistics.mean(r["item_view"] for r in rows),
            "mean_device_view": statistics.mean(r["device_view"] for r in rows),
            "mean_difference": statistics.mean(differences),
            "standard_error": spread / math.sqrt(len(differences)) if len(differences) > 1 else None,
            "item_view_seed_spread": statistics.stdev(r["item_view"] for r in rows) if len(rows) > 1 else None,
        },
        args.json,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
