"""Attention transfer (Zagoruyko & Komodakis, 2017) as an e2kd explainer and similarity; LayerCAM, a
gradient-based explainer; a CSV image-list dataset."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from pydantic import Field

from e2kd import hookimpl
from e2kd.api import Capture, Explainer, PluginOptions, Similarity, recorded
from e2kd.models import resolve_layer

from .csv_images import CsvImages
from .layercam import LayerCAM


class AttentionMapOptions(PluginOptions):
    layer: str | None = Field(None, description="module name; default: the model's last feature stage")
    p: float = Field(2.0, gt=0, description="exponent of |A|")


class _AttentionCapture(Capture):
    def __init__(self, inputs, p):
        super().__init__(inputs)
        self.p = p
        self.outputs = []

    def explain(self, logits, target, *, create_graph=False):
        amap = self.outputs[-1].abs().pow(self.p).mean(dim=1, keepdim=True)
        amap = F.interpolate(amap, size=self.inputs.shape[-2:], mode="bilinear", align_corners=False)
        return amap if create_graph else amap.detach()


class AttentionMap(Explainer):
    name = "attention_map"
    description = "class-agnostic attention map mean_k |A_k|^p of a layer (Zagoruyko & Komodakis)"
    Options = AttentionMapOptions
    needs_layer = True

    def check_model(self, model):
        resolve_layer(model, self.options.layer, who=self.name)

    @contextlib.contextmanager
    def capture(self, model, inputs, *, trainable=True):
        layer = resolve_layer(model, self.options.layer, who=self.name)
        cap = _AttentionCapture(inputs, self.options.p)
        with recorded(layer) as outputs:  # the hook is removed on leaving, also after an error
            cap.outputs = outputs
            yield cap


class NegL2(Similarity):
    name = "neg_l2"
    description = "minus the L2 distance of L2-normalised flattened maps"
    differentiable = True
    higher_is_better = True

    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        a = F.normalize(a.flatten(1), dim=1)
        b = F.normalize(b.flatten(1), dim=1)
        return -(a - b).norm(dim=1)


@hookimpl
def register_explainers(register):
    register(AttentionMap)
    register(LayerCAM)


@hookimpl
def register_similarities(register):
    register(NegL2)


@hookimpl
def register_datasets(register):
    register(CsvImages)
