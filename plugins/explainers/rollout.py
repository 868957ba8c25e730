"""Attention rollout (Abnar & Zuidema, 2020) for timm vision transformers.

Each block's attention probabilities (fused attention is switched off for the model while it
is explained, and restored) are fused over heads (mean or max), mixed with the identity for the
residual path, A' = (A + I) / 2, and multiplied through the blocks; the class token's row over
the patch tokens, reshaped to the patch grid and bilinearly upsampled to the input, is the map.
Class-agnostic (the target is ignored); differentiable.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from e2kd import hookimpl
from e2kd.api import Capture, Explainer, PluginOptions, recorded
from e2kd.errors import ModelError


class RolloutOptions(PluginOptions):
    """Options of the ``rollout`` explainer."""

    head_fusion: Literal["mean", "max"] = Field("mean", description="how the heads' attention maps are combined")
    residual: bool = Field(True, description="mix each attention with the identity: (A + I) / 2")
    upsample: bool = Field(True, description="bilinearly upsample the patch-grid map to the input size")


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    blocks = getattr(model, "blocks", None)
    if blocks is None or not hasattr(model, "patch_embed"):
        raise ModelError(
            f"rollout: {type(model).__name__} is not a timm vision transformer (needs blocks and "
            f"patch_embed); use gradcam or an input-gradient explainer"
        )
    return [block.attn for block in blocks]


class _RolloutCapture(Capture):
    def __init__(self, inputs: torch.Tensor, options: RolloutOptions, prefix: int, grid: tuple[int, int]) -> None:
        super().__init__(inputs)
        self.options, self.prefix, self.grid = options, prefix, grid
        self.attentions: list[torch.Tensor] = []

    def explain(
        self, logits: torch.Tensor, target: torch.Tensor, *, create_graph: bool = False, upsample: bool = True
    ) -> torch.Tensor:
        if not self.attentions:
            raise RuntimeError("rollout: no attention was recorded; run the model inside capture()")
        rollout = None
        for attn in self.attentions:
            a = attn.mean(1) if self.options.head_fusion == "mean" else attn.max(1).values
            if self.options.residual:  # (A + I) / 2
                a = 0.5 * a
                a.diagonal(dim1=-2, dim2=-1).add_(0.5)
            rollout = a if rollout is None else a @ rollout
        row = rollout[:, 0, self.prefix :]
        out = row.reshape(row.shape[0], 1, *self.grid)
        if self.options.upsample and upsample:
            out = F.interpolate(out, size=self.inputs.shape[-2:], mode="bilinear", align_corners=False)
        return out if create_graph else out.detach()


class AttentionRollout(Explainer):
    """Attention rollout of a timm ViT: the class token's row of the product of attentions."""

    name = "rollout"
    description = "attention rollout of a timm ViT (class-token row, residual-aware, head fusion mean/max)"
    Options = RolloutOptions
    output_channels = 1

    def check_model(self, model: nn.Module) -> None:
        _attention_modules(model)

    def upsamples_bilinearly(self) -> bool:
        return self.options.upsample

    @contextlib.contextmanager
    def capture(self, model: nn.Module, inputs: torch.Tensor, *, trainable: bool = True) -> Iterator[Capture]:
        modules = _attention_modules(model)
        cap = _RolloutCapture(
            inputs, self.options, int(getattr(model, "num_prefix_tokens", 1)), tuple(model.patch_embed.grid_size)
        )
        # the attention probabilities enter each block's attention dropout (on the unfused path only)
        with recorded([m.attn_drop for m in modules], read="input", unfuse=model) as attentions:
            cap.attentions = attentions
            yield cap


@hookimpl
def register_explainers(register) -> None:
    register(AttentionRollout)
