"""B-cos ResNets, DenseNets and the SimpleViT-Ti laid out like the ``bcos`` package (B-cos v2),
so its state dicts load as they are.

``bcos_v2_resnet18/34/50`` and ``bcos_v2_densenet121/169`` have the package's module names (``conv1``, ``bn1``, ``layer1..4``,
``fc``, ``conv*.linear.weight``), its stem (7x7/2 B-cos conv, norm, 3x3/2 average pooling) and its
default norm, a bias-free *position norm* (LayerNorm over the channels at every pixel). Built from
this package's layers, they keep the exact e2KD gradient semantics: give a B-cos-v2 checkpoint
(a state dict saved from ``bcos.models.resnet.resnet18(...)``) in the config's ``checkpoint``.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from e2kd import hookimpl
from e2kd.api import ModelBuilder, PluginOptions

from .layers import AddInverse, DynamicLayerNorm, DynamicMatmul, LogitBias, dynamic_mul


class _Weight(nn.Module):
    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(shape))
        nn.init.kaiming_normal_(self.weight)


class BcosConv2dV2(nn.Module):
    """B-cos conv with the package's parameter name (``linear.weight``) and its patch norm."""

    def __init__(self, c_in: int, c_out: int, k: int = 1, stride: int = 1, padding: int = 0) -> None:
        super().__init__()
        self.linear = _Weight((c_out, c_in, k, k))
        self.k, self.stride, self.padding = k, stride, padding

    def forward(self, x):
        w = self.linear.weight
        w = w / w.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        out = nn.functional.conv2d(x, w, None, self.stride, self.padding)
        squares = (x * x).sum(1, keepdim=True)
        norm = (nn.functional.avg_pool2d(squares, self.k, self.stride, self.padding) * self.k * self.k + 1e-6).sqrt()
        return dynamic_mul(out, out.abs() / norm)


class PositionNorm2d(nn.Module):
    """(x - mean_c) / std_c * gamma at every pixel, no bias: centring is linear, gamma/std dynamic."""

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.eps = eps

    def forward(self, x):
        centred = x - x.mean(1, keepdim=True)
        std = (centred.pow(2).mean(1, keepdim=True) + self.eps).sqrt()
        return dynamic_mul(centred, self.weight.view(1, -1, 1, 1) / std)


class BasicBlockV2(nn.Module):
    """Two 3x3 B-cos-v2 convolutions with position norms and an identity (or 1x1) shortcut."""

    expansion = 1

    def __init__(self, c_in: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = BcosConv2dV2(c_in, planes, 3, stride, 1), PositionNorm2d(planes)
        self.conv2, self.bn2 = BcosConv2dV2(planes, planes, 3, 1, 1), PositionNorm2d(planes)
        self.downsample = self._downsample(c_in, planes * self.expansion, stride)

    @staticmethod
    def _downsample(c_in: int, c_out: int, stride: int) -> nn.Module | None:
        if stride == 1 and c_in == c_out:
            return None
        return nn.Sequential(BcosConv2dV2(c_in, c_out, 1, stride), PositionNorm2d(c_out))

    def residual(self, x):
        return self.bn2(self.conv2(self.bn1(self.conv1(x))))

    def forward(self, x):
        return self.residual(x) + (self.downsample(x) if self.downsample is not None else x)


class BottleneckV2(BasicBlockV2):
    """1x1 - 3x3 - 1x1 B-cos-v2 bottleneck (expansion 4) of the deeper B-cos-v2 ResNets."""

    expansion = 4

    def __init__(self, c_in: int, planes: int, stride: int) -> None:
        nn.Module.__init__(self)
        self.conv1, self.bn1 = BcosConv2dV2(c_in, planes, 1), PositionNorm2d(planes)
        self.conv2, self.bn2 = BcosConv2dV2(planes, planes, 3, stride, 1), PositionNorm2d(planes)
        self.conv3, self.bn3 = BcosConv2dV2(planes, planes * 4, 1), PositionNorm2d(planes * 4)
        self.downsample = self._downsample(c_in, planes * 4, stride)

    def residual(self, x):
        return self.bn3(self.conv3(self.bn2(self.conv2(self.bn1(self.conv1(x))))))


class BcosV2ResNet(nn.Module):
    """B-cos-v2 ResNet with the bcos package's module names, so its released state dicts load."""

    bcos = True

    def __init__(self, num_classes: int, block: type[BasicBlockV2], layers: list[int]) -> None:
        super().__init__()
        self.encode = AddInverse()
        self.conv1 = BcosConv2dV2(6, 64, 7, 2, 3)
        self.pool = nn.AvgPool2d(3, 2, 1)
        self.bn1 = PositionNorm2d(64)
        c_in = 64
        for i, (n, planes) in enumerate(zip(layers, [64, 128, 256, 512]), start=1):
            blocks = []
            for j in range(n):
                blocks.append(block(c_in, planes, 2 if (i > 1 and j == 0) else 1))
                c_in = planes * block.expansion
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
        self.fc = BcosConv2dV2(c_in, num_classes, 1)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.logit_layer = LogitBias(num_classes)
        self.feature_info = [{"module": "layer4", "num_chs": c_in}]

    def forward(self, x):
        x = self.pool(self.bn1(self.conv1(self.encode(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.logit_layer(self.avgpool(self.fc(x)).flatten(1))


class DenseLayerV2(nn.Module):
    """One B-cos-v2 dense layer: norm, 1x1 bottleneck, norm, 3x3 convolution; returns the new features."""

    def __init__(self, c_in: int, growth: int, bn_size: int) -> None:
        super().__init__()
        self.norm1, self.conv1 = PositionNorm2d(c_in), BcosConv2dV2(c_in, bn_size * growth, 1)
        self.norm2, self.conv2 = PositionNorm2d(bn_size * growth), BcosConv2dV2(bn_size * growth, growth, 3, 1, 1)

    def forward(self, x):
        return self.conv2(self.norm2(self.conv1(self.norm1(x))))


class DenseBlockV2(nn.ModuleDict):
    """B-cos-v2 dense block: each layer sees the concatenation of every earlier output."""

    def __init__(self, n: int, c_in: int, growth: int, bn_size: int) -> None:
        super().__init__({f"denselayer{i + 1}": DenseLayerV2(c_in + i * growth, growth, bn_size) for i in range(n)})

    def forward(self, x):
        for layer in self.values():
            x = torch.cat([x, layer(x)], dim=1)
        return x


class BcosV2DenseNet(nn.Module):
    """The bcos package's DenseNet layout (``features.conv0 ... features.norm5``, ``classifier``)."""

    bcos = True

    def __init__(self, num_classes: int, blocks: list[int], growth: int = 32, init: int = 64, bn_size: int = 4) -> None:
        super().__init__()
        self.encode = AddInverse()
        layers = {
            "conv0": BcosConv2dV2(6, init, 7, 2, 3),
            "norm0": PositionNorm2d(init),
            "pool0": nn.AvgPool2d(3, 2, 1),
        }
        c = init
        for i, n in enumerate(blocks, start=1):
            layers[f"denseblock{i}"] = DenseBlockV2(n, c, growth, bn_size)
            c += n * growth
            if i < len(blocks):
                layers[f"transition{i}"] = nn.Sequential()
                layers[f"transition{i}"].add_module("norm", PositionNorm2d(c))
                layers[f"transition{i}"].add_module("conv", BcosConv2dV2(c, c // 2, 1))
                layers[f"transition{i}"].add_module("pool", nn.AvgPool2d(2, 2))
                c //= 2
        layers["norm5"] = PositionNorm2d(c)
        self.features = nn.Sequential()
        for name, module in layers.items():
            self.features.add_module(name, module)
        self.classifier = BcosConv2dV2(c, num_classes, 1)
        self.logit_layer = LogitBias(num_classes)
        self.feature_info = [{"module": "features", "num_chs": c}]

    def forward(self, x):
        out = self.classifier(self.features(self.encode(x)))
        return self.logit_layer(nn.functional.adaptive_avg_pool2d(out, 1).flatten(1))


class BcosLinearV2(nn.Module):
    """B-cos linear with the package's parameter name (``linear.weight``) and norm (||x|| + 1e-12)."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.linear = _Weight((d_out, d_in))

    def forward(self, x):
        w = self.linear.weight
        out = x @ (w / w.norm(dim=1, keepdim=True)).t()
        return dynamic_mul(out, out.abs() / (x.norm(dim=-1, keepdim=True) + 1e-12))


class _PatchLinear(nn.Module):
    """'b c (h p1) (w p2) -> b h w (p1 p2 c)' followed by a B-cos linear map (the package's patch embedding)."""

    def __init__(self, patch: int, dim: int) -> None:
        super().__init__()
        self.patch = patch
        self.linear = BcosLinearV2(6 * patch * patch, dim)

    def forward(self, x):
        b, c, height, width = x.shape
        p = self.patch
        x = x.view(b, c, height // p, p, width // p, p).permute(0, 2, 4, 3, 5, 1)
        return self.linear(x.reshape(b, height // p, width // p, p * p * c))


def sincos_2d(h: int, w: int, dim: int, dtype: torch.dtype, device, temperature: float = 10_000.0) -> torch.Tensor:
    """The package's fixed 2-D sine-cosine positional embedding, (h * w, dim)."""
    y, x = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    omega = 1.0 / temperature ** (torch.arange(dim // 4, device=device) / (dim // 4 - 1))
    y, x = y.flatten()[:, None] * omega[None, :], x.flatten()[:, None] * omega[None, :]
    return torch.cat((x.sin(), x.cos(), y.sin(), y.cos()), dim=1).to(dtype)


class _AttentionV2(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.norm = DynamicLayerNorm(dim, eps=1e-5)
        self.attend = nn.Softmax(dim=-1)
        self.to_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.to_out = BcosLinearV2(dim, dim)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = (
            t.view(b, n, self.heads, d // self.heads).transpose(1, 2) for t in self.to_qkv(self.norm(x)).chunk(3, -1)
        )
        attn = self.attend((q @ k.transpose(-1, -2)) * self.scale)
        return self.to_out(DynamicMatmul.apply(attn, v).transpose(1, 2).reshape(b, n, d))


class _EncoderV2(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_dim: int) -> None:
        super().__init__()
        self.attn = _AttentionV2(dim, heads)
        self.ff = nn.Module()
        self.ff.net = nn.Sequential()
        for name, module in (
            ("norm", DynamicLayerNorm(dim, eps=1e-5)),
            ("linear1", BcosLinearV2(dim, mlp_dim)),
            ("act", nn.Identity()),
            ("linear2", BcosLinearV2(mlp_dim, dim)),
        ):
            self.ff.net.add_module(name, module)

    def forward(self, x):
        x = self.attn(x) + x
        return self.ff.net(x) + x


class _SimpleViTBody(nn.Module):
    def __init__(self, num_classes: int, patch: int, dim: int, depth: int, heads: int, mlp_dim: int) -> None:
        super().__init__()
        self.to_patch_embedding = _PatchLinear(patch, dim)
        self.transformer = nn.Sequential()
        for i in range(depth):
            self.transformer.add_module(f"encoder_{i}", _EncoderV2(dim, heads, mlp_dim))
        self.linear_head = nn.Sequential()
        self.linear_head.add_module("norm", DynamicLayerNorm(dim, eps=1e-5))
        self.linear_head.add_module("linear", BcosLinearV2(dim, num_classes))

    def forward(self, x):
        patches = self.to_patch_embedding(x)
        b, h, w, d = patches.shape
        tokens = patches.reshape(b, h * w, d) + sincos_2d(h, w, d, patches.dtype, patches.device)
        return self.linear_head(self.transformer(tokens).mean(dim=1))


class BcosV2SimpleViT(nn.Module):
    """The package's B-cos SimpleViT (state-dict keys ``0.*``, then its logit layer as ``1``):
    sine-cosine positional embedding, mean pooling, plain-linear q/k/v, bias-free LayerNorm."""

    bcos = True

    def __init__(
        self,
        num_classes: int,
        patch: int = 16,
        dim: int = 192,
        depth: int = 12,
        heads: int = 3,
        mlp_dim: int = 768,
        logit_bias: float | None = None,
    ) -> None:
        super().__init__()
        self.encode = AddInverse()
        self.add_module("0", _SimpleViTBody(num_classes, patch, dim, depth, heads, mlp_dim))
        self.logit_bias = LogitBias(num_classes)
        if logit_bias is not None:
            self.logit_bias.value = float(logit_bias)

    def forward(self, x):
        return self.logit_bias(getattr(self, "0")(self.encode(x)))


class SimpleViTOptions(PluginOptions):
    """Options of ``bcos_v2_simple_vit_ti``."""

    logit_bias: float | None = Field(
        None,
        description="constant logit bias (default -log(C - 1); the package's "
        "ImageNet configs use log(1/999) whatever C is)",
    )


class BcosV2SimpleViTTiny(ModelBuilder):
    """The bcos package's B-cos-v2 SimpleViT-Ti/16 (its state dicts load)."""

    name = "bcos_v2_simple_vit_ti"
    description = "B-cos-v2 SimpleViT-Ti/16 in the bcos package's layout (loads its state dicts)"
    Options = SimpleViTOptions

    def build(self, num_classes: int) -> nn.Module:
        return BcosV2SimpleViT(num_classes, logit_bias=self.options.logit_bias)


def _v2(name: str, build) -> type[ModelBuilder]:
    return ModelBuilder.define(
        f"bcos_v2_{name}",
        f"B-cos-v2 {name} in the bcos package's layout (loads its state dicts)",
        lambda o, n: build(n),
    )


BUILDERS = [
    _v2("resnet18", lambda n: BcosV2ResNet(n, BasicBlockV2, [2, 2, 2, 2])),
    _v2("resnet34", lambda n: BcosV2ResNet(n, BasicBlockV2, [3, 4, 6, 3])),
    _v2("resnet50", lambda n: BcosV2ResNet(n, BottleneckV2, [3, 4, 6, 3])),
    _v2("densenet121", lambda n: BcosV2DenseNet(n, [6, 12, 24, 16])),
    _v2("densenet169", lambda n: BcosV2DenseNet(n, [6, 12, 32, 32])),
    BcosV2SimpleViTTiny,
]


@hookimpl
def register_models(register) -> None:
    for builder in BUILDERS:
        register(builder)
