"""A small residual CNN for the built-in synthetic data (fast on a CPU).

Stages keep a useful spatial resolution for explanations: with 3 stages the last
feature map is 1/4 of the input (8x8 at 32 px).
"""

from __future__ import annotations

from pydantic import Field
from torch import nn

from e2kd import hookimpl
from e2kd.api import ModelBuilder, PluginOptions
from e2kd.models import normalize_inputs


class _Block(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.act = nn.ReLU()
        self.shortcut = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        out = self.act(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act(out + self.shortcut(x))


class SmallResNet(nn.Module):
    """stem -> stages (the first keeps resolution, each later one halves it) -> GAP -> fc."""

    def __init__(self, num_classes: int, widths: tuple[int, ...], blocks: int, in_chans: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()
        )
        stages, c_in = [], widths[0]
        for i, width in enumerate(widths):
            layers = [_Block(c_in, width, 1 if i == 0 else 2)] + [_Block(width, width, 1) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*layers))
            c_in = width
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_classes)
        # timm-style description of the feature stages (explainers use the last one by default)
        self.feature_info = [{"num_chs": w, "reduction": 2**i, "module": f"stages.{i}"} for i, w in enumerate(widths)]

    def forward(self, x):
        return self.fc(self.pool(self.stages(self.stem(x))).flatten(1))


class SmallResNetOptions(PluginOptions):
    """Options of ``small_resnet``."""

    widths: tuple[int, ...] = Field((16, 32, 64), min_length=1, description="channels per stage")
    blocks: int = Field(1, ge=1, description="residual blocks per stage")
    in_chans: int = Field(3, ge=1, description="input channels")
    mean: list[float] | None = Field(None, description="per-channel input mean to subtract (default: none)")
    std: list[float] | None = Field(None, description="per-channel input std to divide by (with mean)")


class SmallResNetBuilder(ModelBuilder):
    """A small residual CNN for low-resolution images (tests, the demo, the miniatures)."""

    name = "small_resnet"
    description = "small residual CNN for low-resolution images (last stage at 1/4 resolution with 3 stages)"
    Options = SmallResNetOptions

    def build(self, num_classes: int) -> nn.Module:
        o = self.options
        model = SmallResNet(num_classes, tuple(o.widths), o.blocks, o.in_chans)
        if o.mean is not None or o.std is not None:
            normalize_inputs(model, o.mean or [0.0] * o.in_chans, o.std or [1.0] * o.in_chans)
        return model


@hookimpl
def register_models(register) -> None:
    register(SmallResNetBuilder)
