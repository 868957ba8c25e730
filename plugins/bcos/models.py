"""B-cos ResNets: every layer dynamic-linear, inputs encoded as [x, 1 - x], constant logit bias.

Registered: ``bcos_resnet18``, ``bcos_resnet34``, ``bcos_resnet50``, ``bcos_densenet121``,
``bcos_densenet169`` (ImageNet layout; option ``small_input`` swaps the 7x7/stride-2 stem for a
3x3/stride-1 one) and ``bcos_small`` (a few narrow stages for low-resolution images).
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from e2kd import hookimpl
from e2kd.api import ModelBuilder, PluginOptions

from .layers import AddInverse, BcosConv2d, LogitBias, UncenteredBatchNorm2d


def _conv_bn(c_in: int, c_out: int, k: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(BcosConv2d(c_in, c_out, k, stride, k // 2), UncenteredBatchNorm2d(c_out))


class BasicBlock(nn.Module):
    """Two 3x3 B-cos convolutions and a shortcut (B-cos networks have no ReLU and no batch norm)."""

    expansion = 1

    def __init__(self, c_in: int, width: int, stride: int) -> None:
        super().__init__()
        c_out = width * self.expansion
        self.body = nn.Sequential(_conv_bn(c_in, width, 3, stride), _conv_bn(width, c_out, 3))
        self.shortcut = _conv_bn(c_in, c_out, 1, stride) if stride != 1 or c_in != c_out else nn.Identity()

    def forward(self, x):
        return self.body(x) + self.shortcut(x)


class Bottleneck(BasicBlock):
    """1x1 - 3x3 - 1x1 B-cos bottleneck (expansion 4)."""

    expansion = 4

    def __init__(self, c_in: int, width: int, stride: int) -> None:
        super().__init__(c_in, width, stride)
        self.body = nn.Sequential(
            _conv_bn(c_in, width, 1), _conv_bn(width, width, 3, stride), _conv_bn(width, width * self.expansion, 1)
        )


class BcosResNet(nn.Module):
    """encode -> stem -> stages -> 1x1 B-cos classifier -> global average -> + logit bias."""

    bcos = True  # explainers check this to accept the model

    def __init__(
        self, num_classes: int, block: type[BasicBlock], layers: list[int], widths: list[int], small_input: bool
    ) -> None:
        super().__init__()
        self.encode = AddInverse()
        stem = _conv_bn(6, widths[0], 3, 1) if small_input else _conv_bn(6, widths[0], 7, 2)
        self.stem = stem if small_input else nn.Sequential(stem, _conv_bn(widths[0], widths[0], 3, 2))
        stages, c_in = [], widths[0]
        for i, (n, width) in enumerate(zip(layers, widths)):
            blocks = []
            for j in range(n):
                blocks.append(block(c_in, width, 2 if (i > 0 and j == 0) else 1))
                c_in = width * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.classifier = BcosConv2d(c_in, num_classes, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.logit_bias = LogitBias(num_classes)
        self.feature_info = [{"num_chs": w * block.expansion, "module": f"stages.{i}"} for i, w in enumerate(widths)]

    def forward(self, x):
        x = self.stages(self.stem(self.encode(x)))
        return self.logit_bias(self.pool(self.classifier(x)).flatten(1))


class _DenseLayer(nn.Module):
    """BN-free B-cos dense layer: 1x1 bottleneck then 3x3, output concatenated to the input."""

    def __init__(self, c_in: int, growth: int, bottleneck: int) -> None:
        super().__init__()
        self.body = nn.Sequential(_conv_bn(c_in, bottleneck * growth, 1), _conv_bn(bottleneck * growth, growth, 3))

    def forward(self, x):
        return torch.cat([x, self.body(x)], dim=1)


class BcosDenseNet(nn.Module):
    """encode -> stem -> dense blocks with 1x1 B-cos transitions and 2x2 average pooling -> classifier."""

    bcos = True

    def __init__(self, num_classes: int, blocks: list[int], growth: int, init: int, small_input: bool) -> None:
        super().__init__()
        self.encode = AddInverse()
        self.stem = (
            _conv_bn(6, init, 3, 1)
            if small_input
            else nn.Sequential(_conv_bn(6, init, 7, 2), _conv_bn(init, init, 3, 2))
        )
        stages, c = [], init
        for i, n in enumerate(blocks):
            layers = []
            for _ in range(n):
                layers.append(_DenseLayer(c, growth, 4))
                c += growth
            if i < len(blocks) - 1:  # transition: halve channels and resolution (both linear)
                layers += [_conv_bn(c, c // 2, 1), nn.AvgPool2d(2)]
                c //= 2
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.classifier = BcosConv2d(c, num_classes, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.logit_bias = LogitBias(num_classes)
        self.feature_info = [{"module": f"stages.{len(blocks) - 1}", "num_chs": c}]

    def forward(self, x):
        x = self.stages(self.stem(self.encode(x)))
        return self.logit_bias(self.pool(self.classifier(x)).flatten(1))


class DenseNetOptions(PluginOptions):
    """Options of the B-cos DenseNets."""

    small_input: bool = Field(False, description="3x3 stride-1 stem for small images")
    growth: int = Field(32, ge=1, description="growth rate (channels added per dense layer)")
    init: int = Field(64, ge=1, description="stem channels")


class ResNetOptions(PluginOptions):
    """Options of the B-cos ResNets."""

    small_input: bool = Field(False, description="3x3 stride-1 stem for small images instead of 7x7/2 + 3x3/2")


class SmallOptions(PluginOptions):
    """Options of ``bcos_small``."""

    widths: list[int] = Field([16, 32, 64], min_length=1, description="channels per stage")
    blocks: int = Field(1, ge=1, description="basic blocks per stage")


class BcosSmall(ModelBuilder):
    """A small B-cos ResNet for low-resolution images (tests, the miniature claims)."""

    name = "bcos_small"
    description = "small B-cos ResNet for low-resolution images (3x3 stem, last stage at 1/4 with 3 stages)"
    Options = SmallOptions

    def build(self, num_classes: int) -> nn.Module:
        o = self.options
        return BcosResNet(num_classes, BasicBlock, [o.blocks] * len(o.widths), list(o.widths), small_input=True)


def _resnet(depth: int, block: type[BasicBlock], layers: list[int]) -> type[ModelBuilder]:
    return ModelBuilder.define(
        f"bcos_resnet{depth}",
        f"B-cos ResNet-{depth} (B = 2, 6-channel input encoding)",
        lambda o, n: BcosResNet(n, block, layers, [64, 128, 256, 512], o.small_input),
        ResNetOptions,
    )


def _densenet(depth: int, blocks: list[int]) -> type[ModelBuilder]:
    return ModelBuilder.define(
        f"bcos_densenet{depth}",
        f"B-cos DenseNet-{depth} (B = 2, 6-channel input encoding)",
        lambda o, n: BcosDenseNet(n, blocks, o.growth, o.init, o.small_input),
        DenseNetOptions,
    )


BUILDERS = [
    _resnet(18, BasicBlock, [2, 2, 2, 2]),
    _resnet(34, BasicBlock, [3, 4, 6, 3]),
    _resnet(50, Bottleneck, [3, 4, 6, 3]),
    BcosSmall,
    _densenet(121, [6, 12, 24, 16]),
    _densenet(169, [6, 12, 32, 32]),
]


@hookimpl
def register_models(register) -> None:
    for builder in BUILDERS:
        register(builder)
