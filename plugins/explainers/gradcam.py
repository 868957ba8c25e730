"""Grad-CAM (Selvaraju et al., 2017), taken from the training forward.

CAM = ReLU(sum_k alpha_k A_k), alpha_k = spatial mean of d z_c / d A_k, bilinearly
upsampled to the input size (the paper upsamples before the cosine, no normalisation).

Vision transformers (timm ``VisionTransformer``): a layer that outputs tokens (B, N, D) is read
as a feature map by dropping the prefix (class/register) tokens and reshaping the patch tokens
to the patch grid. The default layer is then the output of the second-to-last block: after the
last block's token mixing only the class token reaches the head, so a later map would be zero.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from e2kd import hookimpl
from e2kd.api import Capture, Explainer, PluginOptions, class_gradient, recorded
from e2kd.errors import ModelError
from e2kd.models import default_layer_name, resolve_layer


class GradCAMOptions(PluginOptions):
    """Options of the ``gradcam`` explainer."""

    layer: str | None = Field(None, description="module name of the feature map; default: the last feature stage")
    relu: bool = Field(True, description="apply ReLU to the map (the paper's positive Grad-CAM)")
    upsample: bool = Field(True, description="bilinearly upsample the map to the input size")
    closed_form: bool = Field(
        False,
        description="CAM = W_c · A / (h w) from the classifier weights, no autograd.grad: "
        "the same value and gradient for a global-average-pool + linear head "
        "right after the layer (timm CNNs at their last stage); refused otherwise",
    )


class _GradCAMCapture(Capture):
    def __init__(
        self,
        inputs: torch.Tensor,
        options: GradCAMOptions,
        layer_name: str,
        token_grid: tuple[int, tuple[int, int]] | None,
    ) -> None:
        super().__init__(inputs)
        self.options = options
        self.layer_name = layer_name
        self.token_grid = token_grid  # (prefix tokens, (h, w)) for transformer tokens
        self.outputs: list[torch.Tensor] = []  # the layer's outputs, filled by the forward
        self.classifier_weight: torch.Tensor | None = None  # set for the closed form

    @property
    def activations(self) -> torch.Tensor | None:
        """The layer's output in the captured forward."""
        return self.outputs[-1] if self.outputs else None

    def _as_map(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.dim() == 4:
            return tokens
        prefix, (h, w) = self.token_grid
        return tokens[:, prefix:, :].transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], h, w)

    def explain(
        self, logits: torch.Tensor, target: torch.Tensor, *, create_graph: bool = False, upsample: bool = True
    ) -> torch.Tensor:
        acts = self.activations
        if acts is None:
            raise RuntimeError(f"gradcam: layer {self.layer_name!r} was not run; call the model inside capture()")
        target = target.view(-1).to(logits.device)
        if self.classifier_weight is not None:
            # d z_c / d A_k = W_ck / (h w) at every position: alpha_k = W_ck / (h w) exactly
            weights = self.classifier_weight[target].to(acts.dtype)[:, :, None, None] / (acts.shape[2] * acts.shape[3])
        else:
            grads = class_gradient(logits, target, acts, create_graph=create_graph)
            grads, acts = self._as_map(grads), self._as_map(acts)
            weights = grads.mean(dim=(2, 3), keepdim=True)
        cam = (weights * acts).sum(dim=1, keepdim=True)
        if self.options.relu:
            cam = F.relu(cam)
        if self.options.upsample and upsample:
            cam = F.interpolate(cam, size=self.inputs.shape[-2:], mode="bilinear", align_corners=False)
        return cam if create_graph else cam.detach()


def _token_grid(model: nn.Module) -> tuple[int, tuple[int, int]] | None:
    """(number of prefix tokens, patch grid) of a timm vision transformer, else None."""
    embed = getattr(model, "patch_embed", None)
    if embed is None or not hasattr(model, "blocks") or not hasattr(embed, "grid_size"):
        return None
    return int(getattr(model, "num_prefix_tokens", 1)), tuple(embed.grid_size)


class GradCAM(Explainer):
    """Grad-CAM of a feature layer, built from the training forward (no second forward)."""

    name = "gradcam"
    description = "Grad-CAM of a feature layer (default: last stage), from the training forward"
    Options = GradCAMOptions
    needs_layer = True
    output_channels = 1

    def _layer_name(self, model: nn.Module) -> str | None:
        if self.options.layer is None and _token_grid(model) is not None:
            return f"blocks.{len(model.blocks) - 2}"  # before the last token mixing
        return self.options.layer

    def check_model(self, model: nn.Module) -> None:
        resolve_layer(model, self._layer_name(model), who="gradcam")
        if self.options.closed_form:
            _linear_head(model, self._layer_name(model))

    def upsamples_bilinearly(self) -> bool:
        return self.options.upsample

    def at_input_resolution(self) -> bool:
        return self.options.upsample

    @contextlib.contextmanager
    def capture(self, model: nn.Module, inputs: torch.Tensor, *, trainable: bool = True) -> Iterator[Capture]:
        name = self._layer_name(model) or default_layer_name(model, who="gradcam")
        layer = resolve_layer(model, name, who="gradcam")
        grid = _token_grid(model)
        cap = _GradCAMCapture(inputs, self.options, name, grid)
        if self.options.closed_form:
            cap.classifier_weight = _linear_head(model, self._layer_name(model)).weight
            if not trainable:
                cap.classifier_weight = cap.classifier_weight.detach()

        def check(output: object) -> None:
            ok = torch.is_tensor(output) and (output.dim() == 4 or (output.dim() == 3 and grid is not None))
            if not ok:
                shape = tuple(output.shape) if torch.is_tensor(output) else type(output).__name__
                raise ModelError(
                    f"gradcam: layer {name!r} outputs {shape}, expected a (B, C, h, w) feature map (or ViT tokens)"
                )

        # a frozen model's map needs the graph from this layer on only; ViT students need the
        # double backward through attention (the unfused path)
        with recorded(layer, leaf=not trainable, check=check, unfuse=model) as outputs:
            cap.outputs = outputs
            yield cap


def _linear_head(model: nn.Module, layer: str | None) -> nn.Linear:
    """The linear classifier of a timm CNN whose head is global average pooling + linear, applied
    directly to the (default, last-stage) explained layer; ModelError otherwise."""
    get = getattr(model, "get_classifier", None)
    head = get() if callable(get) else None
    pool = getattr(model, "global_pool", None)
    pool_type = getattr(pool, "pool_type", None)
    last = default_layer_name(model, who="gradcam") if getattr(model, "feature_info", None) is not None else None
    problems = []
    if not isinstance(head, nn.Linear):
        problems.append("no linear classifier (get_classifier())")
    if pool_type != "avg":
        problems.append(f"global pooling {pool_type!r}, not 'avg'")
    if getattr(model, "drop_rate", 0.0):
        problems.append(f"dropout {model.drop_rate} before the classifier")
    if _token_grid(model) is not None or (layer is not None and layer != last):
        problems.append(f"the layer is not the last feature stage {last!r}")
    if problems:
        raise ModelError(
            f"gradcam: closed_form needs a global-average-pool + linear head right after the layer "
            f"({'; '.join(problems)} in {type(model).__name__}); set closed_form: false"
        )
    return head


@hookimpl
def register_explainers(register) -> None:
    register(GradCAM)
