"""EPG + explanation IoU over many maps: batch-native versus a per-sample loop, as a ratio in one run.

    python benchmarks/bench_localisation.py                  # 10,000 maps of 64 x 64
    python benchmarks/bench_localisation.py --json out.json

The batch version is e2kd_plugins.metrics.localisation; the loop is the plain per-sample
definition the tests compare it against (tests/reference.py). Results are checked equal.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch
from _report import emit

from e2kd_plugins.metrics.localisation import energy_pointing_game, explanation_iou

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.reference import epg_loop, iou_loop  # noqa: E402


def measure(args: argparse.Namespace) -> dict:
    g = torch.Generator().manual_seed(0)
    maps = torch.randn(args.n, 1, args.size, args.size, generator=g)
    masks = (torch.rand(args.n, 1, args.size, args.size, generator=g) > 0.7).float()

    def batch():
        return energy_pointing_game(maps, masks), explanation_iou(maps, masks)

    def loop():
        return epg_loop(maps, masks), iou_loop(maps, masks)

    timings = {"batch": [], "loop": []}
    results = {}
    for rep in range(args.repeats):
        for name, fn in (("batch", batch), ("loop", loop)) if rep % 2 == 0 else (("loop", loop), ("batch", batch)):
            start = time.perf_counter()
            results[name] = fn()
            timings[name].append(time.perf_counter() - start)
    for a, b in zip(results["batch"], results["loop"]):
        torch.testing.assert_close(a, b)
    best = {k: min(v) for k, v in timings.items()}
    return {
        "benchmark": "localisation_metrics",
        "maps": args.n,
        "size": args.size,
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "batch_s_best": best["batch"],
        "loop_s_best": best["loop"],
        "speedup_batch_over_loop": best["loop"] / best["batch"],
        "timings_s": timings,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=10_000, help="number of maps")
    p.add_argument("--size", type=int, default=64, help="map side in pixels")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", help="also write the result to this file")
    args = p.parse_args(argv)
    result = measure(args)
    emit(result, args.json)
    print(
        f"EPG + IoU over {args.n} maps of {args.size}x{args.size}: batch-native is "
        f"{result['speedup_batch_over_loop']:.0f}x the per-sample loop",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
