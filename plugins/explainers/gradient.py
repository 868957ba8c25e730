"""Input-gradient explainers: plain gradient (saliency) and Input x Gradient.

The input is made to require grad inside ``capture`` (on a detached copy, so the caller's
tensor is untouched); the map is d z_c / d x (times x), taken from the training forward. With
``create_graph=True`` it is differentiable w.r.t. the parameters (a full double backward).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from pydantic import Field
from torch import nn

from e2kd import hookimpl
from e2kd.api import Capture, Explainer, PluginOptions, class_gradient
from e2kd.models import unfused_attention


class InputGradientOptions(PluginOptions):
    """Options of the ``gradient`` and ``input_x_gradient`` explainers."""

    absolute: bool = Field(False, description="return the absolute value (classic saliency) instead of the signed map")


class _InputGradientCapture(Capture):
    def __init__(self, inputs: torch.Tensor, times_input: bool, absolute: bool) -> None:
        super().__init__(inputs)
        self.times_input, self.absolute = times_input, absolute

    def explain(self, logits: torch.Tensor, target: torch.Tensor, *, create_graph: bool = False) -> torch.Tensor:
        grad = class_gradient(logits, target, self.inputs, create_graph=create_graph)
        out = grad * self.inputs if self.times_input else grad
        out = out.abs() if self.absolute else out
        return out if create_graph else out.detach()


@contextlib.contextmanager
def _input_capture(model: nn.Module, inputs: torch.Tensor, times_input: bool, absolute: bool) -> Iterator[Capture]:
    with torch.enable_grad(), unfused_attention(model):
        yield _InputGradientCapture(inputs.detach().requires_grad_(True), times_input, absolute)


class Gradient(Explainer):
    """The input gradient d z_c / d x (saliency), signed or absolute."""

    name = "gradient"
    description = "input gradient d z_c / d x (saliency; option absolute)"
    Options = InputGradientOptions
    output_channels = None

    def capture(self, model: nn.Module, inputs: torch.Tensor, *, trainable: bool = True):
        return _input_capture(model, inputs, False, self.options.absolute)


class InputXGradient(Explainer):
    """Input times its gradient, x * d z_c / d x."""

    name = "input_x_gradient"
    description = "Input x Gradient: x * d z_c / d x"
    Options = InputGradientOptions
    output_channels = None

    def capture(self, model: nn.Module, inputs: torch.Tensor, *, trainable: bool = True):
        return _input_capture(model, inputs, True, self.options.absolute)


@hookimpl
def register_explainers(register) -> None:
    register(Gradient)
    register(InputXGradient)
