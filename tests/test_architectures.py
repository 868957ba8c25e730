"""Every built-in architecture fixed by a snapshot: a checkpoint saved today must load tomorrow.

For each model builder and a few option sets, the model is built on PyTorch's ``meta`` device (no
memory, no initialisation) and described by its state-dict (every key and shape), its declared
feature stages, and the shapes its forward produces at each stage and at the logits for a 64 x 64
input. ``tests/data/architectures.json`` holds a digest of each description with its parameter
count; a deliberate change regenerates it with ``python -m tests.test_architectures``. The timm
builder's input normalisation is checked by value.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from e2kd.registry import isolated_registry

SNAPSHOT = Path(__file__).parent / "data" / "architectures.json"
REGISTRY = isolated_registry()

CASES: dict[str, tuple[str, dict[str, Any], int]] = {  # case -> (builder, options, input size)
    "bcos_resnet18": ("bcos_resnet18", {}, 64),
    "bcos_resnet18_small_input": ("bcos_resnet18", {"small_input": True}, 32),
    "bcos_resnet34": ("bcos_resnet34", {}, 64),
    "bcos_resnet50": ("bcos_resnet50", {}, 64),
    "bcos_resnet50_small_input": ("bcos_resnet50", {"small_input": True}, 32),
    "bcos_densenet121": ("bcos_densenet121", {}, 64),
    "bcos_densenet121_narrow": ("bcos_densenet121", {"small_input": True, "growth": 8, "init": 16}, 32),
    "bcos_densenet169": ("bcos_densenet169", {}, 64),
    "bcos_small": ("bcos_small", {}, 32),
    "bcos_small_two_blocks": ("bcos_small", {"widths": [4, 6], "blocks": 2}, 16),
    "bcos_vit_tiny": ("bcos_vit_tiny", {}, 224),
    "bcos_vit_tiny_small": (
        "bcos_vit_tiny",
        {"img_size": 32, "patch_size": 8, "embed_dim": 24, "depth": 2, "num_heads": 3},
        32,
    ),
    "bcos_v2_resnet18": ("bcos_v2_resnet18", {}, 64),
    "bcos_v2_resnet50": ("bcos_v2_resnet50", {}, 64),
    "bcos_v2_densenet121": ("bcos_v2_densenet121", {}, 64),
    "bcos_v2_simple_vit_ti": ("bcos_v2_simple_vit_ti", {}, 224),
    "small_resnet": ("small_resnet", {}, 32),
    "small_resnet_two_blocks": ("small_resnet", {"widths": [8, 12], "blocks": 2}, 16),
}


def describe(builder: str, options: dict[str, Any], size: int, num_classes: int = 7) -> dict[str, Any]:
    """Keys and shapes of the state dict, feature stages, and the shapes of the forward at each
    stage and at the logits, of the model built on the meta device."""
    with torch.device("meta"):
        model = REGISTRY.create("model", builder, options).build(num_classes)
    stages = [
        dict(entry)
        for entry in (
            getattr(getattr(model, "feature_info", None), "info", None) or getattr(model, "feature_info", None) or []
        )
    ]
    seen: dict[str, list[int]] = {}
    hooks = [
        model.get_submodule(s["module"]).register_forward_hook(
            lambda m, i, out, name=s["module"]: seen.__setitem__(name, list(out.shape))
        )
        for s in stages
    ]
    logits = model.eval()(torch.zeros(2, 3, size, size, device="meta"))
    for hook in hooks:
        hook.remove()
    return {
        "state_dict": [[k, list(v.shape)] for k, v in model.state_dict().items()],
        "feature_info": stages,
        "stage_shapes": seen,
        "logits": list(logits.shape),
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def digest(description: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()


@pytest.mark.parametrize("case", sorted(CASES))
def test_architecture_is_the_snapshot(case):
    snapshot = json.loads(SNAPSHOT.read_text())[case]
    description = describe(*CASES[case])
    assert description["logits"] == [2, 7]
    assert (description["parameters"], digest(description)) == (snapshot["parameters"], snapshot["digest"]), (
        f"the architecture of {case!r} changed: checkpoints saved before will not load. If that is deliberate, "
        f"regenerate with python -m tests.test_architectures"
    )


def test_the_snapshot_tells_architectures_apart():
    digests = [json.loads(SNAPSHOT.read_text())[case]["digest"] for case in CASES]
    assert len(set(digests)) == len(digests)


def test_bcos_resnet_stages_halve_the_resolution_from_a_stride_4_stem():
    d = describe("bcos_resnet18", {}, 64)
    assert d["stage_shapes"] == {
        "stages.0": [2, 64, 16, 16],
        "stages.1": [2, 128, 8, 8],
        "stages.2": [2, 256, 4, 4],
        "stages.3": [2, 512, 2, 2],
    }
    small = describe("bcos_resnet50", {"small_input": True}, 32)
    assert small["stage_shapes"]["stages.0"] == [2, 256, 32, 32] and small["stage_shapes"]["stages.3"] == [
        2,
        2048,
        4,
        4,
    ]
    assert [s["num_chs"] for s in small["feature_info"]] == [256, 512, 1024, 2048]
    keys = dict(d["state_dict"])
    assert keys["stem.0.0.weight"][:2] == [64, 6] and keys["classifier.weight"][:2] == [7, 512]


def test_small_builders_follow_their_options():
    d = describe("bcos_small", {"widths": [4, 6], "blocks": 2}, 16)
    assert d["stage_shapes"] == {"stages.0": [2, 4, 16, 16], "stages.1": [2, 6, 8, 8]}
    assert sum(1 for k, _ in d["state_dict"] if k.startswith("stages.1.") and k.endswith("body.0.0.weight")) == 2
    r = describe("small_resnet", {"widths": [8, 12], "blocks": 2}, 16)
    assert [s["num_chs"] for s in r["feature_info"]] == [8, 12]


def test_timm_models_normalise_their_input_with_the_archs_mean_and_std_or_the_given_ones():
    from torch import nn

    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))

    def first_conv_input(model: nn.Module) -> torch.Tensor:
        seen = []
        hook = model.conv1.register_forward_hook(lambda m, i, o: seen.append(i[0]))
        model.eval()(x)
        hook.remove()
        return seen[0]

    torch.manual_seed(0)
    default = REGISTRY.create("model", "timm", {"arch": "resnet18"}).build(4)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])  # resnet18's config
    torch.testing.assert_close(first_conv_input(default), (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1))
    given = REGISTRY.create(
        "model", "timm", {"arch": "resnet18", "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.5, 1.0]}
    ).build(4)
    torch.testing.assert_close(first_conv_input(given), (x - 0.5) / torch.tensor([0.25, 0.5, 1.0]).view(1, 3, 1, 1))
    raw = REGISTRY.create("model", "timm", {"arch": "resnet18", "normalize": False}).build(4)
    torch.testing.assert_close(first_conv_input(raw), x)
    vit = REGISTRY.create("model", "timm", {"arch": "vit_tiny_patch16_224", "kwargs": {"img_size": 32}}).build(3)
    assert vit(x).shape == (2, 3) and vit.patch_embed.img_size == (32, 32)


def test_timm_refuses_unknown_archs_and_pretrained_kwargs():
    from e2kd.errors import ModelError, PluginError

    with pytest.raises(ModelError, match=r"^timm: unknown arch 'resnet_nineteen' \(see timm.list_models\(\)\)$"):
        REGISTRY.create("model", "timm", {"arch": "resnet_nineteen"}).build(3)
    for kwargs in ({"pretrained": True}, {"pretrained_cfg_overlay": {}}):
        with pytest.raises(
            PluginError,
            match=r"^model 'timm': options.kwargs: Value error, pretrained weights are not loaded through "
            r"timm's kwargs; set the model's checkpoint to a weight name instead \(e.g. checkpoint: "
            r"timm:resnet34.tv_in1k\) or to a local file",
        ):
            REGISTRY.create("model", "timm", {"arch": "resnet18", "kwargs": kwargs})
    model = REGISTRY.create("model", "timm", {"arch": "resnet18", "kwargs": {"pretrained": False}}).build(5)
    assert model.fc.out_features == 5


def main() -> int:
    """Regenerate the snapshot (a deliberate change of an architecture)."""
    snapshot = {}
    for case in sorted(CASES):
        description = describe(*CASES[case])
        snapshot[case] = {"parameters": description["parameters"], "digest": digest(description)}
    SNAPSHOT.write_text(json.dumps(snapshot, indent=1) + "\n")
    print(f"wrote {SNAPSHOT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())


@pytest.mark.parametrize(
    "cfg, mean, std",
    [
        (None, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),  # no config: ImageNet's statistics
        ({}, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
        ({"mean": (0.5, 0.25, 0.0), "std": (0.5, 0.5, 2.0)}, [0.5, 0.25, 0.0], [0.5, 0.5, 2.0]),
    ],
)
def test_timm_normalisation_comes_from_the_pretrained_config_or_imagenets(monkeypatch, cfg, mean, std):
    import timm
    from torch import nn

    def create(arch, **kwargs):
        model = nn.Conv2d(3, 3, 1)
        if cfg is not None:
            model.pretrained_cfg = cfg
        return model

    monkeypatch.setattr(timm, "create_model", create)
    model = REGISTRY.create("model", "timm", {"arch": "resnet18"}).build(3)
    assert model.input_mean.flatten().tolist() == pytest.approx(mean)
    assert model.input_std.flatten().tolist() == pytest.approx(std)


def test_small_resnet_normalises_only_when_asked_with_the_missing_half_neutral():
    x = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    plain = REGISTRY.create("model", "small_resnet", {"widths": [4]}).build(2)
    assert not hasattr(plain, "input_mean")
    mean_only = REGISTRY.create("model", "small_resnet", {"widths": [4], "mean": [0.5, 0.5, 0.5]}).build(2)
    assert mean_only.input_mean.flatten().tolist() == [0.5] * 3 and mean_only.input_std.flatten().tolist() == [1.0] * 3
    std_only = REGISTRY.create("model", "small_resnet", {"widths": [4], "std": [2.0, 2.0, 2.0]}).build(2)
    assert std_only.input_mean.flatten().tolist() == [0.0] * 3 and std_only.input_std.flatten().tolist() == [2.0] * 3
    assert mean_only(x).shape == (1, 2)
