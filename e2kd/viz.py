"""Figures: explanations of several models on the same images."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from .runs import atomic_write_bytes  # noqa: E402


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
    path: str | Path,
    *,
    labels: torch.Tensor | None = None,
    predictions: dict[str, torch.Tensor] | None = None,
    class_names: Sequence[str] | None = None,
    title: str | None = None,
) -> Path:
    """Grid: one row per image; columns = the input, then each model's map over the image.

    ``maps[name]`` is (N, C, H, W); channels are summed for display and each map is scaled
    by its own maximum. ``predictions[name]`` (N,) adds the predicted class under each map.
    """
    n = images.shape[0]
    cols = 1 + len(maps)
    fig, axes = plt.subplots(n, cols, figsize=(1.9 * cols, 1.9 * n), squeeze=False)
    name_of = (lambda c: class_names[int(c)]) if class_names else (lambda c: str(int(c)))
    for i in range(n):
        ax = axes[i, 0]
        ax.imshow(_to_image(images[i]))
        if labels is not None:
            ax.set_ylabel(name_of(labels[i]), fontsize=9)
        for j, (name, batch) in enumerate(maps.items(), start=1):
            ax = axes[i, j]
            ax.imshow(_to_image(images[i]), alpha=0.55)
            ax.imshow(_to_heat(batch[i]), cmap="inferno", alpha=0.6, vmin=0, vmax=1)
            if predictions is not None and name in predictions:
                pred = predictions[name][i]
                ok = labels is None or int(pred) == int(labels[i])
                ax.set_xlabel(("" if ok else "✗ ") + name_of(pred), fontsize=8, color="black" if ok else "red")
        for j in range(cols):
            axes[i, j].set_xticks([])
            axes[i, j].set_yticks([])
    for j, name in enumerate(["input", *maps], start=0):
        axes[0, j].set_title(name, fontsize=10)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, tmp.read_bytes())
    tmp.unlink()
    return path
