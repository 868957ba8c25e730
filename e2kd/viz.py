"""Figures: explanations of several models on the same images."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import torch
from matplotlib.figure import Figure  # the OO API: no global pyplot state, works under any backend

from .storage import atomic_write_bytes


def _to_image(x: torch.Tensor):
    x = x.detach().float().cpu()
    if x.shape[0] != 3:
        x = x[:1].expand(3, -1, -1)
    lo, hi = x.min(), x.max()
    return ((x - lo) / (hi - lo + 1e-12)).permute(1, 2, 0).numpy()


def _to_heat(m: torch.Tensor):
    m = m.detach().float().cpu().sum(0)
    return (m / (m.abs().max() + 1e-12)).numpy()


def plot_explanations(
    images: torch.Tensor,
    maps: dict[str, torch.Tensor],
    path: str | Path | None = None,
    *,
    labels: torch.Tensor | None = None,
    predictions: dict[str, torch.Tensor] | None = None,
    class_names: Sequence[str] | None = None,
    title: str | None = None,
) -> Path:
    """Grid: one row per image; columns = the input, then each model's map over the image.

    Writes a PNG to ``path`` and returns the path, or returns the Figure when ``path`` is None.

    ``maps[name]`` is (N, C, H, W); channels are summed for display and each map is scaled
    by its own maximum. ``predictions[name]`` (N,) adds the predicted class under each map.
    """
    n = images.shape[0]
    cols = 1 + len(maps)
    fig = Figure(figsize=(1.9 * cols, 1.9 * n))
    axes = fig.subplots(n, cols, squeeze=False)
    name_of = (lambda c: class_names[int(c)]) if class_names else (lambda c: str(int(c)))

    def present(label: torch.Tensor) -> list[int]:  # a class index, or the classes of a multi-hot vector
        return [int(label)] if label.dim() == 0 else torch.nonzero(label > 0.5).flatten().tolist()

    for i in range(n):
        ax = axes[i, 0]
        ax.imshow(_to_image(images[i]))
        if labels is not None:
            ax.set_ylabel(", ".join(name_of(c) for c in present(labels[i])[:3]), fontsize=9)
        for j, (name, batch) in enumerate(maps.items(), start=1):
            ax = axes[i, j]
            ax.imshow(_to_image(images[i]), alpha=0.55)
            ax.imshow(_to_heat(batch[i]), cmap="inferno", alpha=0.6, vmin=0, vmax=1)
            if predictions is not None and name in predictions:
                pred = predictions[name][i]
                ok = labels is None or int(pred) in present(labels[i])
                ax.set_xlabel(("" if ok else "✗ ") + name_of(pred), fontsize=8, color="black" if ok else "red")
        for j in range(cols):
            axes[i, j].set_xticks([])
            axes[i, j].set_yticks([])
    for j, name in enumerate(["input", *maps], start=0):
        axes[0, j].set_title(name, fontsize=10)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, Path(path)) if path is not None else fig


def plot_curves(
    curves: dict[str, tuple[Sequence[float], Sequence[float]]],
    path: str | Path,
    *,
    xlabel: str = "",
    ylabel: str = "",
    title: str | None = None,
) -> Path:
    """One line per name: ``curves[name] = (xs, ys)``."""
    return plot_panels([{"curves": curves, "xlabel": xlabel, "ylabel": ylabel, "title": title}], path)


def plot_panels(panels: Sequence[dict], path: str | Path) -> Path:
    """Side by side, one axes per panel, each a dict: ``curves`` (``{name: (xs, ys)}``, one line per
    name, the same colour for a name in every panel), ``xlabel``, ``ylabel``, ``title``, and
    ``xticks`` — names for the positions 0, 1, ... of a categorical x axis (e.g. layers)."""
    fig = Figure(figsize=(5.5 * len(panels), 3.8 + (0.8 if any(p.get("xticks") for p in panels) else 0)))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    names = list(dict.fromkeys(name for p in panels for name in p["curves"]))
    for ax, panel in zip(axes, panels):
        for name, (xs, ys) in panel["curves"].items():
            ax.plot(xs, ys, marker="o", markersize=3, label=name, color=f"C{names.index(name) % 10}")
        if panel.get("xticks"):
            ax.set_xticks(range(len(panel["xticks"])), panel["xticks"], rotation=60, ha="right", fontsize=7)
        ax.set_xlabel(panel.get("xlabel", ""))
        ax.set_ylabel(panel.get("ylabel", ""))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        if panel.get("title"):
            ax.set_title(panel["title"], fontsize=10)
    fig.tight_layout()
    return save_figure(fig, Path(path))


def plot_paired(
    rows: Sequence[tuple[str, Sequence[float], bool]], path: str | Path, *, xlabel: str = "", title: str | None = None
) -> Path:
    """One line per row ``(label, differences, holds)``: each difference as a dot, their mean as a
    bar (green where the row's verdict holds), and the zero line."""
    fig = Figure(figsize=(7.5, 0.45 * len(rows) + 1.4))
    ax = fig.subplots()
    for i, (_label, diffs, holds) in enumerate(reversed(list(rows))):
        mean = sum(diffs) / len(diffs)
        ax.barh(i, mean, color="tab:green" if holds else "tab:gray", alpha=0.5, height=0.6)
        ax.plot(list(diffs), [i] * len(diffs), "o", color="black", markersize=3.5)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(rows)), [label for label, _, _ in reversed(list(rows))], fontsize=7.5)
    ax.set_xlabel(xlabel)
    ax.grid(axis="x", alpha=0.3)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, Path(path))


def save_figure(fig: Figure, path: Path) -> Path:
    """Write a matplotlib figure as PNG, atomically."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    atomic_write_bytes(path, buffer.getvalue())
    return path
