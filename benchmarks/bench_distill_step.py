"""Training-step time of e2KD (Grad-CAM, last stage) over plain KD, as ratios in one run, beside
what a user of the paper's code writes by hand.

Modes on the same teacher, student and batch (forward, loss, backward, optimizer step):

- ``kd`` / ``e2kd``: the Distiller, live teacher (``lam`` 0 / 1);
- ``e2kd_every``: the Distiller with ``explain_every=K``; its step time is that of a K-step cycle,
  (median explaining step + (K - 1) x median plain step) / K, the explaining steps' median taken
  over its own explaining steps and the ``e2kd`` mode's (the same computation);
- ``e2kd_closed``: the Distiller with Grad-CAM in closed form (``closed_form: true``: W_c · A / hw);
- ``e2kd_upsampled``: the Distiller forming the 224 x 224 maps before the cosine
  (``feature_resolution=False``; the other Distiller modes compare the maps at feature resolution);
- ``frozen_kd`` / ``frozen_e2kd``: no teacher forward, logits and maps replayed from an on-disk
  float16 cache (e2kd.frozen), read once before timing — in training the loader workers read it
  beside the step; the time of one synchronous read of the batch is reported apart
  (``cache_read_s``);
- ``hand_kd`` / ``hand_e2kd``: hand-written steps with timm ``forward_features`` /
  ``forward_head``, Grad-CAM from one ``autograd.grad`` (``create_graph=True`` for the student).

With ``--family bcos`` the models are e2kd's B-cos ResNets (``bcos_<teacher-arch>`` ->
``bcos_<arch>``, explainer ``bcos``) and the modes are ``kd``, ``e2kd`` and ``e2kd_every``.

The modes are interleaved and their order rotates, so machine noise hits all alike. Reports
median step times, images/s, ratios, and (CUDA) peak memory per mode.

    python benchmarks/bench_distill_step.py                       # resnet34 -> resnet18, 224 px
    python benchmarks/bench_distill_step.py --teacher-arch resnet18 --json out.json
    python benchmarks/bench_distill_step.py --device cuda --precision bf16 --channels-last --batch-size 256
    python benchmarks/bench_distill_step.py --family bcos --device cuda --batch-size 64
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import statistics
import sys
import tempfile
import time

import timm
import torch
import torch.nn.functional as F
from _report import emit

import e2kd
from e2kd.distill import Distiller
from e2kd.frozen import TeacherCache, build_cache
from e2kd.runtime import Runtime


def hand_steps(teacher, student, optimizer, autocast):
    """The hand-written KD and e2KD steps a user of the paper's code would write."""

    def cam(features, logits, target, create_graph):
        score = logits.gather(1, target[:, None]).sum()
        (grad,) = torch.autograd.grad(score, features, create_graph=create_graph)
        return F.relu((grad.mean(dim=(2, 3), keepdim=True) * features).sum(1, keepdim=True))

    def kd(s_logits, t_logits):
        return F.kl_div(
            F.log_softmax(s_logits.float(), 1),
            F.log_softmax(t_logits.float(), 1),
            reduction="batchmean",
            log_target=True,
        )

    def hand_kd(x):
        with autocast():
            with torch.no_grad():
                t_logits = teacher(x)
            loss = kd(student(x), t_logits)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def hand_e2kd(x):
        size = x.shape[-2:]
        with autocast():
            t_feat = teacher.forward_features(x).detach().requires_grad_(True)
            t_logits = teacher.forward_head(t_feat)
            target = t_logits.argmax(1)
            t_cam = F.interpolate(cam(t_feat, t_logits, target, False).detach(), size=size, mode="bilinear")
            s_feat = student.forward_features(x)
            s_logits = student.forward_head(s_feat)
            s_cam = F.interpolate(cam(s_feat, s_logits, target, True), size=size, mode="bilinear")
            expl = (1 - F.cosine_similarity(s_cam.flatten(1).float(), t_cam.flatten(1).float())).mean()
            loss = kd(s_logits, t_logits.detach()) + expl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return hand_kd, hand_e2kd


def measure(args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    amp = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]

    def autocast():
        return torch.autocast(device.type, dtype=amp) if amp is not None else contextlib.nullcontext()

    bcos = args.family == "bcos"
    if bcos:
        teacher = e2kd.get_model_builder(f"bcos_{args.teacher_arch}").build(args.num_classes)
        student = e2kd.get_model_builder(f"bcos_{args.arch}").build(args.num_classes)
    else:
        teacher = timm.create_model(args.teacher_arch, pretrained=False, num_classes=args.num_classes)
        student = timm.create_model(args.arch, pretrained=False, num_classes=args.num_classes)
    teacher = teacher.to(device, memory_format=memory_format).eval().requires_grad_(False)
    student = student.to(device, memory_format=memory_format).train()
    optimizer = torch.optim.SGD(student.parameters(), lr=1e-3, momentum=0.9)
    explainer = e2kd.get_explainer("bcos" if bcos else "gradcam")
    similarity = e2kd.get_similarity("cosine")
    e2kd_kw = dict(explainer=explainer, similarity=similarity, lam=1.0)
    distillers = {
        "kd": Distiller(teacher, student, lam=0.0),
        "e2kd": Distiller(teacher, student, **e2kd_kw),
        "e2kd_every": Distiller(teacher, student, explain_every=args.explain_every, **e2kd_kw),
    }
    # images in [0, 1] (what e2kd's loaders give; the B-cos encoding [x, 1 - x] expects it)
    x = torch.rand(args.batch_size, 3, args.image_size, args.image_size, device=device).contiguous(
        memory_format=memory_format
    )
    hand, replay, cache_read_s = {}, {}, None
    if not bcos:
        distillers.update(
            {
                "e2kd_upsampled": Distiller(teacher, student, feature_resolution=False, **e2kd_kw),
                "e2kd_closed": Distiller(
                    teacher, student, **{**e2kd_kw, "explainer": e2kd.get_explainer("gradcam", closed_form=True)}
                ),
                "frozen_kd": Distiller(None, student, lam=0.0),
                "frozen_e2kd": Distiller(None, student, **e2kd_kw),
            }
        )
        cache_dir = tempfile.mkdtemp(prefix="e2kd-bench-cache-")
        build_cache(
            cache_dir,
            teacher,
            explainer,
            x.cpu(),
            {"benchmark": True},
            dtype="float16",
            shard_size=512,
            batch_size=args.batch_size,
            progress=False,
            runtime=Runtime(torch.device(device)),
        )
        cache = TeacherCache.open(cache_dir)

        def read_replay() -> dict:
            logits, maps = zip(*(cache[i] for i in range(len(cache))))
            return {"teacher_logits": torch.stack(logits).to(device), "teacher_maps": torch.stack(maps).to(device)}

        start = time.perf_counter()
        replay = read_replay()
        cache_read_s = time.perf_counter() - start
        hand = dict(zip(("hand_kd", "hand_e2kd"), hand_steps(teacher, student, optimizer, autocast)))
    counters = {"e2kd_every": 0}

    def step(mode: str) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        if mode in hand:
            hand[mode](x)
        else:
            call = dict(replay) if mode.startswith("frozen") else {}
            if mode == "e2kd_every":
                call["step"] = counters["e2kd_every"]
                counters["e2kd_every"] += 1
            with autocast():
                out = distillers[mode](x, **call)
            optimizer.zero_grad(set_to_none=True)
            out["loss"].backward()
            optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    modes = [*distillers, *hand]
    for _ in range(args.warmup):
        for mode in modes:
            step(mode)
    counters["e2kd_every"] = 0
    times: dict[str, list[float]] = {m: [] for m in modes}
    peak: dict[str, float | None] = {m: None for m in modes}
    for rep in range(args.repeats):
        order = modes[rep % len(modes) :] + modes[: rep % len(modes)]
        for mode in order:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            times[mode].append(step(mode))
            if device.type == "cuda":
                peak[mode] = max(peak[mode] or 0.0, torch.cuda.max_memory_allocated(device) / 2**20)
    med = {m: statistics.median(t) for m, t in times.items()}
    k = args.explain_every
    explaining = [t for i, t in enumerate(times["e2kd_every"]) if i % k == 0]
    plain = [t for i, t in enumerate(times["e2kd_every"]) if i % k != 0] or explaining
    med["e2kd_every"] = (statistics.median(explaining + times["e2kd"]) + (k - 1) * statistics.median(plain)) / k

    def ratio(a: str, b: str) -> float | None:
        return med[a] / med[b] if a in med and b in med else None

    return {
        "benchmark": "distill_step",
        "family": args.family,
        "teacher": args.teacher_arch,
        "student": args.arch,
        "image_size": args.image_size,
        "batch_size": args.batch_size,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "precision": args.precision,
        "channels_last": args.channels_last,
        "explain_every": args.explain_every,
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "median_step_s": med,
        "images_per_s": {m: args.batch_size / t for m, t in med.items()},
        "peak_memory_mib": peak,
        "cache_read_s": cache_read_s,
        "peak_memory_e2kd_over_kd": peak["e2kd"] / peak["kd"] if peak["kd"] else None,
        "ratio_e2kd_over_kd": ratio("e2kd", "kd"),
        "ratio_e2kd_every_over_kd": ratio("e2kd_every", "kd"),
        "ratio_e2kd_upsampled_over_kd": ratio("e2kd_upsampled", "kd"),
        "ratio_e2kd_closed_over_kd": ratio("e2kd_closed", "kd"),
        "ratio_frozen_e2kd_over_frozen_kd": ratio("frozen_e2kd", "frozen_kd"),
        "ratio_frozen_e2kd_over_live_e2kd": ratio("frozen_e2kd", "e2kd"),
        "ratio_e2kd_over_hand_e2kd": ratio("e2kd", "hand_e2kd"),
        "ratio_kd_over_hand_kd": ratio("kd", "hand_kd"),
        "ratio_hand_e2kd_over_hand_kd": ratio("hand_e2kd", "hand_kd"),
        "step_times_s": times,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--family",
        choices=["timm", "bcos"],
        default="timm",
        help="timm CNNs with Grad-CAM, or B-cos ResNets with the B-cos explainer",
    )
    p.add_argument("--arch", default="resnet18", help="student (timm name; with --family bcos: resnet18, ...)")
    p.add_argument("--teacher-arch", default="resnet34", help="teacher (timm name)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=8)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--device", default="auto", help="cpu, cuda, ... (auto: CUDA when available)")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32", help="autocast precision")
    p.add_argument("--channels-last", action="store_true", help="channels-last models and batch")
    p.add_argument("--explain-every", type=int, default=4, help="K of the e2kd_every mode")
    p.add_argument("--json", help="also write the result to this file")
    args = p.parse_args(argv)
    result = measure(args)
    emit(result, args.json)
    ratios = ", ".join(
        f"{key[6:].replace('_over_', '/')} {value:.3f}"
        for key, value in result.items()
        if key.startswith("ratio_") and value is not None
    )
    memory = "".join(f", {mode} {mib:.0f} MiB" for mode, mib in result["peak_memory_mib"].items() if mib)
    print(
        f"{args.family} {result['student']} <- {result['teacher']}, {args.image_size} px, batch {args.batch_size}, "
        f"{args.precision}{', channels_last' if args.channels_last else ''} on {result['device_name']}: "
        f"{ratios}{memory}",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
