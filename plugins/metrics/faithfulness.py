"""Faithfulness: does removing what an explanation ranks highest change the model's prediction?

Deletion and insertion (pixel flipping / region perturbation) replace the image's patches one
step at a time, most (or least) relevant first, with a baseline — or, for insertion, start from
the baseline and put the image's patches back — and follow the model's score for the explained
class: a curve and its area. ROAD (remove and debias) removes the top (or bottom) percentages of
pixels, fills them by noisy linear imputation from their neighbours, and counts the predictions
that survive. Everything is batched: the perturbed images of many steps and samples go through
the model together, ``chunk`` images at a time (default: one step of the batch per forward).

Definitions, and how they relate to Quantus' ``PixelFlipping``, ``RegionPerturbation`` and
``ROAD``, are in docs/metrics.md; ``tests/test_faithfulness.py`` checks them against Quantus.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from e2kd import hookimpl
from e2kd.api import EvalBatch

from .imputation import linear_imputation
from .model_runs import ModelRunMetric, ModelRunOptions

Forward = Callable[[torch.Tensor], torch.Tensor]


def pixel_relevance(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, H, W) relevance per pixel: the maps summed over channels, bilinearly resized to ``size``
    when they are at another resolution."""
    relevance = maps.sum(1, keepdim=True)
    if relevance.shape[-2:] != size:
        relevance = F.interpolate(relevance, size=size, mode="bilinear", align_corners=False)
    return relevance[:, 0]


def pixel_ranks(relevance: torch.Tensor, patch_size: int, most_relevant_first: bool) -> tuple[torch.Tensor, int]:
    """Each pixel's patch rank (B, H, W) and the number of patches.

    The image is cut into ``patch_size`` squares on a grid centred on it (where the size is not a
    multiple of the patch, the first and last patches of a row or column are cut short, the last
    by up to one pixel more — Quantus' grid); a patch's relevance is the sum of its pixels'; rank 0
    is the most (or least) relevant patch, ties keep the patches' raster order.
    """
    height, width = relevance.shape[-2:]
    top, left = (-height % patch_size) // 2, (-width % patch_size) // 2
    padded = F.pad(relevance, (left, -width % patch_size - left, top, -height % patch_size - top))
    sums = F.avg_pool2d(padded[:, None], patch_size, divisor_override=1)[:, 0]
    flat = sums.flatten(1)
    order = torch.argsort(flat, dim=1, descending=most_relevant_first, stable=True)
    ranks = torch.empty_like(order).scatter_(1, order, torch.arange(flat.shape[1], device=flat.device).expand_as(order))
    ranks = ranks.view_as(sums).repeat_interleave(patch_size, 1).repeat_interleave(patch_size, 2)
    return ranks[:, top : top + height, left : left + width], flat.shape[1]


def class_scores(logits: torch.Tensor, classes: torch.Tensor, output: str) -> torch.Tensor:
    """The explained class's softmax probability (``output="probability"``) or logit, per row."""
    values = logits.softmax(1) if output == "probability" else logits
    return values.gather(1, classes.view(-1, 1))[:, 0]


def baseline_images(images: torch.Tensor, baseline: float | str) -> torch.Tensor:
    """What replaces removed pixels: a constant, or (``"mean"``) each image's per-channel mean."""
    if baseline == "mean":
        return images.mean(dim=(2, 3), keepdim=True).expand_as(images)
    return torch.full_like(images, float(baseline))


def perturbation_curve(
    forward: Forward,
    images: torch.Tensor,
    relevance: torch.Tensor,
    classes: torch.Tensor,
    *,
    insertion: bool = False,
    most_relevant_first: bool = True,
    patch_size: int = 1,
    patches_per_step: int | None = 1,
    steps: int = 32,
    baseline: float | str = 0.0,
    output: str = "probability",
    chunk: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A deletion (or insertion) curve: (fractions (S + 1,), scores (B, S + 1)).

    Step k = 0..S removes the first ``k * m`` patches in rank order, m = ``patches_per_step`` or,
    when that is None, the patches divided into ``steps`` steps (rounded up)
    (:func:`pixel_ranks`), in every channel, replacing them with ``baseline``; insertion starts from
    the baseline image and puts those patches back instead. ``fractions[k]`` is the share of
    patches removed (inserted); ``scores[:, k]`` the model's score for ``classes`` on that image
    (:func:`class_scores`). Step 0 is the unperturbed (for insertion: the baseline) image. The
    steps go through ``forward`` ``chunk // B`` at a time (default one).
    """
    ranks, n_patches = pixel_ranks(relevance, patch_size, most_relevant_first)
    patches_per_step = patches_per_step or math.ceil(n_patches / steps)
    steps = math.ceil(n_patches / patches_per_step)
    counts = [min(k * patches_per_step, n_patches) for k in range(steps + 1)]
    base = baseline_images(images, baseline)
    start, end = (base, images) if insertion else (images, base)
    per_forward = max(1, (chunk or 0) // images.shape[0])
    scores = []
    for first in range(0, steps + 1, per_forward):
        changed = torch.stack([ranks < n for n in counts[first : first + per_forward]])[:, :, None]
        batch = torch.where(changed, end, start).flatten(0, 1)
        logits = forward(batch).view(changed.shape[0], images.shape[0], -1)
        scores.append(torch.stack([class_scores(step, classes, output) for step in logits], dim=1))
    fractions = torch.tensor(counts, dtype=torch.float64) / n_patches
    return fractions, torch.cat(scores, dim=1)


def area_under(fractions: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Trapezoidal area under ``values`` (..., S + 1) over ``fractions`` (S + 1,) from 0 to 1."""
    return torch.trapezoid(values.double(), fractions.to(values.device), dim=-1)


def _short(order: str) -> str:
    return "MoRF" if order == "most_relevant_first" else "LeRF"


class CurveOptions(ModelRunOptions):
    """Options of the ``deletion`` and ``insertion`` metrics."""

    order: Literal["most_relevant_first", "least_relevant_first"] = Field(
        "most_relevant_first", description="which patches go (or come back) first"
    )
    patch_size: int = Field(8, ge=1, description="side of the square patches removed together, in pixels")
    patches_per_step: int | None = Field(
        None, ge=1, description="patches removed per step (default: the patches divided into `steps` steps)"
    )
    steps: int = Field(32, ge=1, description="steps of the curve when patches_per_step is not given")
    baseline: float | Literal["mean"] = Field(
        0.0, description="value of removed pixels (0: black for [0, 1] images), or 'mean': each image's channel means"
    )
    output: Literal["probability", "logit"] = Field(
        "probability", description="score followed: the explained class's softmax probability, or its logit"
    )

    @model_validator(mode="after")
    def _one_step_size(self) -> CurveOptions:
        if self.patches_per_step is not None and "steps" in self.model_fields_set:
            raise ValueError("give either patches_per_step or steps, not both")
        return self


class _PerturbationCurve(ModelRunMetric):
    """Mean curve and its area over the evaluated samples; ``insertion`` tells the two apart."""

    Options = CurveOptions
    category = "faithfulness"
    insertion = False

    @property
    def higher_is_better(self) -> bool:  # type: ignore[override]
        """Deletion of the most relevant patches should drop the score fast (a low area), insertion
        raise it fast; least relevant first reverses both."""
        return self.insertion == (self.options.order == "most_relevant_first")

    @classmethod
    def capabilities(cls) -> dict[str, Any]:
        return {**super().capabilities(), "higher_is_better": "as its order"}

    def detail(self) -> str:
        """The order (MoRF / LeRF) and the patch size."""
        return f"{_short(self.options.order)}, {self.options.patch_size} px patches"

    def curve_labels(self) -> tuple[str, str]:
        verb = "inserted" if self.insertion else "removed"
        return f"share of patches {verb}", f"{self.options.output} of the explained class"

    def reset(self) -> None:
        self._sums: list[float] = []
        self._fractions: list[float] = []
        self._count = 0

    def update(self, batch: EvalBatch) -> None:
        images = batch.images
        classes, maps = self.explained(batch)
        relevance = pixel_relevance(maps, images.shape[-2:])  # type: ignore[union-attr]
        o = self.options
        fractions, scores = perturbation_curve(
            batch.forward,  # type: ignore[arg-type]
            images,  # type: ignore[arg-type]
            relevance,
            classes,
            insertion=self.insertion,
            most_relevant_first=o.order == "most_relevant_first",
            patch_size=o.patch_size,
            patches_per_step=o.patches_per_step,
            steps=o.steps,
            baseline=o.baseline,
            output=o.output,
            chunk=o.chunk,
        )
        sums = scores.double().sum(0).tolist()
        self._sums = [a + b for a, b in zip(self._sums, sums)] if self._sums else sums
        self._fractions = fractions.tolist()
        self._count += scores.shape[0]

    def merge(self, state: dict[str, Any]) -> None:
        if not state["_count"]:  # (a process that saw no sample: nothing to add)
            return
        self._sums = [a + b for a, b in zip(self._sums, state["_sums"])] if self._sums else list(state["_sums"])
        self._fractions = self._fractions or list(state["_fractions"])
        self._count += state["_count"]

    def compute(self) -> dict[str, Any]:
        if not self._count:
            return {}
        curve = torch.tensor(self._sums, dtype=torch.float64) / self._count
        return {
            "auc": float(area_under(torch.tensor(self._fractions, dtype=torch.float64), curve)),
            "curve": {f"{f:.6g}": float(v) for f, v in zip(self._fractions, curve)},
        }


class Deletion(_PerturbationCurve):
    """Deletion curve (pixel flipping / region perturbation) and its area."""

    name = "deletion"
    description = (
        "score of the explained class as the most (least) relevant patches are replaced by a baseline: "
        "curve and area (most relevant first: lower is better)"
    )


class Insertion(_PerturbationCurve):
    """Insertion curve (from the baseline image, patches put back) and its area."""

    name = "insertion"
    description = (
        "score of the explained class as the most (least) relevant patches are put back into a baseline "
        "image: curve and area (most relevant first: higher is better)"
    )
    insertion = True


class RoadOptions(ModelRunOptions):
    """Options of the ``road`` metric."""

    percentages: list[float] = Field(
        default_factory=lambda: [10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0],
        description="shares of the pixels removed, in percent (each in [0, 100))",
    )
    order: Literal["most_relevant_first", "least_relevant_first"] = Field(
        "most_relevant_first", description="remove the most (MoRF) or least (LeRF) relevant pixels"
    )
    noise: float = Field(0.01, ge=0, description="std of the Gaussian noise added to each imputed value")
    seed: int = Field(0, description="seed of the noise")
    tolerance: float = Field(1e-6, gt=0, description="relative residual at which the imputation's solver stops")

    @model_validator(mode="after")
    def _percentages_in_range(self) -> RoadOptions:
        if not self.percentages or any(not 0 <= p < 100 for p in self.percentages):
            raise ValueError("percentages: give at least one share of pixels in [0, 100)")
        return self


#: Most pixel values (images x channels x H x W) imputed in one solve: bounds its memory (float64,
#: about ten arrays of this size: ~1.3 GB), while many images per solve keep the solver's steps few.
IMPUTATION_BUDGET = 2**24


def road_predictions(
    forward: Forward,
    images: torch.Tensor,
    relevance: torch.Tensor,
    classes: torch.Tensor,
    percentages: list[float],
    *,
    most_relevant_first: bool = True,
    noise: float = 0.01,
    generator: torch.Generator | None = None,
    tolerance: float = 1e-6,
    chunk: int | None = None,
) -> torch.Tensor:
    """(B, P) True where the model still predicts ``classes`` after removing ``int(H * W * p / 100)``
    pixels (most or least relevant first, in every channel) and imputing them
    (:func:`linear_imputation`, plus Gaussian noise of std ``noise`` on each imputed value).

    The images of several percentages are imputed in one solve (up to :data:`IMPUTATION_BUDGET`
    pixel values) and go through ``forward`` ``chunk`` images at a time (default: the batch).
    """
    ranks, n_pixels = pixel_ranks(relevance, 1, most_relevant_first)
    counts = [int(n_pixels * p / 100) for p in percentages]
    batch_size = images.shape[0]
    per_solve = max(1, IMPUTATION_BUDGET // images[0].numel() // batch_size)
    per_forward = max(batch_size, chunk or batch_size)
    predicted = []
    for first in range(0, len(counts), per_solve):
        removed = torch.stack([ranks < n for n in counts[first : first + per_solve]])[:, :, None].flatten(0, 1)
        filled = linear_imputation(images.repeat(removed.shape[0] // batch_size, 1, 1, 1), removed, tolerance=tolerance)
        if noise:
            draws = torch.randn(filled.shape, generator=generator, device=filled.device, dtype=filled.dtype)
            filled = torch.where(removed, filled + noise * draws, filled)
        predicted += [forward(part).argmax(1) for part in filled.split(per_forward)]
    return (torch.cat(predicted).view(len(counts), batch_size) == classes).T


class Road(ModelRunMetric):
    """ROAD: accuracy of the explained class after removing and imputing a share of the pixels."""

    name = "road"
    description = (
        "remove and debias: share of samples still predicted as the explained class after the most (least) "
        "relevant pixels are filled by noisy linear imputation, per percentage (MoRF: lower is better)"
    )
    Options = RoadOptions
    category = "faithfulness"

    @property
    def higher_is_better(self) -> bool:  # type: ignore[override]
        """Removing the most relevant pixels should destroy the prediction (lower is better); the
        least relevant, keep it."""
        return self.options.order == "least_relevant_first"

    @classmethod
    def capabilities(cls) -> dict[str, Any]:
        return {**super().capabilities(), "higher_is_better": "as its order"}

    def detail(self) -> str:
        """The order (MoRF / LeRF)."""
        return _short(self.options.order)

    def curve_labels(self) -> tuple[str, str]:
        return "% of pixels removed and imputed", "share still predicted as the explained class"

    def reset(self) -> None:
        self._hits = [0.0] * len(self.options.percentages)
        self._count = 0
        self._generator: torch.Generator | None = None

    def state(self) -> dict[str, Any]:
        return {"_hits": self._hits, "_count": self._count}

    def update(self, batch: EvalBatch) -> None:
        images = batch.images
        if self._generator is None or self._generator.device != images.device:  # type: ignore[union-attr]
            self._generator = torch.Generator(images.device).manual_seed(self.options.seed)  # type: ignore[union-attr]
        classes, maps = self.explained(batch)
        o = self.options
        kept = road_predictions(
            batch.forward,  # type: ignore[arg-type]
            images,  # type: ignore[arg-type]
            pixel_relevance(maps, images.shape[-2:]),  # type: ignore[union-attr]
            classes,
            o.percentages,
            most_relevant_first=o.order == "most_relevant_first",
            noise=o.noise,
            generator=self._generator,
            tolerance=o.tolerance,
            chunk=o.chunk,
        )
        self._hits = [a + b for a, b in zip(self._hits, kept.double().sum(0).tolist())]
        self._count += kept.shape[0]

    def compute(self) -> dict[str, Any]:
        if not self._count:
            return {}
        curve = [h / self._count for h in self._hits]
        return {
            "mean": sum(curve) / len(curve),
            "curve": {f"{p:g}": v for p, v in zip(self.options.percentages, curve)},
        }


@hookimpl
def register_metrics(register) -> None:
    register(Deletion)
    register(Insertion)
    register(Road)
