"""Faithfulness and randomisation metrics: e2kd's batched versions versus Quantus 0.6, as ratios in one run.

    python benchmarks/bench_faithfulness.py                        # the demo's student, 64 images of 48 px
    python benchmarks/bench_faithfulness.py --model resnet18 --size 64 --json out.json

Same model, images, maps and settings on both sides; each pair's values are checked equal first
(deletion = PixelFlipping and RegionPerturbation to 1e-5, ROAD with noise 0 exactly, MPRT per
layer to 1e-5). Timed: the metric's whole evaluation of the images from given maps (MPRT explains
the randomised models itself, with the same explainer on both sides: the input gradient). ROAD runs
on one-channel images (Quantus' ROAD fails on RGB images with one-channel maps). Both sides run the
model equally often; the time inside it (forwards, and MPRT's explanations) is measured on each side,
and "outside the model" is the speed-up of the rest — the metric's own machinery, the part a rewrite
can change. ``--model linear`` makes the model nearly free, so the two ratios meet.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections.abc import Callable

import numpy as np
import quantus
import torch
from _report import emit, environment
from torch import nn

import e2kd
from e2kd import testing
from e2kd_plugins.metrics.faithfulness import perturbation_curve, road_predictions
from e2kd_plugins.metrics.randomisation import randomised_models

#: Seconds spent in the model (its forwards, and the explanations MPRT computes), whichever side
#: runs it: a module-level clock, since Quantus deep-copies the model it randomises.
CLOCK = {"model_s": 0.0, "explaining": False}


class Timed(nn.Module):
    """The benchmarked model, its forwards timed on :data:`CLOCK`."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if CLOCK["explaining"]:
            return self.model(x)
        start = time.perf_counter()
        out = self.model(x)
        CLOCK["model_s"] += time.perf_counter() - start
        return out


def build(name: str, channels: int, classes: int = 10, size: int = 48) -> nn.Module:
    """The benchmarked model: the demo's student (``small_resnet``), timm's ResNet-18, or a linear
    classifier (``linear``: the model costs next to nothing, the metrics' own machinery shows)."""
    torch.manual_seed(0)
    if name == "linear":
        model = nn.Sequential(nn.Flatten(), nn.Linear(channels * size * size, classes))
    elif name == "resnet18":
        grey = {"mean": [0.45], "std": [0.225]} if channels == 1 else {}
        model = e2kd.get_model_builder("timm", arch="resnet18", kwargs={"in_chans": channels}, **grey).build(classes)
    else:
        model = e2kd.get_model_builder("small_resnet", widths=[16, 32, 64]).build(classes)
        if channels != 3:
            model.stem[0] = nn.Conv2d(channels, 16, 3, padding=1, bias=False)
    return Timed(model).eval()


def forward_of(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """What the evaluator hands a metric as ``forward``."""

    def forward(images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(images)

    return forward


def input_gradient(model: nn.Module, images: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The explainer both sides use (timed on :data:`CLOCK` as model time)."""
    start = time.perf_counter()
    CLOCK["explaining"] = True
    try:
        return testing.input_gradient(model, images, target)
    finally:
        CLOCK["explaining"] = False
        CLOCK["model_s"] += time.perf_counter() - start


def timed(fn: Callable[[], object], repeats: int) -> tuple[float, float, object]:
    """(best seconds, the model's seconds in that run, the result) over ``repeats`` runs."""
    best, model_s, result = float("inf"), 0.0, None
    for _ in range(repeats):
        CLOCK["model_s"] = 0.0
        start = time.perf_counter()
        result = fn()
        elapsed = time.perf_counter() - start
        if elapsed < best:
            best, model_s = elapsed, CLOCK["model_s"]
    return best, model_s, result


def quiet(metric, **options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return metric(disable_warnings=True, display_progressbar=False, **options)


def run_quantus(metric, model, x, y, a, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return metric(model=model, x_batch=x, y_batch=y, a_batch=a, device="cpu", batch_size=len(x), **kwargs)


def pixels_per_step(pixels: int, steps: int) -> int:
    """The largest step of at most pixels / steps pixels that Quantus' PixelFlipping accepts: its
    features_in_step (3 x the pixels of a step, the map broadcast over RGB) must divide H x W."""
    if pixels % 3:
        raise SystemExit(f"--size: Quantus' PixelFlipping needs H x W divisible by 3 for RGB images (got {pixels})")
    return max(d for d in range(1, max(1, pixels // steps) + 1) if (pixels // 3) % d == 0)


Case = tuple[Callable[[Callable], object], Callable[[], object], Callable[[object, object], None]]


def cases_for(args: argparse.Namespace, channels: int, g: torch.Generator) -> tuple[nn.Module, dict[str, Case]]:
    """The model and, per metric, (e2kd's evaluation, Quantus', the check that their values agree)."""
    model = build(args.model, channels, size=args.size)
    x = torch.rand(args.n, channels, args.size, args.size, generator=g)
    with torch.no_grad():
        y = model(x).argmax(1)
    maps = input_gradient(model, x, y)  # the same maps on both sides
    xn, yn, an = x.numpy(), y.numpy(), maps.numpy()
    relevance = maps[:, 0]
    per_step = pixels_per_step(args.size * args.size, args.steps)
    n_patches = (args.size // args.patch) ** 2
    percentages = [10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0]
    similarity = e2kd.get_similarity("spearman")

    def close(ours, theirs):
        np.testing.assert_allclose(ours.numpy(), theirs, atol=1e-5)

    def ours_mprt(forward):
        return {
            name: float(similarity(input_gradient(m, x, y), maps).double().mean())
            for name, m in randomised_models(model, "cascading", seed=43)
        }

    def quantus_mprt():
        def explain(model, inputs, targets, **kwargs):
            return input_gradient(model, torch.as_tensor(inputs), torch.as_tensor(targets)).numpy()

        result = run_quantus(quiet(quantus.MPRT, seed=42, abs=False), model, xn, yn, an, explain_func=explain)
        return {k: float(np.mean(v)) for k, v in result.items() if k != "original"}

    def same_layers(ours, theirs):
        assert ours.keys() == theirs.keys()
        np.testing.assert_allclose([ours[k] for k in ours], [theirs[k] for k in ours], atol=1e-5)

    if channels == 1:
        return model, {
            "road": (
                lambda f: road_predictions(f, x, relevance, y, percentages, noise=0.0).double().mean(0),
                lambda: run_quantus(quiet(quantus.ROAD, percentages=percentages, noise=0.0), model, xn, yn, an),
                lambda ours, theirs: np.testing.assert_allclose(ours.numpy(), [theirs[p] for p in percentages]),
            )
        }
    pixel_flipping = quiet(quantus.PixelFlipping, features_in_step=3 * per_step, perturb_baseline=0.0)
    regions = quiet(
        quantus.RegionPerturbation, patch_size=args.patch, regions_evaluation=n_patches, perturb_baseline=0.0
    )
    return model, {
        "deletion_pixels": (
            lambda f: perturbation_curve(f, x, relevance, y, patch_size=1, patches_per_step=per_step)[1][:, 1:],
            lambda: np.array(run_quantus(pixel_flipping, model, xn, yn, an)),
            close,
        ),
        "deletion_patches": (
            lambda f: (lambda c: c[:, :1] - c[:, 1:])(perturbation_curve(f, x, relevance, y, patch_size=args.patch)[1]),
            lambda: np.array(run_quantus(regions, model, xn, yn, an)),
            close,
        ),
        "mprt": (ours_mprt, quantus_mprt, same_layers),
    }


def compare(model: nn.Module, case: Case, repeats: int) -> dict:
    """Both sides timed (best of ``repeats``), their values checked equal; the time in the model
    (which both run equally often) and the speed-up of everything else."""
    ours_fn, quantus_fn, check = case
    ours_s, ours_model_s, ours = timed(lambda: ours_fn(forward_of(model)), repeats)
    quantus_s, quantus_model_s, theirs = timed(quantus_fn, repeats)
    check(ours, theirs)
    return {
        "e2kd_s": ours_s,
        "quantus_s": quantus_s,
        "speedup": quantus_s / ours_s,
        "e2kd_model_s": ours_model_s,
        "quantus_model_s": quantus_model_s,
        "speedup_outside_the_model": (quantus_s - quantus_model_s) / max(ours_s - ours_model_s, 1e-9),
        "values_equal": True,
    }


def measure(args: argparse.Namespace) -> dict:
    g = torch.Generator().manual_seed(1)
    rows = {}
    for channels in (3, 1):
        model, cases = cases_for(args, channels, g)
        for name, case in cases.items():
            rows[name] = compare(model, case, args.repeats)
            row = rows[name]
            print(
                f"{name}: {row['speedup']:.1f}x Quantus ({row['speedup_outside_the_model']:.1f}x outside the model, "
                f"which takes {row['e2kd_model_s'] / row['e2kd_s']:.0%} of e2kd's time)",
                file=sys.stderr,
            )
    return {
        "benchmark": "faithfulness_metrics",
        **environment(),
        "quantus": quantus.__version__,
        "model": args.model,
        "images": args.n,
        "size": args.size,
        "pixels_per_step": pixels_per_step(args.size * args.size, args.steps),
        "patch_size": args.patch,
        "repeats": args.repeats,
        "metrics": rows,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=["small_resnet", "resnet18", "linear"], default="small_resnet")
    p.add_argument("--n", type=int, default=64, help="images")
    p.add_argument("--size", type=int, default=48, help="image side in pixels (H x W divisible by 3: Quantus)")
    p.add_argument("--steps", type=int, default=32, help="pixel-flipping steps (about; see pixels_per_step)")
    p.add_argument("--patch", type=int, default=4, help="region-perturbation patch side")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--json", help="also write the result to this file")
    args = p.parse_args(argv)
    emit(measure(args), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
