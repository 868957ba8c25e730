"""A B-cos vision transformer (ViT-Tiny layout: patch 16, dim 192, depth 12, 3 heads).

Every map is dynamic linear: B-cos patch embedding on the [x, 1 - x] encoding, B-cos linear
layers (q, k, v, projections, MLP without activation), bias-free LayerNorm (centring is linear,
1/std a dynamic factor) and attention as a dynamic matrix (softmax(q k^T) counts as a constant in
explanation mode). The class token and the positional embeddings are constants added to the
tokens, so ``logit - bias = sum(W(x) * x)`` holds up to their contribution. The module layout
follows timm (``patch_embed.grid_size``, ``blocks[i].attn.attn_drop``, ``num_prefix_tokens``),
so Grad-CAM on tokens and attention rollout work on it unchanged.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from e2kd import hookimpl
from e2kd.api import ModelBuilder, PluginOptions

from .layers import AddInverse, BcosConv2d, BcosLinear, DynamicLayerNorm, DynamicMatmul, LogitBias


class PatchEmbed(nn.Module):
    """B-cos patch embedding of the 6-channel encoded image (a strided B-cos convolution)."""

    def __init__(self, img_size: int, patch: int, dim: int) -> None:
        super().__init__()
        self.grid_size = (img_size // patch, img_size // patch)
        self.proj = BcosConv2d(6, dim, patch, stride=patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention whose value path is B-cos linear (dynamic linear in the input)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.scale = self.head_dim**-0.5
        self.qkv = BcosLinear(dim, 3 * dim)
        self.attn_drop = nn.Identity()  # where rollout reads the attention probabilities
        self.proj = BcosLinear(dim, dim)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        attn = self.attn_drop(((q * self.scale) @ k.transpose(-2, -1)).softmax(-1))
        return self.proj(DynamicMatmul.apply(attn, v).transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    """A pre-norm transformer block of B-cos layers (dynamic layer norms, attention, B-cos MLP)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int = 4) -> None:
        super().__init__()
        self.norm1, self.attn = DynamicLayerNorm(dim), Attention(dim, heads)
        self.norm2 = DynamicLayerNorm(dim)
        self.mlp = nn.Sequential(BcosLinear(dim, mlp_ratio * dim), BcosLinear(mlp_ratio * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class BcosViT(nn.Module):
    """B-cos vision transformer: class token, learned position embedding, B-cos blocks and head."""

    bcos = True
    num_prefix_tokens = 1

    def __init__(self, num_classes: int, img_size: int, patch: int, dim: int, depth: int, heads: int) -> None:
        super().__init__()
        self.encode = AddInverse()
        self.patch_embed = PatchEmbed(img_size, patch, dim)
        n = self.patch_embed.grid_size[0] * self.patch_embed.grid_size[1]
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, n + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(dim, heads) for _ in range(depth)])
        self.norm = DynamicLayerNorm(dim)
        self.head = BcosLinear(dim, num_classes)
        self.logit_bias = LogitBias(num_classes)
        self.feature_info = [{"module": f"blocks.{i}", "num_chs": dim} for i in range(depth)]

    def forward(self, x):
        tokens = self.patch_embed(self.encode(x))
        tokens = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1) + self.pos_embed
        return self.logit_bias(self.head(self.norm(self.blocks(tokens))[:, 0]))


class ViTOptions(PluginOptions):
    """Options of ``bcos_vit_tiny`` (every size configurable)."""

    img_size: int = Field(224, ge=4)
    patch_size: int = Field(16, ge=1)
    embed_dim: int = Field(192, ge=2)
    depth: int = Field(12, ge=1)
    num_heads: int = Field(3, ge=1)


class BcosViTTiny(ModelBuilder):
    """A B-cos ViT-Tiny (patch 16, dimension 192, depth 12, 3 heads by default)."""

    name = "bcos_vit_tiny"
    description = "B-cos ViT-Tiny (patch 16, dim 192, depth 12, 3 heads; sizes configurable)"
    Options = ViTOptions

    def build(self, num_classes: int) -> nn.Module:
        o = self.options
        if o.img_size % o.patch_size or o.embed_dim % o.num_heads:
            raise ValueError("img_size must be a multiple of patch_size and embed_dim of num_heads")
        return BcosViT(num_classes, o.img_size, o.patch_size, o.embed_dim, o.depth, o.num_heads)


@hookimpl
def register_models(register) -> None:
    register(BcosViTTiny)
