"""Weight names of the Hugging Face hub, timm and torchvision, found in those libraries' caches.

- ``hf-hub:ORG/REPO[@REVISION]``: ``model.safetensors`` (else ``pytorch_model.bin``) of a hub repository,
  e.g. ``hf-hub:timm/resnet34.tv_in1k``;
- ``timm:ARCH.TAG``: a timm pretrained tag (``timm.list_pretrained()``), i.e. the hub repository timm
  loads it from (or its URL, for the few tags without one);
- ``torchvision:ENUM.MEMBER``: a torchvision weight enum, e.g. ``ResNet34_Weights.IMAGENET1K_V1``, in
  ``torch.hub``'s checkpoint folder (the file torchvision itself downloads).
"""

from __future__ import annotations

import difflib

from e2kd import hookimpl
from e2kd.api import WeightFile, WeightSource
from e2kd.errors import ModelError
from e2kd.weights import hf_hub_file, torch_hub_file


def _close(name: str, known: list[str]) -> str:
    hint = difflib.get_close_matches(name, known, n=1, cutoff=0.75)
    return f"; did you mean {hint[0]!r}?" if hint else ""


class HfHubSource(WeightSource):
    """``hf-hub:ORG/REPO[@REVISION]``: a Hugging Face hub repository's weights (the hub cache, HF_HOME)."""

    name = "hf-hub"
    description = "a Hugging Face hub repository's model.safetensors: hf-hub:timm/resnet34.tv_in1k[@revision]"

    def locate(self, spec: str, *, revision: str | None = None, download: bool = True) -> WeightFile:
        repo_id, _, pinned = spec.partition("@")
        if repo_id.count("/") != 1:
            raise ModelError(f"hf-hub:{spec}: give the repository as ORG/NAME (e.g. hf-hub:timm/resnet34.tv_in1k)")
        return hf_hub_file(repo_id, revision=revision or pinned or None, download=download)


class TimmSource(WeightSource):
    """``timm:ARCH.TAG``: timm's pretrained weights for a tag, from the hub repository timm names."""

    name = "timm"
    description = "timm's pretrained tag (timm.list_pretrained()): timm:resnet34.tv_in1k"

    def locate(self, spec: str, *, revision: str | None = None, download: bool = True) -> WeightFile:
        import timm

        try:
            cfg = timm.models.get_pretrained_cfg(spec)
        except RuntimeError:  # an architecture timm knows, with a tag it does not
            cfg = None
        if cfg is None or not (cfg.hf_hub_id or cfg.url):
            raise ModelError(f"timm:{spec}: timm has no pretrained weights of that name{_close(spec, self.names())}")
        if cfg.hf_hub_id:
            return hf_hub_file(cfg.hf_hub_id, revision=revision, download=download)
        return torch_hub_file(cfg.url, download=download)  # the few tags timm loads from a URL

    def names(self) -> list[str]:
        import timm

        return list(timm.list_pretrained())


class TorchvisionSource(WeightSource):
    """``torchvision:ENUM.MEMBER``: a torchvision weight enum's file (torch.hub's cache, TORCH_HOME)."""

    name = "torchvision"
    description = "a torchvision weight enum in torch.hub's cache: torchvision:ResNet34_Weights.IMAGENET1K_V1"

    def locate(self, spec: str, *, revision: str | None = None, download: bool = True) -> WeightFile:
        from torchvision import models

        try:
            weights = models.get_weight(spec)
        except (ValueError, KeyError, AttributeError):
            raise ModelError(
                f"torchvision:{spec}: torchvision has no weights of that name (ENUM.MEMBER, e.g. "
                f"ResNet34_Weights.IMAGENET1K_V1){_close(spec, self.names())}"
            ) from None
        return torch_hub_file(weights.url, download=download)

    def names(self) -> list[str]:
        from torchvision import models

        return [
            f"{type(w).__name__}.{w.name}"
            for model in models.list_models(module=models)
            for w in models.get_model_weights(model)
        ]


@hookimpl
def register_weight_sources(register) -> None:
    register(HfHubSource)
    register(TimmSource)
    register(TorchvisionSource)
