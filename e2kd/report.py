"""``e2kd evaluate``: metrics, a Markdown table and figures over one or more runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .api import Explainer
from .data import SHAPES
from .evaluate import flatten_metrics
from .experiment import evaluate_run, load_run
from .runs import atomic_write_json, atomic_write_text
from .viz import plot_curves, plot_explanations


def sample_images(dataset, n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images (and labels) spread over the dataset, cycling through the classes."""
    k = int(dataset.labels.max()) + 1
    index = (torch.arange(n) * (k + 1)) % len(dataset)
    return dataset.images[index], dataset.labels[index]


def explanation_figure(
    models: dict[str, nn.Module], images: torch.Tensor, labels: torch.Tensor | None, explainer: Explainer,
    path: Path, *, reference: str | None = None, title: str | None = None,
) -> Path:
    """Every model's map on the same images, all for the class ``models[reference]`` predicts
    (the teacher's top-1), or each model's own top-1 when ``reference`` is None."""
    maps, preds = {}, {}
    with torch.no_grad():
        for name, model in models.items():
            preds[name] = model(images).argmax(1)
    for name, model in models.items():
        target = preds[reference] if reference is not None else preds[name]
        maps[name] = explainer.explain(model, images, target)
    return plot_explanations(images, maps, path, labels=labels, predictions=preds, class_names=SHAPES, title=title)


def table(results: dict[str, dict[str, Any]]) -> str:
    """Markdown: one row per run, one column per split/metric (per-cell and per-shift values left out)."""
    rows = {run: {f"{split}/{k}": v for split, values in r["splits"].items() for k, v in flatten_metrics(values).items()}
            for run, r in results.items()}
    columns = list(dict.fromkeys(c for row in rows.values() for c in row
                                 if ".y" not in c and ".shift_" not in c))
    lines = ["| run | " + " | ".join(columns) + " |", "|" + "---|" * (len(columns) + 1)]
    for run, row in rows.items():
        lines.append(f"| {run} | " + " | ".join(f"{row[c]:.4g}" if c in row else "—" for c in columns) + " |")
    return "\n".join(lines) + "\n"


def evaluate_report(
    run_dirs: list[str | Path], out: str | Path | None = None, *, metrics: list[str] | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Evaluate each run (rewriting its metrics.json) and write metrics.json, report.md,
    explanations.png and, when computed, shift.png into ``out``."""
    if not run_dirs:
        raise ValueError("no run directories given")
    out = Path(out) if out is not None else (Path(run_dirs[0]) if len(run_dirs) == 1 else Path("e2kd_report"))
    results, runs = {}, []
    for run_dir in run_dirs:
        log(f"[evaluate] {run_dir}")
        run = load_run(run_dir)
        runs.append(run)
        results[run.name] = evaluate_run(run_dir, metrics)
    if out.resolve() not in {r.path.resolve() for r in runs}:  # inside a run dir, its own metrics.json is the record
        atomic_write_json(out / "metrics.json", {name: {k: r[k] for k in ("splits", "skipped")} for name, r in results.items()})
    atomic_write_text(out / "report.md", table(results))
    first = runs[0]
    teacher = next((r.teacher for r in runs if r.teacher is not None), None)
    models = ({"teacher": teacher} if teacher is not None else {}) | {r.name: r.model for r in runs}
    images, labels = sample_images(first.datasets()["test_ood"])
    figures = {"explanations": explanation_figure(
        models, images, labels, first.explainer(), out / "explanations.png",
        reference="teacher" if teacher is not None else None,
        title="explanations for the teacher's class on out-of-distribution images" if teacher is not None
        else "explanations for each model's predicted class on out-of-distribution images")}
    curves = {name: r["splits"]["test_ood"]["shift_equivariance"] for name, r in results.items()
              if "shift_equivariance" in r["splits"].get("test_ood", {})}
    if curves:
        figures["shift"] = plot_curves(
            {name: ([int(k.split("_")[1]) for k in c], list(c.values())) for name, c in curves.items()},
            out / "shift.png", xlabel="diagonal shift (px)", ylabel="cosine on the overlap",
            title="shift equivariance of explanations (test_ood)")
    log(table(results))
    log("wrote " + ", ".join(str(p) for p in [out / "metrics.json", out / "report.md", *figures.values()]))
    return {"results": results, "figures": {k: str(v) for k, v in figures.items()}, "out": str(out)}
