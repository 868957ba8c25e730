"""Models take [0, 1] images; mean/std normalisation is the model's (an option), not the data's."""

import pytest
import timm
import torch

import e2kd
from e2kd.errors import ModelError


def test_timm_models_normalise_with_their_pretrained_config():
    model = e2kd.get_model_builder("timm", arch="resnet18").build(5).eval()
    plain = timm.create_model("resnet18", pretrained=False, num_classes=5).eval()
    plain.load_state_dict(model.state_dict())  # the state dict is unchanged by the normalisation
    x = torch.rand(2, 3, 32, 32)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(model(x), plain((x - mean) / std), atol=1e-5)
    assert "layer4" in dict(model.named_modules())  # layer names are unchanged too
    raw = e2kd.get_model_builder("timm", arch="resnet18", normalize=False).build(5).eval()
    raw.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.allclose(raw(x), plain(x), atol=1e-6)
    custom = (
        e2kd.get_model_builder("timm", arch="resnet18", mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25]).build(5).eval()
    )
    custom.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert torch.allclose(custom(x), plain((x - 0.5) / 0.25), atol=1e-5)


def test_small_resnet_normalises_only_when_asked():
    a = e2kd.get_model_builder("small_resnet", widths=[4]).build(3).eval()
    b = e2kd.get_model_builder("small_resnet", widths=[4], mean=[0.2, 0.2, 0.2], std=[0.5, 0.5, 0.5]).build(3).eval()
    b.load_state_dict(a.state_dict())
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(b(x), a((x - 0.2) / 0.5), atol=1e-6)
    with pytest.raises(ModelError, match="std > 0"):
        e2kd.get_model_builder("small_resnet", widths=[4], mean=[0.0], std=[0.0]).build(3)
