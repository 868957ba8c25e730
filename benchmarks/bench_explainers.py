"""Per-explainer costs, as ratios measured in one run.

1. e2KD step / KD step for each explainer on small models (interleaved, rotating order):
   gradcam, gradient, input_x_gradient, integrated_gradients on timm resnet18 -> resnet18;
   bcos on bcos_resnet18 -> bcos_resnet18; rollout on a timm ViT-Tiny -> ViT-Tiny.
2. Batch Grad-CAM throughput (images/s) of e2kd's gradcam versus captum's LayerGradCam
   (+ its bilinear interpolation) and pytorch-grad-cam's GradCAM (if installed), same model
   and batch.

    python benchmarks/bench_explainers.py --json benchmarks/results/explainers.json
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time

import timm
import torch
from _report import emit

import e2kd
from e2kd.distill import Distiller

CNN_EXPLAINERS = {"gradcam": {}, "gradient": {}, "input_x_gradient": {}, "integrated_gradients": {"n_steps": 8}}


def _models(kind: str, size: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    if kind == "bcos":
        build = e2kd.get_model_builder("bcos_resnet18")
        return build.build(100), build.build(100)
    if kind == "vit":
        make = lambda: timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=100, img_size=size)  # noqa: E731
        return make(), make()
    return (
        timm.create_model("resnet18", pretrained=False, num_classes=100),
        timm.create_model("resnet18", pretrained=False, num_classes=100),
    )


def step_ratios(args: argparse.Namespace) -> dict:
    settings = [(name, opts, "cnn") for name, opts in CNN_EXPLAINERS.items()] + [
        ("bcos", {}, "bcos"),
        ("rollout", {}, "vit"),
    ]
    if args.only:
        settings = [s for s in settings if s[0] in args.only.split(",")]
    x = torch.rand(args.batch_size, 3, args.image_size, args.image_size)
    results = {}
    for name, opts, kind in settings:
        teacher, student = _models(kind, args.image_size)
        optimizer = torch.optim.SGD(student.parameters(), lr=1e-4)
        modes = {
            "kd": Distiller(teacher, student, lam=0.0),
            "e2kd": Distiller(
                teacher,
                student,
                explainer=e2kd.get_explainer(name, **opts),
                similarity=e2kd.get_similarity("cosine"),
                lam=1.0,
            ),
        }

        def step(mode: str, modes=modes, optimizer=optimizer) -> float:
            start = time.perf_counter()
            out = modes[mode](x)
            optimizer.zero_grad(set_to_none=True)
            out["loss"].backward()
            optimizer.step()
            return time.perf_counter() - start

        for mode in modes:
            step(mode)  # warm-up
        times = {m: [] for m in modes}
        for rep in range(args.repeats):
            for mode in ["kd", "e2kd"] if rep % 2 == 0 else ["e2kd", "kd"]:
                times[mode].append(step(mode))
        med = {m: statistics.median(t) for m, t in times.items()}
        results[name] = {
            "models": kind,
            "options": opts,
            "kd_s": med["kd"],
            "e2kd_s": med["e2kd"],
            "ratio_e2kd_over_kd": med["e2kd"] / med["kd"],
        }
        print(f"{name:22s} e2KD/KD = {med['e2kd'] / med['kd']:.2f}", file=sys.stderr)
    return results


def gradcam_throughput(args: argparse.Namespace) -> dict:
    from captum.attr import LayerAttribution, LayerGradCam

    torch.manual_seed(0)
    model = timm.create_model(args.throughput_arch, pretrained=False, num_classes=1000).eval()
    x = torch.rand(args.throughput_batch, 3, 224, 224)
    target = torch.randint(0, 1000, (x.shape[0],))
    ours = e2kd.get_explainer("gradcam", layer="layer4")
    captum = LayerGradCam(model, model.layer4)

    def run_ours():
        return ours.explain(model, x, target)

    def run_captum():
        cam = captum.attribute(x, target=target, relu_attributions=True)
        return LayerAttribution.interpolate(cam, (224, 224), "bilinear")

    runners = {"e2kd": run_ours, "captum": run_captum}
    try:
        from pytorch_grad_cam import GradCAM
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        pgc = GradCAM(model=model, target_layers=[model.layer4])
        targets = [ClassifierOutputTarget(int(t)) for t in target]
        runners["pytorch_grad_cam"] = lambda: pgc(input_tensor=x, targets=targets)
    except ImportError:
        pass
    for fn in runners.values():
        fn()  # warm-up
    times = {k: [] for k in runners}
    names = list(runners)
    for rep in range(args.repeats):
        for name in names[rep % len(names) :] + names[: rep % len(names)]:
            start = time.perf_counter()
            runners[name]()
            times[name].append(time.perf_counter() - start)
    ips = {k: x.shape[0] / statistics.median(v) for k, v in times.items()}
    out = {
        "arch": args.throughput_arch,
        "batch": x.shape[0],
        "images_per_s": ips,
        "ours_over_captum": ips["e2kd"] / ips["captum"],
    }
    if "pytorch_grad_cam" in ips:
        out["ours_over_pytorch_grad_cam"] = ips["e2kd"] / ips["pytorch_grad_cam"]
    else:
        out["pytorch_grad_cam"] = "not installed (pip install grad-cam)"
    print("Grad-CAM images/s: " + ", ".join(f"{k} {v:.1f}" for k, v in ips.items()), file=sys.stderr)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--only", help="comma-separated explainers for the step ratios (default: all)")
    p.add_argument("--throughput-arch", default="resnet18")
    p.add_argument("--throughput-batch", type=int, default=16)
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--json", help="also write the result to this file")
    args = p.parse_args(argv)
    result = {
        "benchmark": "explainers",
        "torch": torch.__version__,
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "step_ratios": step_ratios(args),
    }
    if not args.skip_throughput:
        result["gradcam_throughput"] = gradcam_throughput(args)
    emit(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
