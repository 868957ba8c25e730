"""The B-cos explanation: the dynamic linear weights W(x), shape (B, 6, H, W).

W(x) is the gradient of the logit w.r.t. the encoded 6-channel input, taken inside
:func:`explanation_mode` so the dynamic factors count as constants; then
``logit - bias = sum(W(x) * x6)``. Option ``contribution`` returns sum_c W(x) * x6 (B, 1, H, W)
for display and localisation metrics.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from pydantic import Field
from torch import nn

from e2kd import hookimpl
from e2kd.api import Capture, Explainer, PluginOptions, class_gradient, recorded
from e2kd.errors import ModelError
from e2kd.models import find_modules

from .layers import AddInverse, explanation_mode


class BcosOptions(PluginOptions):
    """Options of the ``bcos`` explainer."""

    contribution: bool = Field(False, description="return the contribution map sum_c W(x) * x (B, 1, H, W)")


def _encoder(model: nn.Module) -> AddInverse:
    found = find_modules(model, "bcos_encoder", lambda m: isinstance(m, AddInverse))
    if not getattr(model, "bcos", False) or len(found) != 1:
        raise ModelError(
            f"bcos: {type(model).__name__} is not a B-cos network (needs bcos = True and one AddInverse input "
            f"encoding); use a bcos_* model or another explainer"
        )
    return found[0]


class _BcosCapture(Capture):
    def __init__(self, inputs: torch.Tensor, contribution: bool) -> None:
        super().__init__(inputs)
        self.contribution = contribution
        self.outputs: list[torch.Tensor] = []  # the encoded input, filled by the forward

    @property
    def encoded(self) -> torch.Tensor | None:
        """The encoded input [x, 1 - x] of the captured forward, the map's reference."""
        return self.outputs[-1] if self.outputs else None

    def explain(self, logits: torch.Tensor, target: torch.Tensor, *, create_graph: bool = False) -> torch.Tensor:
        if self.encoded is None:
            raise RuntimeError("bcos: the model was not run inside capture()")
        with explanation_mode():
            weights = class_gradient(logits, target, self.encoded, create_graph=create_graph)
        return (weights * self.encoded).sum(1, keepdim=True) if self.contribution else weights


class Bcos(Explainer):
    """The dynamic linear weights W(x) of a B-cos network for a class, exact and differentiable."""

    name = "bcos"
    description = "B-cos dynamic linear weights W(x) (6 x H x W), exact e2KD gradients; option contribution"
    Options = BcosOptions
    output_channels = 6

    def map_channels(self, input_channels: int) -> int:
        return 1 if self.options.contribution else self.output_channels

    def check_model(self, model: nn.Module) -> None:
        _encoder(model)

    @contextlib.contextmanager
    def capture(self, model: nn.Module, inputs: torch.Tensor, *, trainable: bool = True) -> Iterator[Capture]:
        encoder = _encoder(model)
        cap = _BcosCapture(inputs, self.options.contribution)

        # images need no grad: the encoded input becomes a leaf that does (unless it already has a graph)
        with recorded(encoder, leaf=lambda out: not out.requires_grad) as outputs, torch.enable_grad():
            cap.outputs = outputs
            yield cap


@hookimpl
def register_explainers(register) -> None:
    register(Bcos)
