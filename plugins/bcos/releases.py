"""``bcos-v2:NAME``: the B-cos-v2 release files (github.com/B-cos/B-cos-v2, release v0.0.1-weights).

``NAME`` is the file name without its hash, e.g. ``bcos-v2:resnet_34`` for ``resnet_34-a63425a03e.pth``
(the ImageNet B-cos ResNet-34 the paper distils from). The file is kept in ``torch.hub``'s checkpoint
folder, where the ``bcos`` package's own ``pretrained=True`` puts it, and its hash is checked. The
files load into this plugin's ``bcos_v2_*`` builders of the same architecture (``resnet_18/34/50``,
``densenet_121/169``, ``bcos_simple_vit_ti_patch16_224``).
"""

from __future__ import annotations

import difflib
import re

from e2kd import hookimpl
from e2kd.api import WeightFile, WeightSource
from e2kd.errors import ModelError
from e2kd.weights import torch_hub_file

RELEASE_URL = "https://github.com/B-cos/B-cos-v2/releases/download/v0.0.1-weights"
#: The release's weight files (name-hash.pth; the hash starts the file's SHA-256).
RELEASE_FILES = (
    "resnet_18-68b4160fff.pth",
    "resnet_34-a63425a03e.pth",
    "resnet_50-ead259efe4.pth",
    "resnet_101-84c3658278.pth",
    "resnet_152-42051a77c1.pth",
    "resnext_50_32x4d-57af241ab9.pth",
    "densenet_121-b8daf96afb.pth",
    "densenet_161-9e9ea51353.pth",
    "densenet_169-7037ee0604.pth",
    "densenet_201-00ac87066f.pth",
    "vgg_11_bnu-34036029f0.pth",
    "convnext_tiny_pn-539b1bfb37.pth",
    "convnext_base_pn-b0495852c6.pth",
    "convnext_tiny_bnu-dbd7f5ef9d.pth",
    "convnext_base_bnu-7c32a704b3.pth",
    "densenet_121_long-5175461597.pth",
    "resnet_50_long-ef38a88533.pth",
    "resnet_152_long-0b4b434939.pth",
    "bcos_simple_vit_ti_patch16_224-4b0824b1c1.pth",
    "bcos_simple_vit_s_patch16_224-75e99d1f73.pth",
    "bcos_simple_vit_b_patch16_224-1fc4750806.pth",
    "bcos_simple_vit_l_patch16_224-9613b2ad0a.pth",
    "bcos_vitc_ti_patch1_14-ddd6193a77.pth",
    "bcos_vitc_s_patch1_14-cf55c88f0c.pth",
    "bcos_vitc_b_patch1_14-a13c46397b.pth",
    "bcos_vitc_l_patch1_14-8739e18b8d.pth",
)


def release_files() -> dict[str, str]:
    """Release name -> file name (``resnet_34`` -> ``resnet_34-a63425a03e.pth``)."""
    return {re.sub(r"-[0-9a-f]+\.pth$", "", f): f for f in RELEASE_FILES}


class BcosV2Releases(WeightSource):
    """``bcos-v2:NAME``: a B-cos-v2 release file (torch.hub's cache, where the bcos package keeps it)."""

    name = "bcos-v2"
    description = "a B-cos-v2 release file by name (bcos-v2:resnet_34), in torch.hub's cache"

    def locate(self, spec: str, *, revision: str | None = None, download: bool = True) -> WeightFile:
        files = release_files()
        if spec not in files:
            hint = difflib.get_close_matches(spec, list(files), n=1)
            raise ModelError(
                f"bcos-v2:{spec}: no B-cos-v2 release of that name"
                + (f"; did you mean {hint[0]!r}?" if hint else f" (known: {', '.join(files)})")
            )
        return torch_hub_file(f"{RELEASE_URL}/{files[spec]}", download=download)

    def names(self) -> list[str]:
        return list(release_files())


@hookimpl
def register_weight_sources(register) -> None:
    register(BcosV2Releases)
