"""``e2kd evaluate``: metrics, a Markdown table and figures over one or more runs."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from .api import Explainer
from .config import MetricRef, metric_keys
from .evaluate import evaluate_model, flatten_metrics
from .explaining import explained_forward
from .models import module_device
from .registry import registry
from .runs import LoadedRun, load_run
from .runtime import Runtime, at_least_fp32, is_main_process
from .storage import atomic_write_json, atomic_write_text
from .viz import plot_curves, plot_explanations, plot_panels


def sample_images(dataset: Dataset, n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images (and labels) of a dataset of items, spread over it (read through its view)."""
    size = len(dataset)  # type: ignore[arg-type]
    stride = size // n + 1
    items = [dataset[(i * stride) % size] for i in range(min(n, size))]
    return torch.stack([it["image"] for it in items]), torch.stack([torch.as_tensor(it["label"]) for it in items])


def explanation_maps(
    models: dict[str, nn.Module],
    images: torch.Tensor,
    explainer: Explainer,
    *,
    reference: str | None = None,
    runtime: Runtime | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Every model's map (and top-1 prediction) on the same images, each computed on that model's
    device (under ``runtime``'s autocast when given, as in training and evaluation), all for the
    class ``models[reference]`` predicts, or each model's own top-1."""
    precision = runtime.autocast if runtime is not None else contextlib.nullcontext
    targets = None
    if reference is not None:
        with precision():
            targets = explained_forward(models[reference], images.to(module_device(models[reference])), None)[2]
    maps, preds = {}, {}
    for name, model in models.items():
        device = module_device(model)
        with precision():
            logits, m, _ = explained_forward(
                model, images.to(device), explainer, targets.to(device) if targets is not None else None
            )
        maps[name], preds[name] = at_least_fp32(m[:, 0]), logits.argmax(1)
    return maps, preds


def explanation_figure(
    models: dict[str, nn.Module],
    images: torch.Tensor,
    labels: torch.Tensor | None,
    explainer: Explainer,
    path: Path,
    *,
    reference: str | None = None,
    class_names: Sequence[str] | None = None,
    title: str | None = None,
    runtime: Runtime | None = None,
) -> Path:
    """A figure of :func:`explanation_maps` (the images stay where they are; maps come back to the CPU)."""
    maps, preds = explanation_maps(models, images, explainer, reference=reference, runtime=runtime)
    return plot_explanations(
        images.cpu(),
        {k: v.cpu() for k, v in maps.items()},
        path,
        labels=labels,
        predictions={k: v.cpu() for k, v in preds.items()},
        class_names=class_names,
        title=title,
    )


#: Parts of a flattened metric key that the table leaves out (curves, per-cell and per-shift values).
_NOT_IN_TABLE = (".curve.", ".y", ".shift_")


def table(results: dict[str, dict[str, Any]]) -> str:
    """Markdown: one row per run, one column per split/metric (curves, per-cell and per-shift
    values left out). A column is headed by its metric's key and, where the metric states one, its
    detail (e.g. its similarity); a metric where lower is better is marked ↓; with several runs the
    best value of each column is in bold."""
    flat = {
        run: {(split, k): v for split, values in r["splits"].items() for k, v in flatten_metrics(values).items()}
        for run, r in results.items()
    }
    rows = {run: {f"{split}/{k}": v for (split, k), v in values.items()} for run, values in flat.items()}
    value_key = {f"{split}/{k}": k for values in flat.values() for split, k in values}
    directions = {key: higher for r in results.values() for key, higher in r.get("higher_is_better", {}).items()}
    details = {key: detail for r in results.values() for key, detail in r.get("details", {}).items()}
    columns = list(dict.fromkeys(c for row in rows.values() for c in row if not any(p in c for p in _NOT_IN_TABLE)))

    def metric_of(column: str) -> str | None:
        value = value_key[column]  # (split names may hold "/")
        return next((k for k in directions if value == k or value.startswith(f"{k}.")), None)

    def header(column: str) -> str:
        key = metric_of(column)
        detail = details.get(key, "") if key is not None else ""
        text = column + (f" ({detail})" if detail and detail not in column else "")
        return text + (" ↓" if key is not None and not directions[key] else "")

    def best(column: str) -> float | None:
        key = metric_of(column)
        values = [row[column] for row in rows.values() if column in row and row[column] == row[column]]
        if key is None or len(set(values)) < 2:  # (one run, or every run equal: nothing to mark)
            return None
        return max(values) if directions[key] else min(values)

    marks = {c: best(c) for c in columns}
    lines = ["| run | " + " | ".join(header(c) for c in columns) + " |", "|" + "---|" * (len(columns) + 1)]
    for run, row in rows.items():
        cells = [
            "—" if c not in row else (f"**{row[c]:.4g}**" if row[c] == marks[c] else f"{row[c]:.4g}") for c in columns
        ]
        lines.append(f"| {run} | " + " | ".join(cells) + " |")
    notes = [
        note
        for flag, note in (
            (any("↓" in header(c) for c in columns), "↓: lower is better"),
            (any(m is not None for m in marks.values()), "bold: the best run of a column"),
        )
        if flag
    ]
    if notes:
        lines.append("\n" + "; ".join(notes))
    return "\n".join(lines) + "\n"


#: What a report's metrics.json keeps of each run's results.
RESULT_FIELDS = ("splits", "skipped", "higher_is_better", "details", "categories", "curve_labels")
#: Metrics the report also computes for the teacher, to compare every run with it.
TEACHER_CATEGORIES = ("faithfulness", "randomisation")


def teacher_results(run: LoadedRun, metrics: list[str] | None = None) -> dict[str, Any] | None:
    """The run's teacher evaluated with the run's faithfulness and randomisation metrics (``metrics``
    replacing its ``eval.metrics``), under the same keys; None without a teacher or such metrics."""
    refs = [MetricRef(name=m) for m in metrics] if metrics else list(run.config.eval.metrics)
    chosen = [
        MetricRef(name=ref.name, options=ref.options, as_=key)
        for ref, key in zip(refs, metric_keys(refs))
        if registry().info("metric", ref.name).cls.category in TEACHER_CATEGORIES
    ]
    if run.teacher is None or not chosen:
        return None
    return evaluate_model(run.plan, run.teacher, None, chosen, runtime=run.runtime)  # type: ignore[arg-type]


def curve_panels(results: dict[str, dict[str, Any]], split: str) -> dict[str, list[dict[str, Any]]]:
    """Per metric category, one :func:`e2kd.viz.plot_panels` panel per metric whose value on
    ``split`` holds a ``"curve"``, with a line per run that has it."""
    panels: dict[str, dict[str, dict[str, Any]]] = {}
    for run, r in results.items():
        for key, value in r["splits"].get(split, {}).items():
            if not (isinstance(value, dict) and isinstance(value.get("curve"), dict) and value["curve"]):
                continue
            xlabel, ylabel = r.get("curve_labels", {}).get(key, ("", ""))
            detail = r.get("details", {}).get(key)
            panel = panels.setdefault(r.get("categories", {}).get(key, "other"), {}).setdefault(
                key,
                {"title": f"{key} ({detail})" if detail else key, "xlabel": xlabel, "ylabel": ylabel, "curves": {}},
            )
            xs = list(value["curve"])
            if all(_is_number(x) for x in xs):
                panel["curves"][run] = ([float(x) for x in xs], list(value["curve"].values()))
            else:
                panel["xticks"] = xs
                panel["curves"][run] = (list(range(len(xs))), list(value["curve"].values()))
    return {category: list(by_key.values()) for category, by_key in panels.items()}


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def figure_split(run: LoadedRun) -> str:
    """The split the figures show: the last evaluation split (out of distribution where there is one)."""
    splits = run.config.eval.splits or list(run.dataset.eval_splits())
    return splits[-1]


def evaluate_report(
    run_dirs: list[str | Path],
    out: str | Path | None = None,
    *,
    metrics: list[str] | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Evaluate each run (rewriting its metrics.json) and, for faithfulness and randomisation
    metrics, the first run's teacher; write metrics.json, report.md, explanations.png and, when
    computed, shift.png and one figure of curves per metric category (faithfulness.png,
    randomisation.png) into ``out``."""
    if not run_dirs:
        raise ValueError("no run directories given")
    out = Path(out) if out is not None else (Path(run_dirs[0]) if len(run_dirs) == 1 else Path("e2kd_report"))
    results, runs = {}, []
    for run_dir in run_dirs:
        log(f"[evaluate] {run_dir}")
        run = load_run(run_dir)
        runs.append(run)
        results[run.name] = run.evaluate(metrics)
    with_teacher = next((r for r in runs if r.teacher is not None), None)
    if with_teacher is not None:
        teacher_row = teacher_results(with_teacher, metrics)
        if teacher_row is not None:
            log(f"[evaluate] the teacher of {with_teacher.name}")
            results["teacher"] = teacher_row
    if not is_main_process():  # under torchrun the main process writes the report
        return {"results": results, "figures": {}, "out": str(out)}
    if out.resolve() not in {r.path.resolve() for r in runs}:  # inside a run dir, its own metrics.json is the record
        atomic_write_json(
            out / "metrics.json",
            {name: {k: r[k] for k in RESULT_FIELDS if k in r} for name, r in results.items()},
        )
    atomic_write_text(out / "report.md", table(results))
    first = runs[0]
    teacher = next((r.teacher for r in runs if r.teacher is not None), None)
    models = ({"teacher": teacher} if teacher is not None else {}) | {r.name: r.model for r in runs}
    split = figure_split(first)
    images, labels = sample_images(first.split(split))
    explainer = first.explainer()
    whose = "the teacher's class" if teacher is not None else "each model's predicted class"
    figures = {
        "explanations": explanation_figure(
            models,
            images,
            labels,
            explainer,
            out / "explanations.png",
            reference="teacher" if teacher is not None else None,
            class_names=first.class_names,
            title=f"{explainer.name} explanations for {whose} on {split} images",
            runtime=first.runtime,
        )
    }
    curves = {
        name: r["splits"][split]["shift_equivariance"]
        for name, r in results.items()
        if "shift_equivariance" in r["splits"].get(split, {})
    }
    if curves:
        figures["shift"] = plot_curves(
            {name: ([int(k.split("_")[1]) for k in c], list(c.values())) for name, c in curves.items()},
            out / "shift.png",
            xlabel="diagonal shift (px)",
            ylabel="cosine on the overlap",
            title=f"shift equivariance of explanations ({split})",
        )
    for category, panels in curve_panels(results, split).items():
        for panel in panels:
            panel["title"] = f"{panel['title']} — {split}"
        figures[category] = plot_panels(panels, out / f"{category}.png")
    log(table(results))
    log("wrote " + ", ".join(str(p) for p in [out / "metrics.json", out / "report.md", *figures.values()]))
    return {"results": results, "figures": {k: str(v) for k, v in figures.items()}, "out": str(out)}
