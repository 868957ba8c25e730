"""A gradient-based explainer: LayerCAM (Jiang et al., 2021), taken from the training forward.

    map = ReLU( sum_k ReLU(d z_c / d A_k) * A_k ),  bilinearly upsampled to the input size

What a gradient-based explainer must do (the capture contract; docs/plugins.md walks through it):

1. ``capture(model, inputs, trainable)`` installs a hook, yields, and removes the hook in
   ``finally`` — the caller runs the one forward in between.
2. ``trainable=False`` (a frozen teacher): its parameters do not require grad, so nothing in the
   forward does; the hook makes the captured activation a leaf that does, and returns it so the
   rest of the forward builds on it.
3. ``explain(logits, target, create_graph)`` is called once per explained class on one capture
   (top-k, all classes, multi-label): take the gradient with ``retain_graph=True``.
4. ``create_graph=True`` (the student) keeps the map in the graph so the e2KD loss trains through it.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from e2kd.api import Capture, Explainer
from e2kd.models import resolve_layer


class LayerCAMOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    layer: str | None = Field(None, description="module name; default: the model's last feature stage")


class _LayerCAMCapture(Capture):
    activations: torch.Tensor | None = None

    def explain(self, logits, target, *, create_graph=False):
        if self.activations is None:
            raise RuntimeError("layercam: the layer was not run; call the model inside capture()")
        score = logits.gather(1, target.view(-1, 1).to(logits.device)).sum()
        (grads,) = torch.autograd.grad(score, self.activations, create_graph=create_graph, retain_graph=True)
        cam = F.relu((F.relu(grads) * self.activations).sum(dim=1, keepdim=True))
        cam = F.interpolate(cam, size=self.inputs.shape[-2:], mode="bilinear", align_corners=False)
        return cam if create_graph else cam.detach()


class LayerCAM(Explainer):
    name = "layercam"
    description = "LayerCAM: positive-gradient-weighted activations of a layer (default: last stage)"
    Options = LayerCAMOptions
    needs_layer = True

    def check_model(self, model):
        resolve_layer(model, self.options.layer, who=self.name)

    @contextlib.contextmanager
    def capture(self, model, inputs, *, trainable=True):
        layer = resolve_layer(model, self.options.layer, who=self.name)
        cap = _LayerCAMCapture(inputs)

        def hook(module, args, output):
            if not trainable:  # frozen teacher: a leaf that requires grad, used by the rest of the forward
                output = output.detach().requires_grad_(True)
            cap.activations = output
            return output

        handle = layer.register_forward_hook(hook)
        try:
            yield cap
        finally:
            handle.remove()
