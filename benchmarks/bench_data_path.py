"""The training data path alone (no model): the JPEG path against the decoded cache + device view.

    python benchmarks/bench_data_path.py                      # 1,000 JPEGs of 256-500 px, 2 workers
    python benchmarks/bench_data_path.py --device cuda        # the device view on a GPU
    python benchmarks/bench_data_path.py --json benchmarks/results/data_path.json

A generated ImageNet-layout folder (10 classes, sides drawn from 256-500 px, quality 90). Every mode
produces the 224-px training view (random resized crop + flip, float in [0, 1]) of every image once
per repeat, interleaved in alternating order; images/s is the median over repeats:

- ``jpeg (e2kd)``: what ``data.cache: none`` trains from — the item view (PIL decode, the view per
  item, uint8 out) in ``--workers`` loader processes kept across epochs, float on ``--device``;
- ``jpeg (by hand)``: torchvision ``ImageFolder`` + ``v2`` (``RandomResizedCrop``, flip, ``ToDtype``);
- ``decoded + device view``: the decoded cache (built once, its build timed on its own) read by
  :class:`e2kd.data.batch_views.DeviceView` — crops, flips and conversion per batch on ``--device``
  (and with one loader thread instead of two: how the view scales with threads on a CPU);
- ``jpeg bytes, decoded + device view``: ``data.decode: device`` — the files' bytes gathered by the
  device view's threads, decoded on ``--device`` (nvJPEG on CUDA, one call per batch), then the view;
- ``tensors + v2 per item (by hand)``: what a user writes with the same pre-resized uint8 images in
  memory: a DataLoader over them with ``v2.RandomResizedCrop`` per item, ``--workers`` processes.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from _folders import write_jpeg_folder
from _report import emit, environment
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets import ImageFolder
from torchvision.transforms import v2

from e2kd.data import open_dataset, split_view
from e2kd.data.augment import EVAL_RESIZE_RATIO
from e2kd.data.batch_views import DeviceView
from e2kd.data.decoded import DecodedCache, build_decoded, decoded_fingerprint
from e2kd.data.files import EncodedFiles
from e2kd.data.item_batches import ItemBatches
from e2kd.train import EpochBatches

SIZE = 224


def hand_jpeg(root: Path) -> ImageFolder:
    steps = [v2.PILToTensor(), v2.RandomResizedCrop(SIZE, antialias=True), v2.RandomHorizontalFlip()]
    return ImageFolder(str(root / "train"), transform=v2.Compose([*steps, v2.ToDtype(torch.float32, scale=True)]))


class HandTensors(Dataset):
    """Pre-resized uint8 images in memory, the training view per item with v2 (a user's own code)."""

    def __init__(self, cache: DecodedCache) -> None:
        samples = cache.samples()
        self.images = [samples[i]["image"].clone() for i in range(len(samples))]
        self.labels = [int(samples[i]["label"]) for i in range(len(samples))]
        self.view = v2.Compose(
            [
                v2.RandomResizedCrop(SIZE, antialias=True),
                v2.RandomHorizontalFlip(),
                v2.ToDtype(torch.float32, scale=True),
            ]
        )

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.view(self.images[i]), self.labels[i]


def drain(batches) -> int:
    n = 0
    for batch in batches:
        images = batch["image"] if isinstance(batch, dict) else batch[0]
        n += images.shape[0]
    if n and images.device.type == "cuda":
        torch.cuda.synchronize()
    return n


def kernel_costs(batch_size: int, repeats: int = 5) -> dict:
    """Microseconds per image, on one core, of what the CPU device view does per image: the uint8
    crop-and-resize kernel (a 256 x 341 channels-last image, a 200 x 270 crop, to 224 px) on the crop
    as it lies in the image and on the crop copied out channels-last first (what the view does), and
    the conversion of a 224-px result to float into a batch already touched (reused memory) and into a
    fresh one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        image = torch.randint(0, 256, (256, 341, 3), dtype=torch.uint8).permute(2, 0, 1)
        crop = image[None, :, 20:220, 30:300]
        resized = torch.randint(0, 256, (batch_size, 3, SIZE, SIZE), dtype=torch.uint8)
        touched = torch.empty(batch_size, 3, SIZE, SIZE)

        def per_image(fn, per: int) -> float:
            fn()
            start = time.perf_counter()
            for _ in range(repeats):
                fn()
            return round((time.perf_counter() - start) / repeats / per * 1e6, 1)

        def resize(source: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.interpolate(source, size=(SIZE, SIZE), mode="bilinear")

        return {
            "uint8_resized_crop_strided": per_image(lambda: resize(crop), 1),
            "uint8_resized_crop_channels_last_copy": per_image(
                lambda: resize(crop.contiguous(memory_format=torch.channels_last)), 1
            ),
            "to_float_touched_batch": per_image(lambda: touched.copy_(resized).mul_(1 / 255), batch_size),
            "to_float_fresh_batch": per_image(lambda: resized.float().mul_(1 / 255), batch_size),
        }
    finally:
        torch.set_num_threads(threads)


def measure(args: argparse.Namespace, root: Path, cache_dir: Path) -> dict:
    dataset = open_dataset("image_folder", {"root": str(root), "image_size": SIZE})
    short_side = round(SIZE * EVAL_RESIZE_RATIO)
    fingerprint = decoded_fingerprint(dataset.identity("train"), short_side)
    start = time.perf_counter()
    build_decoded(
        cache_dir,
        dataset.samples("train"),
        fingerprint,
        short_side=short_side,
        num_workers=args.workers,
        progress=False,
    )
    build_s = time.perf_counter() - start
    cache = DecodedCache.open(cache_dir, fingerprint)
    device = torch.device(args.device)
    view = DeviceView(cache.samples(), kind="resized_crop_flip", image_size=SIZE, seed=0)
    one_thread = DeviceView(cache.samples(), kind="resized_crop_flip", image_size=SIZE, seed=0, threads=1)
    epochs = {"n": 0}

    def device_view(source: DeviceView = view):
        sampler = EpochBatches(len(source), args.batch_size, seed=0)
        sampler.set_epoch(epochs["n"])
        epochs["n"] += 1
        return source.batches(sampler, device)

    jpeg = ItemBatches(split_view(dataset, "train", "train", uint8=True), num_workers=args.workers, seed=0)

    def jpeg_path():
        sampler = EpochBatches(len(jpeg), args.batch_size, seed=0)
        sampler.set_epoch(epochs["n"])
        epochs["n"] += 1
        return jpeg.batches(sampler, device)

    files = DeviceView(
        EncodedFiles(dataset.samples("train")), encoded=True, kind="resized_crop_flip", image_size=SIZE, seed=0
    )

    def device_decode():
        sampler = EpochBatches(len(files), args.batch_size, seed=0)
        sampler.set_epoch(epochs["n"])
        epochs["n"] += 1
        return files.batches(sampler, device)

    workers = args.workers
    modes = {
        "jpeg (e2kd)": jpeg_path,
        "jpeg bytes, decoded + device view": device_decode,
        "jpeg (by hand)": lambda: DataLoader(hand_jpeg(root), args.batch_size, shuffle=True, num_workers=workers),
        "decoded + device view": device_view,
        "decoded + device view, 1 thread": lambda: device_view(one_thread),
        "tensors + v2 per item (by hand)": lambda: DataLoader(
            HandTensors(cache), args.batch_size, shuffle=True, num_workers=workers
        ),
    }
    times: dict[str, list[float]] = {name: [] for name in modes}
    names = list(modes)
    for rep in range(args.repeats):
        for name in names if rep % 2 == 0 else names[::-1]:
            batches = modes[name]()
            begin = time.perf_counter()
            n = drain(batches)
            times[name].append(n / (time.perf_counter() - begin))
    rates = {name: statistics.median(v) for name, v in times.items()}
    return {
        "images": len(cache),
        "decoded_cache": {
            "build_s": round(build_s, 2),
            "build_images_per_s": round(len(cache) / build_s, 1),
            "bytes": cache.index["bytes"],
            "short_side": short_side,
        },
        "images_per_s": {k: round(v, 1) for k, v in rates.items()},
        "ratio_decoded_over_jpeg": round(rates["decoded + device view"] / rates["jpeg (e2kd)"], 2),
        "ratio_two_threads_over_one": round(
            rates["decoded + device view"] / rates["decoded + device view, 1 thread"], 2
        ),
        "ratio_device_decode_over_jpeg": round(rates["jpeg bytes, decoded + device view"] / rates["jpeg (e2kd)"], 2),
        "ratio_jpeg_e2kd_over_hand": round(rates["jpeg (e2kd)"] / rates["jpeg (by hand)"], 3),
        "ratio_decoded_over_hand_tensors": round(
            rates["decoded + device view"] / rates["tensors + v2 per item (by hand)"], 2
        ),
        "all_images_per_s": {k: [round(x, 1) for x in v] for k, v in times.items()},
        "cpu_kernel_us_per_image": kernel_costs(args.batch_size),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1000, help="training images (spread over 10 classes)")
    parser.add_argument("--min-side", type=int, default=256)
    parser.add_argument("--max-side", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2, help="loader processes of the JPEG and by-hand modes")
    parser.add_argument("--device", default="cpu", help="where the device view runs")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--folder", type=Path, help="an ImageNet-layout folder to use (written here first if missing)")
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args(argv)
    classes = [f"class{i:02d}" for i in range(10)]
    per_class = max(1, args.images // len(classes))
    with tempfile.TemporaryDirectory() as tmp:
        root = args.folder or Path(tmp) / "folder"
        sides = (args.min_side, args.max_side)
        if not root.is_dir():
            write_jpeg_folder(root, classes, {"train": per_class, "val": 1}, sides)
        result = {
            "benchmark": "training data path without a model (224-px training view), images/s",
            **environment(),
            "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
            "jpeg_sides": list(sides),
            "batch_size": args.batch_size,
            "workers": args.workers,
            "repeats": args.repeats,
            **measure(args, root, Path(tmp) / "decoded"),
        }
    emit(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
