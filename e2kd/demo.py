"""``e2kd demo``: plain KD versus e2KD (Grad-CAM) on few, background-biased images.

A teacher is trained on unbiased synthetic data (the class is the object's shape), then
students are distilled from it on a few images per class whose background type matches
the class 95% of the time: plain KD, e2KD with the live teacher, and e2KD with a frozen
teacher (logits and maps computed once, replayed under the same augmentation as the
image). All are evaluated in distribution (same bias) and out of distribution
(background never matching the class).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .config import load_config_dict
from .experiment import distill, train_teacher
from .registry import create
from .report import explanation_figure, sample_images
from .runs import load_run
from .storage import atomic_write_json, atomic_write_text

TEACHER_WIDTHS = [24, 48, 96]
STUDENT_WIDTHS = [16, 32, 64]
#: student variant -> (lambda, teacher mode); "frozen" replays teacher outputs cached once
VARIANTS = {"KD": (0.0, "live"), "e2KD": (1.0, "live"), "e2KD frozen": (1.0, "frozen")}


def demo_configs(out: Path, seed: int, quick: bool = False) -> dict[str, dict[str, Any]]:
    """The demo's experiment configs as dicts (teacher, then one per student variant)."""
    scale = 0.1 if quick else 1.0
    classes, size = 4, 32
    test = {"num_classes": classes, "image_size": size, "test_per_class": max(8, int(100 * scale))}
    teacher = {
        "seed": 0,
        "data": {
            "name": "synthetic",
            "options": {**test, "train_per_class": max(8, int(200 * scale)), "bias": 0.0},
            "seed": 0,
        },
        "model": {"name": "small_resnet", "options": {"widths": TEACHER_WIDTHS}},
        "train": {"epochs": 1 if quick else 6, "batch_size": 64, "lr": 3e-3},
        "eval": {"metrics": ["accuracy"]},
        "out_dir": str(out / "teacher"),
    }
    configs = {"teacher": teacher}
    for variant, (lam, mode) in VARIANTS.items():
        configs[variant] = {
            "seed": seed,
            "data": {"name": "synthetic", "options": {**test, "train_per_class": 16, "bias": 0.95}, "seed": seed},
            "model": {"name": "small_resnet", "options": {"widths": STUDENT_WIDTHS}},
            "teacher": {**teacher["model"], "checkpoint": str(out / "teacher" / "model.pt")},
            "distill": {
                "lam": lam,
                "temperature": 1.0,
                "explainer": "gradcam",
                "similarity": "cosine",
                "teacher_mode": mode,
            },
            "train": {"epochs": 2 if quick else 60, "batch_size": 32, "lr": 3e-3},
            "out_dir": str(out / f"{variant.lower().replace(' ', '_')}_seed{seed}"),
        }
    return configs


COLUMNS = [
    ("test_id", "accuracy", "ID acc"),
    ("test_id", "agreement", "ID agree"),
    ("test_ood", "accuracy", "OOD acc"),
    ("test_ood", "agreement", "OOD agree"),
    ("test_id", "explanation_similarity", "ID expl-sim"),
    ("test_ood", "explanation_similarity", "OOD expl-sim"),
]


def _cell(values: list[float]) -> str:
    if not values:
        return "—"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{100 * mean:.1f}"
    return f"{100 * mean:.1f} ± {100 * statistics.stdev(values):.1f}"


def summary_table(rows: dict[str, list[dict[str, Any]]]) -> str:
    """Markdown table (percent; mean ± std over seeds) of the demo's models."""
    header = "| model | " + " | ".join(c[2] for c in COLUMNS) + " |"
    lines = [header, "|" + "---|" * (len(COLUMNS) + 1)]
    for name, runs in rows.items():
        cells = [_cell([r["splits"][s][m] for r in runs if m in r["splits"][s]]) for s, m, _ in COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_demo(
    out_dir: str | Path = "demo_out", seeds: Sequence[int] = (0, 1, 2), *, quick: bool = False, log=print
) -> dict[str, Any]:
    """Train the teacher, distill KD and e2KD students, evaluate, write results and a figure."""
    out = Path(out_dir)
    start = time.time()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    configs = {seed: demo_configs(out, seed, quick) for seed in seeds}
    first = configs[seeds[0]]
    log(
        f"[e2kd demo] training the teacher on unbiased data ({first['teacher']['data']['options']['train_per_class']} images/class) ..."
    )
    teacher_cfg = load_config_dict(first["teacher"], source="demo teacher")
    teacher_results = train_teacher(teacher_cfg)
    rows: dict[str, list[dict[str, Any]]] = {"teacher": [teacher_results]}
    for seed in seeds:
        for variant in VARIANTS:
            log(f"[e2kd demo] distilling the {variant} student (seed {seed}, 16 images/class, 95% background bias) ...")
            config = load_config_dict(configs[seed][variant], source=f"demo {variant}")
            rows.setdefault(variant, []).append(distill(config))
    table = summary_table(rows)
    figure = _figure(out, first, seeds[0])
    results = {
        "seeds": list(seeds),
        "quick": quick,
        "table_percent": table,
        "runs": {name: [r["splits"] for r in runs] for name, runs in rows.items()},
        "figure": str(figure),
        "seconds": round(time.time() - start, 1),
    }
    atomic_write_json(out / "results.json", results)
    atomic_write_text(out / "results.md", table + "\n")
    log("")
    log(table)
    log("")
    kd = rows["KD"]
    for variant in ("e2KD", "e2KD frozen"):
        e2 = rows[variant]
        d_sim = _mean(e2, "test_ood", "explanation_similarity") - _mean(kd, "test_ood", "explanation_similarity")
        d_ood = _mean(e2, "test_ood", "accuracy") - _mean(kd, "test_ood", "accuracy")
        d_agree = _mean(e2, "test_id", "agreement") - _mean(kd, "test_id", "agreement")
        log(
            f"{variant} - KD: OOD explanation similarity {100 * d_sim:+.1f}, OOD accuracy {100 * d_ood:+.1f}, "
            f"ID agreement {100 * d_agree:+.1f} points"
        )
    log(f"wrote {out / 'results.json'}, {out / 'results.md'} and {figure} in {results['seconds']:.0f} s")
    return results


def _mean(runs: list[dict[str, Any]], split: str, metric: str) -> float:
    return statistics.fmean(r["splits"][split][metric] for r in runs)


def _figure(out: Path, configs: dict[str, dict[str, Any]], seed: int) -> Path:
    """Teacher and student Grad-CAMs (for the teacher's class) on the same out-of-distribution images."""
    runs = {variant: load_run(configs[variant]["out_dir"]) for variant in VARIANTS}
    kd = runs["KD"]
    models = {"teacher": kd.teacher, **{variant: run.model for variant, run in runs.items()}}
    images, labels = sample_images(kd.split("test_ood"))
    return explanation_figure(
        models,
        images,
        labels,
        create("explainer", "gradcam"),
        out / "explanations.png",
        reference="teacher",
        class_names=kd.class_names,
        title=f"Grad-CAM for the teacher's class on out-of-distribution images (seed {seed}); red = wrong",
    )
