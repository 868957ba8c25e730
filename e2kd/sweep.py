"""Ablation sweeps: the cross product of config values x seeds, resumable, summarised.

``e2kd sweep CONFIG --grid distill.similarity=cosine,pearson --grid distill.lam=0,1 --seeds 0,1,2``
validates every run's config first (as loading any config does: a non-differentiable
similarity or explainer in a distillation run is refused before anything runs), then runs them in order, skipping runs that
already finished (so a killed sweep resumes), and writes ``sweep.csv`` (one row per run),
``sweep.md`` (mean ± std over seeds per cell) and ``sweep.png`` (a metric against the first
swept key, one line per combination of the other keys).
"""

from __future__ import annotations

import copy
import csv
import io
import itertools
import re
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .config import ExperimentConfig, load_config_dict, parse_override, read_config_file, set_value
from .config import config_path as resolve_config_path
from .errors import ConfigError
from .evaluate import flatten_metrics
from .storage import atomic_write_text


@dataclass
class SweepRun:
    cell: dict[str, Any]
    seed: int
    config: ExperimentConfig

    @property
    def name(self) -> str:
        return _slug("_".join([f"{k}={v}" for k, v in self.cell.items()] + [f"seed={self.seed}"]))


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9=._-]+", "-", text)


def parse_grid(items: list[str]) -> dict[str, list[Any]]:
    """``["distill.lam=0,1"]`` -> ``{"distill.lam": [0, 1]}`` (each value parsed as a YAML scalar)."""
    grid: dict[str, list[Any]] = {}
    for item in items:
        parse_override(item)  # same KEY=VALUE checks and messages as --set
        key, raw = (part.strip() for part in item.split("=", 1))
        values = [yaml.safe_load(v) if v.strip() else "" for v in raw.split(",")]
        if key in grid:
            raise ConfigError(f"--grid {item!r}: key {key!r} given twice")
        grid[key] = values
    return grid


def plan(
    base: dict[str, Any],
    grid: dict[str, list[Any]],
    seeds: list[int],
    out_dir: Path,
    source: str,
    overrides: list[str] | None = None,
) -> list[SweepRun]:
    """Every run's validated config; raises ConfigError before anything runs."""
    resolved = load_config_dict(base, source=source, overrides=overrides).model_dump(mode="json")
    keys, runs = list(grid), []
    for values in itertools.product(*(grid[k] for k in keys)):
        cell = dict(zip(keys, values))
        for seed in seeds:
            data = copy.deepcopy(resolved)
            for key, value in cell.items():
                set_value(data, key.split("."), value, what=f"--grid {key}")
            data["seed"] = seed
            config = load_config_dict(data, source=f"{source} (sweep cell {cell})")
            run = SweepRun(cell, seed, config)
            run.config = config.model_copy(update={"out_dir": (Path(out_dir) / "runs" / run.name).resolve()})
            runs.append(run)
    return runs


def run_sweep(
    config_path: str | Path,
    grid_items: list[str],
    seeds: list[int],
    out_dir: str | Path,
    *,
    shard: tuple[int, int] = (0, 1),
    overrides: list[str] | None = None,
    plot_metric: str | None = None,
    log: Callable[[str], None] = print,
    rerun: bool = False,
) -> list[dict[str, Any]]:
    """Run (this shard of) the sweep and write the summaries over every finished run (``rerun``:
    train this shard's runs again, finished ones too)."""
    from .experiment import distill, train_teacher
    from .runs import finished_results

    path = resolve_config_path(config_path)
    base = read_config_file(path)
    grid = parse_grid(grid_items)
    if not grid:
        raise ConfigError("sweep needs at least one --grid KEY=V1,V2")
    out = Path(out_dir)
    runs = plan(base, grid, seeds, out, str(path), overrides)
    index, count = shard
    mine = [r for i, r in enumerate(runs) if i % count == index]
    for i, run in enumerate(mine, 1):
        done = not rerun and finished_results(run.config) is not None
        log(f"[sweep {i}/{len(mine)}] {run.name}" + (" (finished, skipped)" if done else ""))
        if not done:
            (distill if run.config.teacher is not None else train_teacher)(run.config, rerun=rerun)
    rows = collect(runs)
    write_summaries(rows, list(grid), out, plot_metric)
    return rows


def collect(runs: list[SweepRun]) -> list[dict[str, Any]]:
    """One row per run: cell values, seed, status and flattened ``split/metric`` values."""
    from .runs import finished_results

    rows = []
    for run in runs:
        results = finished_results(run.config)
        row: dict[str, Any] = {
            "run": run.name,
            **run.cell,
            "seed": run.seed,
            "status": "done" if results else "missing",
        }
        if results:
            for split, values in results["splits"].items():
                row.update({f"{split}/{k}": v for k, v in flatten_metrics(values).items()})
        rows.append(row)
    return rows


def write_summaries(rows: list[dict[str, Any]], keys: list[str], out: Path, plot_metric: str | None = None) -> None:
    columns = list(dict.fromkeys(c for row in rows for c in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out / "sweep.csv", buffer.getvalue())
    metrics = [c for c in columns if "/" in c and not re.search(r"\.(y\d+_g\d+|shift_\d+)$", c)]
    atomic_write_text(out / "sweep.md", markdown_table(rows, keys, metrics))
    done = [r for r in rows if r["status"] == "done"]
    if plot_metric is not None and done and plot_metric not in metrics:
        raise ConfigError(
            f"--plot-metric {plot_metric!r}: no such SPLIT/METRIC column in {out / 'sweep.csv'} "
            f"(known: {', '.join(metrics)})"
        )
    if done and metrics:
        metric = plot_metric or ("test_ood/accuracy" if "test_ood/accuracy" in metrics else metrics[0])
        plot(done, keys, metric, out / "sweep.png")


def _cells(rows: list[dict[str, Any]], keys: list[str]) -> dict[tuple, list[dict[str, Any]]]:
    cells: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        cells.setdefault(tuple(row[k] for k in keys), []).append(row)
    return cells


def _mean_std(values: list[float]) -> str:
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.4g}"
    return f"{statistics.fmean(values):.4g} ± {statistics.stdev(values):.2g}"


def markdown_table(rows: list[dict[str, Any]], keys: list[str], metrics: list[str]) -> str:
    """Mean ± std over seeds for every cell of the grid (n = finished runs)."""
    head = "| " + " | ".join([*keys, "n", *metrics]) + " |"
    lines = [head, "|" + "---|" * (len(keys) + 1 + len(metrics))]
    for cell, group in _cells(rows, keys).items():
        done = [r for r in group if r["status"] == "done"]
        values = [_mean_std([r[m] for r in done if m in r]) for m in metrics]
        lines.append("| " + " | ".join([*map(str, cell), f"{len(done)}/{len(group)}", *values]) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], keys: list[str], metric: str, path: Path) -> None:
    """``metric`` against the first swept key; one line (mean ± std over seeds) per other-key combination."""
    from matplotlib.figure import Figure

    from .viz import save_figure

    x_key, others = keys[0], keys[1:]
    xs = list(dict.fromkeys(r[x_key] for r in rows))
    numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs)
    position = {x: (x if numeric else i) for i, x in enumerate(xs)}
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for combo, group in _cells(rows, others).items():
        by_x = _cells(group, [x_key])
        points = sorted(
            ((position[x], [r[metric] for r in g if metric in r]) for (x,), g in by_x.items()), key=lambda p: p[0]
        )
        points = [(x, v) for x, v in points if v]
        label = ", ".join(f"{k}={v}" for k, v in zip(others, combo)) or metric
        means = [statistics.fmean(v) for _, v in points]
        stds = [statistics.stdev(v) if len(v) > 1 else 0.0 for _, v in points]
        ax.errorbar([x for x, _ in points], means, yerr=stds, marker="o", capsize=3, label=label)
    if not numeric:
        ax.set_xticks(range(len(xs)), [str(x) for x in xs])
    ax.set_xlabel(x_key)
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
