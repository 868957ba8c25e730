"""Throughput of a whole ``e2kd distill`` epoch on a generated ImageNet-layout folder of JPEGs.

The paper's ImageNet config (``e2kd/configs/imagenet_50shot_r34_r18.yaml``: timm ResNet-34 ->
ResNet-18, Grad-CAM, random resized crop) on a generated folder, with a randomly initialised
teacher checkpoint; one epoch, run through the CLI as a user would. Reports images/s of the
training steps (from the run's ``steps.csv``: data loading, augmentation, forward, explanation,
backward, optimizer step) and the wall time of the command, for KD and e2KD, so users can size
their runs.

    python benchmarks/bench_epoch.py                          # 10 classes x 32 images, 224 px
    python benchmarks/bench_epoch.py --json benchmarks/results/epoch_cpu.json
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
from _report import emit

from e2kd.data.miniature import write_image_folder

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "e2kd" / "configs" / "imagenet_50shot_r34_r18.yaml"


def run_epoch(folder: Path, teacher: Path, out: Path, lam: float, args: argparse.Namespace) -> dict:
    command = [
        sys.executable,
        "-m",
        "e2kd",
        "distill",
        str(CONFIG),
        "--out",
        str(out),
        "--set",
        f"data.options.root={folder}",
        "--set",
        "data.options.shots=null",
        "--set",
        "data.options.holdout_per_class=0",
        "--set",
        f"data.options.image_size={args.image_size}",
        "--set",
        f"data.num_workers={args.workers}",
        "--set",
        f"teacher.checkpoint={teacher}",
        "--set",
        "train.epochs=1",
        "--set",
        "train.warmup_epochs=0",
        "--set",
        f"train.batch_size={args.batch_size}",
        "--set",
        f"train.device={args.device}",
        "--set",
        f"train.precision={args.precision}",
        "--set",
        f"distill.lam={lam}",
        "--set",
        "eval.metrics=[accuracy]",
        "--set",
        "train.progress=false",
    ]
    start = time.perf_counter()
    run = subprocess.run(command, capture_output=True, text=True)
    if run.returncode != 0:
        raise SystemExit(f"e2kd distill (lam={lam}) failed:\n{run.stderr[-3000:]}")
    wall = time.perf_counter() - start
    rates = [float(r["images_per_s"]) for r in csv.DictReader((out / "steps.csv").open())]
    return {"median_images_per_s": statistics.median(rates[1:] or rates), "steps": len(rates), "wall_s": round(wall, 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--per-class", type=int, default=32)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--json")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = tmp / "imagenet"
        classes = [f"n{i:08d}" for i in range(args.classes)]
        write_image_folder(folder, classes, {"train": args.per_class, "val": 2}, size=(256, 384), seed=0)
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
            "jpeg_sizes": "256-384 px per side",
            "train_images": args.classes * args.per_class,
            "batch_size": args.batch_size,
            "num_workers": args.workers,
        }
        for name, lam in (("kd", 0.0), ("e2kd", 1.0)):
            result[name] = run_epoch(folder, teacher, tmp / name, lam, args)
    result["ratio_e2kd_over_kd_images_per_s"] = (
        result["kd"]["median_images_per_s"] / result["e2kd"]["median_images_per_s"]
    )
    emit(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
