"""Any timm architecture, built with random initialisation.

Pretrained weights come through the config's ``checkpoint`` field: a local file or a weight name such
as ``timm:resnet34.tv_in1k`` (the library's cache, pinned by ``e2kd weights fetch``), so every run
records which file it loaded. Models take [0, 1]
images and normalise them themselves, by default with the architecture's pretrained mean/std.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator
from torch import nn

from e2kd import hookimpl
from e2kd.api import ModelBuilder, PluginOptions
from e2kd.models import normalize_inputs


class TimmOptions(PluginOptions):
    """Options of the ``timm`` model builder."""

    arch: str = Field("resnet18", description="timm model name, e.g. resnet18")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="extra keyword arguments of timm.create_model")
    normalize: bool = Field(True, description="normalise [0, 1] input with mean/std inside the model")
    mean: list[float] | None = Field(None, description="per-channel mean (default: the arch's pretrained config)")
    std: list[float] | None = Field(None, description="per-channel std (default: the arch's pretrained config)")

    @field_validator("kwargs")
    @classmethod
    def _weights_by_checkpoint(cls, value: dict[str, Any]) -> dict[str, Any]:
        if value.get("pretrained") or "pretrained_cfg_overlay" in value:
            raise ValueError(
                "pretrained weights are not loaded through timm's kwargs; set the model's checkpoint to a weight "
                "name instead (e.g. checkpoint: timm:resnet34.tv_in1k) or to a local file"
            )
        return value


class TimmBuilder(ModelBuilder):
    """Any timm architecture by name, randomly initialised (weights from a local checkpoint)."""

    name = "timm"
    description = "a timm architecture by name (option arch), randomly initialised"
    Options = TimmOptions

    def build(self, num_classes: int) -> nn.Module:
        import timm

        kwargs = {k: v for k, v in self.options.kwargs.items() if k != "pretrained"}
        if not timm.is_model(self.options.arch):
            from e2kd.errors import ModelError

            raise ModelError(f"timm: unknown arch {self.options.arch!r} (see timm.list_models())")
        model = timm.create_model(self.options.arch, pretrained=False, num_classes=num_classes, **kwargs)
        if self.options.normalize:
            cfg = getattr(model, "pretrained_cfg", None) or {}
            mean = self.options.mean or cfg.get("mean", (0.485, 0.456, 0.406))
            std = self.options.std or cfg.get("std", (0.229, 0.224, 0.225))
            normalize_inputs(model, mean, std)
        return model


@hookimpl
def register_models(register) -> None:
    register(TimmBuilder)
