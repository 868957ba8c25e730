"""A gradient-based explainer: LayerCAM (Jiang et al., 2021), taken from the training forward.

    map = ReLU( sum_k ReLU(d z_c / d A_k) * A_k ),  bilinearly upsampled to the input size

What a gradient-based explainer must do (the capture contract; docs/plugins.md walks through it):

1. ``capture(model, inputs, trainable)`` installs a hook, yields, and removes the hook in
   ``finally`` — the caller runs the one forward in between (``e2kd.api.recorded`` does this).
2. ``trainable=False`` (a frozen teacher): its parameters do not require grad, so nothing in the
   forward does; the captured activation becomes a leaf that does, and the rest of the forward
   builds on it (``recorded(layer, leaf=True)``).
3. ``explain(logits, target, create_graph)`` is called once per explained class on one capture
   (top-k, all classes, multi-label): keep the graph (``e2kd.api.class_gradient`` does).
4. ``create_graph=True`` (the student) keeps the map in the graph so the e2KD loss trains through it.
"""

from __future__ import annotations

import contextlib

import torch.nn.functional as F
from pydantic import Field

from e2kd.api import Capture, Explainer, PluginOptions, class_gradient, recorded
from e2kd.models import resolve_layer


class LayerCAMOptions(PluginOptions):
    layer: str | None = Field(None, description="module name; default: the model's last feature stage")


class _LayerCAMCapture(Capture):
    outputs: tuple = ()  # the layer's outputs, set by capture()

    def explain(self, logits, target, *, create_graph=False):
        if not self.outputs:
            raise RuntimeError("layercam: the layer was not run; call the model inside capture()")
        acts = self.outputs[-1]
        grads = class_gradient(logits, target, acts, create_graph=create_graph)  # keeps the graph for other classes
        cam = F.relu((F.relu(grads) * acts).sum(dim=1, keepdim=True))
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
        # frozen teacher: the layer's output becomes a leaf that requires grad, used by the rest of the forward
        with recorded(layer, leaf=not trainable) as outputs:
            cap.outputs = outputs
            yield cap
