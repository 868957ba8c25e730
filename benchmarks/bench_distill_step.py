"""Training-step time of e2KD (Grad-CAM, last stage) over plain KD, as a ratio in one run.

Both steps run the same teacher and student on the same batch (forward, loss, backward,
optimizer step); the modes are interleaved and their order alternates, so machine noise
hits both alike. Reports the ratio of the median step times.

    python benchmarks/bench_distill_step.py                       # resnet34 -> resnet18, 224 px
    python benchmarks/bench_distill_step.py --teacher-arch resnet18 --json out.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import timm
import torch

import e2kd
from e2kd.distill import Distiller


def measure(args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    teacher = timm.create_model(args.teacher_arch, pretrained=False, num_classes=args.num_classes)
    student = timm.create_model(args.arch, pretrained=False, num_classes=args.num_classes)
    optimizer = torch.optim.SGD(student.parameters(), lr=1e-3, momentum=0.9)
    distillers = {
        "kd": Distiller(teacher, student, lam=0.0),
        "e2kd": Distiller(teacher, student, explainer=e2kd.get_explainer("gradcam"),
                          similarity=e2kd.get_similarity("cosine"), lam=1.0),
    }
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    student.train()

    def step(mode: str) -> float:
        start = time.perf_counter()
        out = distillers[mode](x)
        optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        optimizer.step()
        return time.perf_counter() - start

    for _ in range(args.warmup):
        for mode in distillers:
            step(mode)
    times: dict[str, list[float]] = {m: [] for m in distillers}
    for rep in range(args.repeats):
        order = list(distillers) if rep % 2 == 0 else list(reversed(distillers))
        for mode in order:
            times[mode].append(step(mode))
    kd, e2 = statistics.median(times["kd"]), statistics.median(times["e2kd"])
    return {
        "benchmark": "distill_step",
        "teacher": args.teacher_arch, "student": args.arch,
        "image_size": args.image_size, "batch_size": args.batch_size,
        "repeats": args.repeats, "threads": torch.get_num_threads(),
        "torch": torch.__version__, "machine": platform.machine(),
        "kd_step_s_median": kd, "e2kd_step_s_median": e2,
        "ratio_e2kd_over_kd": e2 / kd,
        "per_repeat_ratios": [b / a for a, b in zip(times["kd"], times["e2kd"])],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="resnet18", help="student (timm name)")
    p.add_argument("--teacher-arch", default="resnet34", help="teacher (timm name)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=6)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--json", help="also write the result to this file")
    args = p.parse_args(argv)
    result = measure(args)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as handle:
            handle.write(text + "\n")
    print(f"e2KD step / KD step = {result['ratio_e2kd_over_kd']:.3f} "
          f"({result['student']} <- {result['teacher']}, {args.image_size} px, batch {args.batch_size})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
