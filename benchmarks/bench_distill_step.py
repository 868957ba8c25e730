"""Training-step time of e2KD (Grad-CAM, last stage) over plain KD, as ratios in one run.

Four modes on the same teacher, student and batch (forward, loss, backward, optimizer step):
live KD, live e2KD, and — with a frozen teacher whose logits and maps are read from an
on-disk float16 cache (e2kd.frozen), so no teacher forward — frozen KD and frozen e2KD.
The modes are interleaved and their order rotates, so machine noise hits all alike.
Reports the ratios of the median step times.

    python benchmarks/bench_distill_step.py                       # resnet34 -> resnet18, 224 px
    python benchmarks/bench_distill_step.py --teacher-arch resnet18 --json out.json
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time

import timm
import torch

import e2kd
from _report import emit
from e2kd.distill import Distiller
from e2kd.frozen import TeacherCache, build_cache


def measure(args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    teacher = timm.create_model(args.teacher_arch, pretrained=False, num_classes=args.num_classes)
    student = timm.create_model(args.arch, pretrained=False, num_classes=args.num_classes)
    optimizer = torch.optim.SGD(student.parameters(), lr=1e-3, momentum=0.9)
    explainer, similarity = e2kd.get_explainer("gradcam"), e2kd.get_similarity("cosine")
    distillers = {
        "kd": Distiller(teacher, student, lam=0.0),
        "e2kd": Distiller(teacher, student, explainer=explainer, similarity=similarity, lam=1.0),
        "frozen_kd": Distiller(None, student, lam=0.0),
        "frozen_e2kd": Distiller(None, student, explainer=explainer, similarity=similarity, lam=1.0),
    }
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    cache_dir = tempfile.mkdtemp(prefix="e2kd-bench-cache-")
    build_cache(cache_dir, teacher, explainer, x, {"benchmark": True}, dtype="float16", batch_size=args.batch_size, progress=False)
    cache = TeacherCache.open(cache_dir)
    student.train()

    def step(mode: str) -> float:
        start = time.perf_counter()
        if mode.startswith("frozen"):
            logits, maps = zip(*(cache[i] for i in range(len(cache))))
            out = distillers[mode](x, teacher_logits=torch.stack(logits), teacher_maps=torch.stack(maps))
        else:
            out = distillers[mode](x)
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        optimizer.step()
        return time.perf_counter() - start

    modes = list(distillers)
    for _ in range(args.warmup):
        for mode in modes:
            step(mode)
    times: dict[str, list[float]] = {m: [] for m in modes}
    for rep in range(args.repeats):
        order = modes[rep % len(modes):] + modes[:rep % len(modes)]
        for mode in order:
            times[mode].append(step(mode))
    med = {m: statistics.median(t) for m, t in times.items()}
    return {
        "benchmark": "distill_step",
        "teacher": args.teacher_arch, "student": args.arch,
        "image_size": args.image_size, "batch_size": args.batch_size,
        "repeats": args.repeats, "threads": torch.get_num_threads(),
        "torch": torch.__version__, "machine": platform.machine(),
        "median_step_s": med,
        "ratio_e2kd_over_kd": med["e2kd"] / med["kd"],
        "ratio_frozen_e2kd_over_frozen_kd": med["frozen_e2kd"] / med["frozen_kd"],
        "ratio_frozen_e2kd_over_live_e2kd": med["frozen_e2kd"] / med["e2kd"],
        "step_times_s": times,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="resnet18", help="student (timm name)")
    p.add_argument("--teacher-arch", default="resnet34", help="teacher (timm name)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=8)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--json", help="also write the result to this file")
    args = p.parse_args(argv)
    result = measure(args)
    emit(result, args.json)
    print(f"{result['student']} <- {result['teacher']}, {args.image_size} px, batch {args.batch_size}: "
          f"e2KD/KD {result['ratio_e2kd_over_kd']:.3f}, frozen e2KD/frozen KD "
          f"{result['ratio_frozen_e2kd_over_frozen_kd']:.3f}, frozen e2KD/live e2KD "
          f"{result['ratio_frozen_e2kd_over_live_e2kd']:.3f}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
