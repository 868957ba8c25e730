"""Integrated Gradients (Sundararajan et al., 2017) through captum, with a trainable mode.

For a frozen model the attribution is captum's ``IntegratedGradients`` (batched with
``internal_batch_size``). captum takes its gradients without ``create_graph``, so its map
cannot train a student; with ``create_graph=True`` this explainer evaluates the same rule
itself — captum's step positions and weights, all steps in one batch — keeping the graph.
IG needs ``n_steps`` extra forwards of the model per explanation (declared as
``extra_forwards``); BatchNorm running statistics are not updated by them, so the training
forward is still the only one that updates them (the extra forwards use batch statistics).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Literal

import torch
from captum.attr import IntegratedGradients as CaptumIG
from captum.attr._utils.approximation_methods import approximation_parameters
from pydantic import Field
from torch import nn

from e2kd import hookimpl
from e2kd.api import Capture, Explainer, PluginOptions, target_score
from e2kd.models import unfused_attention


class IGOptions(PluginOptions):
    """Options of the ``integrated_gradients`` explainer."""

    n_steps: int = Field(16, ge=1, description="integration steps (extra forwards per explanation)")
    method: Literal["riemann_trapezoid", "riemann_left", "riemann_right", "riemann_middle", "gausslegendre"] = Field(
        "gausslegendre", description="captum's approximation method"
    )
    baseline: Literal["zeros", "mean", "blur"] | float = Field(
        "zeros", description="zeros, a constant value, the per-image channel mean, or a blurred image"
    )
    internal_batch_size: int | None = Field(None, ge=1, description="captum's chunking of the steps (frozen path)")


@contextlib.contextmanager
def _keep_running_stats(model: nn.Module) -> Iterator[None]:
    """Extra training-mode forwards use batch statistics but do not update the running ones."""
    norms = [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats
    ]
    for m in norms:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in norms:
            m.track_running_stats = True


class _IGCapture(Capture):
    def __init__(self, model: nn.Module, inputs: torch.Tensor, options: IGOptions) -> None:
        super().__init__(inputs)
        self.model, self.options = model, options

    def baselines(self) -> torch.Tensor:
        x, b = self.inputs.detach(), self.options.baseline
        if b == "zeros":
            return torch.zeros_like(x)
        if b == "mean":
            return x.mean(dim=(2, 3), keepdim=True).expand_as(x).contiguous()
        if b == "blur":
            k = max(3, (min(x.shape[-2:]) // 4) | 1)
            return nn.functional.avg_pool2d(x, k, stride=1, padding=k // 2, count_include_pad=False)
        return torch.full_like(x, float(b))

    def explain(self, logits: torch.Tensor, target: torch.Tensor, *, create_graph: bool = False) -> torch.Tensor:
        o, x, base = self.options, self.inputs, self.baselines()
        target = target.to(x.device)
        if not create_graph:
            ig = CaptumIG(self.model)
            with torch.enable_grad():
                return ig.attribute(
                    x.detach(),
                    baselines=base,
                    target=target,
                    n_steps=o.n_steps,
                    method=o.method,
                    internal_batch_size=o.internal_batch_size,
                ).detach()
        step_sizes, alphas = approximation_parameters(o.method)
        weights, alphas = step_sizes(o.n_steps), alphas(o.n_steps)
        delta = x - base
        scaled = torch.cat([base + a * delta for a in alphas]).requires_grad_(True)  # (n_steps * B, ...)
        with torch.enable_grad(), _keep_running_stats(self.model):
            out = self.model(scaled)
        (grads,) = torch.autograd.grad(target_score(out, target.repeat(o.n_steps)), scaled, create_graph=True)
        grads = grads.view(o.n_steps, *x.shape)
        total = sum(w * g for w, g in zip(weights, grads))
        return delta * total


class IntegratedGradients(Explainer):
    """Integrated Gradients through captum, keeping the graph for the student when training."""

    name = "integrated_gradients"
    description = "Integrated Gradients via captum; trainable (graph-keeping) mode for the student"
    Options = IGOptions
    output_channels = None
    extra_forwards = "n_steps"

    @contextlib.contextmanager
    def capture(self, model: nn.Module, inputs: torch.Tensor, *, trainable: bool = True) -> Iterator[Capture]:
        with unfused_attention(model):
            yield _IGCapture(model, inputs, self.options)


@hookimpl
def register_explainers(register) -> None:
    register(IntegratedGradients)
