"""B-cos-v2 checkpoints from the `bcos` package load into e2kd's bcos_v2_* models unchanged."""

import pytest
import torch

import e2kd
from e2kd.models import build_model

from .conftest import dev_extra

bcos_densenet = dev_extra("bcos.models.densenet")
bcos_resnet = dev_extra("bcos.models.resnet")


@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "densenet121"])
def test_bcos_package_state_dict_gives_same_logits_and_weights(tmp_path, arch):
    torch.manual_seed(0)
    module = bcos_densenet if arch.startswith("densenet") else bcos_resnet
    ref = getattr(module, arch)(pretrained=False, num_classes=10).double().eval()
    path = tmp_path / "bcos.pt"
    torch.save(ref.state_dict(), path)
    ours = build_model(f"bcos_v2_{arch}", {}, 10, checkpoint=path).double().eval()  # strict load from a file
    x = torch.rand(2, 3, 64, 64, dtype=torch.float64)
    encoded = torch.cat([x, 1 - x], dim=1)  # the package expects the encoded 6-channel input
    torch.testing.assert_close(ours(x), ref(encoded))
    leaf = encoded.clone().requires_grad_(True)
    with ref.explanation_mode():  # the package's own W(x)
        ref(leaf)[:, 3].sum().backward()
    torch.testing.assert_close(e2kd.get_explainer("bcos").explain(ours, x, 3), leaf.grad)


def test_bcos_package_simple_vit_state_dict_gives_same_logits_and_weights(tmp_path):
    import warnings

    dev_extra("einops")
    from bcos.models.pretrained import simple_vit_ti_patch16_224

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = (
            simple_vit_ti_patch16_224(pretrained=False, num_classes=10).double().eval()
        )  # B-cos config, random weights
    path = tmp_path / "vit.pt"
    torch.save(ref.state_dict(), path)
    ours = build_model("bcos_v2_simple_vit_ti", {"logit_bias": ref[1].logit_bias}, 10, checkpoint=path).double().eval()
    x = torch.rand(2, 3, 224, 224, dtype=torch.float64)
    encoded = torch.cat([x, 1 - x], dim=1)
    torch.testing.assert_close(ours(x), ref(encoded))
    leaf = encoded.clone().requires_grad_(True)
    with ref.explanation_mode():
        ref(leaf)[:, 3].sum().backward()
    torch.testing.assert_close(e2kd.get_explainer("bcos").explain(ours, x, 3), leaf.grad)
