"""Throughput of a whole ``e2kd distill`` epoch on a generated ImageNet-layout folder of JPEGs.

The paper's ImageNet config (``e2kd/configs/imagenet_50shot_r34_r18.yaml``: timm ResNet-34 ->
ResNet-18, Grad-CAM, random resized crop) on a generated folder, with a randomly initialised
teacher checkpoint, run through the CLI as a user would. Reports images/s of the training steps
(from the run's ``steps.csv``: waiting for the batch, forward, explanation, backward, optimizer
step), the share of step time spent waiting for data (``epochs.csv``), and the wall time of the
command, for each mode (``kd``, ``e2kd``, ``e2kd_frozen``) and data path (``--cache``: ``none`` = the
JPEG item view in loader workers, ``decoded`` = the decoded cache read by the device view, built
first by ``e2kd prepare`` and timed apart), so users can size their runs.

    python benchmarks/bench_epoch.py                          # 10 classes x 32 images, 224 px
    python benchmarks/bench_epoch.py --cache none,decoded --json benchmarks/results/epoch_cpu.json
"""

from __future__ import annotations

import argparse
import csv
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import timm
import torch
from _folders import write_jpeg_folder
from _report import emit

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "e2kd" / "configs" / "imagenet_50shot_r34_r18.yaml"


def _settings(folder: Path, teacher: Path, args: argparse.Namespace, cache: str, cache_dir: Path) -> list[str]:
    sets = {
        "data.options.root": folder,
        "data.options.shots": "null",
        "data.options.holdout_per_class": 0,
        "data.options.image_size": args.image_size,
        "data.num_workers": args.workers,
        "data.cache": cache,
        "data.cache_dir": cache_dir,
        "teacher.checkpoint": teacher,
        "train.epochs": args.epochs,
        "train.warmup_epochs": 0,
        "train.batch_size": args.batch_size,
        "train.device": args.device,
        "train.precision": args.precision,
        "eval.metrics": "[accuracy]",
        "train.progress": "false",
    }
    if args.channels_last is not None:
        sets["train.channels_last"] = str(args.channels_last).lower()
    return [item for key, value in sets.items() for item in ("--set", f"{key}={value}")]


def _e2kd(*args: str) -> float:
    """Run ``e2kd ARGS`` as a user would; its wall time."""
    start = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "e2kd", *args], capture_output=True, text=True)
    if run.returncode != 0:
        raise SystemExit(f"e2kd {' '.join(args[:2])} failed:\n{run.stderr[-3000:]}")
    return time.perf_counter() - start


MODES = {
    "kd": ["distill.lam=0"],
    "e2kd": ["distill.lam=1"],
    "e2kd_frozen": ["distill.lam=1", "distill.teacher_mode=frozen"],
}


def run_epoch(mode: str, settings: list[str], out: Path) -> dict:
    extra = [item for text in MODES[mode] for item in ("--set", text)]
    wall = _e2kd("distill", str(CONFIG), "--out", str(out), *settings, *extra)
    steps = list(csv.DictReader((out / "steps.csv").open()))
    epochs = list(csv.DictReader((out / "epochs.csv").open()))
    rates = [float(r["images_per_s"]) for r in steps]
    waits = [float(r["data_wait_s"]) for r in steps]
    return {
        "median_images_per_s": statistics.median(rates[1:] or rates),
        "steps": len(rates),
        "median_data_wait_s": statistics.median(waits[1:] or waits),
        "data_wait_share": statistics.mean(float(r["data_wait_share"]) for r in epochs),
        "wall_s": round(wall, 1),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--per-class", type=int, default=32)
    p.add_argument("--min-side", type=int, default=256)
    p.add_argument("--max-side", type=int, default=384)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="fp32")
    p.add_argument(
        "--channels-last", type=lambda s: s == "true", default=None, help="true/false (default: the config's)"
    )
    p.add_argument("--modes", default="kd,e2kd", help=f"comma-separated, of {', '.join(MODES)}")
    p.add_argument("--cache", default="none", help="comma-separated data paths: none (JPEG), decoded")
    p.add_argument("--folder", type=Path, help="an ImageNet-layout folder to use (written here first if missing)")
    p.add_argument("--json")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = args.folder or tmp / "imagenet"
        classes = [f"n{i:08d}" for i in range(args.classes)]
        sides = (args.min_side, args.max_side)
        if not folder.is_dir():
            write_jpeg_folder(folder, classes, {"train": args.per_class, "val": 2}, sides)
        teacher = tmp / "resnet34.pt"
        torch.save(timm.create_model("resnet34", pretrained=False, num_classes=args.classes).state_dict(), teacher)
        result = {
            "benchmark": "distill epoch (CLI, imagenet config)",
            "machine": platform.machine(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "device": args.device,
            "precision": args.precision,
            "device_name": torch.cuda.get_device_name()
            if torch.cuda.is_available() and args.device != "cpu"
            else platform.processor() or "cpu",
            "image_size": args.image_size,
            "jpeg_sizes": f"{sides[0]}-{sides[1]} px per side",
            "train_images": args.classes * args.per_class,
            "batch_size": args.batch_size,
            "epochs": args.epochs,
            "num_workers": args.workers,
        }
        for cache in args.cache.split(","):
            settings = _settings(folder, teacher, args, cache, tmp / "decoded")
            if cache == "decoded":
                result["prepare_s"] = round(_e2kd("prepare", str(CONFIG), *settings), 1)
            for mode in args.modes.split(","):
                name = mode if cache == "none" else f"{mode}_{cache}"
                result[name] = run_epoch(mode, settings, tmp / name)
    if "kd" in result and "e2kd" in result:
        result["ratio_e2kd_over_kd_images_per_s"] = (
            result["kd"]["median_images_per_s"] / result["e2kd"]["median_images_per_s"]
        )
    emit(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
