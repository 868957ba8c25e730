import pytest
import timm
import torch
from captum.attr import LayerAttribution, LayerGradCam

import e2kd
from e2kd.errors import ModelError


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return timm.create_model("resnet18", pretrained=False, num_classes=5).eval()


def _captum_map(model, x, target, size):
    ref = LayerGradCam(model, model.layer4).attribute(
        x, target=target, relu_attributions=True, grad_kwargs={"create_graph": True}
    )
    return LayerAttribution.interpolate(ref, size, "bilinear")


def test_matches_captum_layergradcam_on_timm_resnet(resnet):
    x = torch.randn(3, 3, 96, 96)
    target = torch.tensor([0, 3, 1])
    ours = e2kd.get_explainer("gradcam").explain(resnet, x, target)
    ref = _captum_map(resnet, x, target, (96, 96)).detach()
    assert ours.shape == (3, 1, 96, 96)
    assert ref.abs().max() > 0
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-7)


def test_trainable_map_and_its_gradient_match_captum(resnet):
    """The student path (create_graph=True) gives captum's map and captum's second-order gradient."""
    x = torch.randn(2, 3, 64, 64)
    target = torch.tensor([2, 4])
    explainer = e2kd.get_explainer("gradcam", layer="layer4")
    with explainer.capture(resnet, x, trainable=True) as cap:
        logits = resnet(cap.inputs)
    ours = cap.explain(logits, target, create_graph=True)
    ref = _captum_map(resnet, x, target, (64, 64))
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-7)
    # timm zero-initialises the last BN of each block, so pick parameters with non-zero gradients
    params = [resnet.fc.weight, resnet.layer4[1].bn2.weight, resnet.layer4[0].downsample[0].weight]
    g_ours = torch.autograd.grad((ours**2).sum(), params)
    g_ref = torch.autograd.grad((ref**2).sum(), params)
    for a, b in zip(g_ours, g_ref):
        assert a.abs().max() > 0
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-9)


def test_default_layer_is_last_feature_stage(resnet):
    x = torch.randn(1, 3, 64, 64)
    default = e2kd.get_explainer("gradcam").explain(resnet, x, 1)
    explicit = e2kd.get_explainer("gradcam", layer="layer4").explain(resnet, x, 1)
    assert torch.equal(default, explicit)


def test_signed_and_low_resolution_options(resnet):
    x = torch.randn(2, 3, 64, 64)
    signed = e2kd.get_explainer("gradcam", relu=False, upsample=False).explain(resnet, x, 0)
    positive = e2kd.get_explainer("gradcam", upsample=False).explain(resnet, x, 0)
    assert signed.shape == (2, 1, 2, 2)
    torch.testing.assert_close(positive, signed.clamp(min=0))


def test_hooks_are_released_even_on_error(resnet):
    explainer = e2kd.get_explainer("gradcam")
    x = torch.randn(1, 3, 32, 32)
    with explainer.capture(resnet, x) as cap:
        resnet(cap.inputs)
    assert not resnet.layer4._forward_hooks
    with pytest.raises(RuntimeError, match="boom"):
        with explainer.capture(resnet, x):
            raise RuntimeError("boom")
    assert not resnet.layer4._forward_hooks


def test_missing_layer_is_a_one_line_error(resnet):
    explainer = e2kd.get_explainer("gradcam", layer="layer5")
    with pytest.raises(ModelError, match=r"no layer 'layer5'; did you mean 'layer\d'") as info:
        explainer.check_model(resnet)
    assert "\n" not in str(info.value)


def test_model_without_feature_info_needs_a_layer():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(2))
    with pytest.raises(ModelError, match="set option 'layer'"):
        e2kd.get_explainer("gradcam").check_model(model)


def test_non_feature_map_layer_is_refused():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 2))
    with pytest.raises(ModelError, match="expected a \\(B, C, h, w\\) feature map"):
        e2kd.get_explainer("gradcam", layer="1").explain(model, torch.randn(1, 3, 2, 2), 0)


def test_closed_form_equals_autograd_in_value_and_second_order_gradient():
    """CAM = ReLU(W_c . A) / (h w) for a timm ResNet at layer4: the autograd map and its gradient
    w.r.t. every student parameter, without autograd.grad."""
    from e2kd.distill import Distiller

    torch.manual_seed(0)
    teacher = timm.create_model("resnet18", pretrained=False, num_classes=5).double()
    student = timm.create_model("resnet18", pretrained=False, num_classes=5).double().eval()
    x = torch.rand(3, 3, 64, 96, dtype=torch.float64)  # a 2 x 3 feature map: h and w differ
    grads, losses = {}, {}
    for closed in (False, True):
        torch.testing.assert_close(
            e2kd.get_explainer("gradcam", closed_form=closed).explain(teacher, x, 2),
            e2kd.get_explainer("gradcam").explain(teacher, x, 2),
        )
        # signed maps in the loss, so no ReLU can make the gradients trivially zero
        explainer = e2kd.get_explainer("gradcam", closed_form=closed, relu=False)
        distiller = Distiller(teacher, student, explainer=explainer, similarity=e2kd.get_similarity("cosine"), lam=1.0)
        student.zero_grad()
        out = distiller(x)
        out["explanation"].backward()
        losses[closed] = out["explanation"].item()
        grads[closed] = [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in student.parameters()]
    assert losses[True] == pytest.approx(losses[False], rel=1e-12) and losses[True] > 0
    for a, b in zip(grads[False], grads[True]):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12)
    named = [n for n, _ in student.named_parameters()]
    assert grads[True][named.index("fc.weight")].abs().sum() > 0  # the classifier weights: the gradient through W_c
    assert grads[True][named.index("conv1.weight")].abs().sum() > 0  # and the features


def test_closed_form_is_refused_where_it_would_be_wrong():
    from e2kd.testing import TinyCNN

    closed = e2kd.get_explainer("gradcam", closed_form=True)
    prefix = "gradcam: closed_form needs a global-average-pool + linear head right after the layer ("
    with pytest.raises(ModelError) as error:
        closed.check_model(TinyCNN())
    assert str(error.value) == (
        prefix + "no linear classifier (get_classifier()); global pooling None, not 'avg' "
        "in TinyCNN); set closed_form: false"
    )
    with pytest.raises(ModelError) as error:
        closed.check_model(timm.create_model("resnet18", pretrained=False, num_classes=3, drop_rate=0.3))
    assert str(error.value) == prefix + "dropout 0.3 before the classifier in ResNet); set closed_form: false"
    with pytest.raises(ModelError) as error:
        e2kd.get_explainer("gradcam", closed_form=True, layer="layer3").check_model(
            timm.create_model("resnet18", pretrained=False, num_classes=3)
        )
    assert (
        str(error.value)
        == prefix + "the layer is not the last feature stage 'layer4' in ResNet); set closed_form: false"
    )
    vit = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        num_classes=3,
        img_size=8,
        patch_size=4,
        embed_dim=16,
        depth=2,
        num_heads=2,
    )
    with pytest.raises(ModelError, match=r"the layer is not the last feature stage .* in VisionTransformer\)"):
        closed.check_model(vit)


def test_token_grid_of_vision_transformer_like_models():
    from types import SimpleNamespace

    from e2kd_plugins.explainers.gradcam import _token_grid

    embed = SimpleNamespace(grid_size=(2, 3))
    assert _token_grid(SimpleNamespace(patch_embed=embed, blocks=[])) == (1, (2, 3))  # one class token by default
    assert _token_grid(SimpleNamespace(patch_embed=embed, blocks=[], num_prefix_tokens=5)) == (5, (2, 3))
    assert _token_grid(SimpleNamespace(patch_embed=embed)) is None  # no blocks
    assert _token_grid(SimpleNamespace(patch_embed=SimpleNamespace(), blocks=[])) is None  # no grid
    assert _token_grid(SimpleNamespace(blocks=[])) is None


def test_a_vision_transformer_without_feature_info_is_checked_at_its_default_layer():
    vit = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        num_classes=3,
        img_size=8,
        patch_size=4,
        embed_dim=16,
        depth=3,
        num_heads=2,
    )
    del vit.feature_info
    e2kd.get_explainer("gradcam").check_model(vit)  # blocks.1, before the last token mixing
    assert e2kd.get_explainer("gradcam").explain(vit, torch.rand(1, 3, 8, 8), 0).abs().sum() > 0


def test_closed_form_on_a_model_without_feature_stages_names_the_layer():
    from e2kd_plugins.explainers.gradcam import _linear_head

    class Pooled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.feat = torch.nn.Conv2d(3, 4, 3)
            self.global_pool = torch.nn.Module()
            self.global_pool.pool_type = "avg"
            self.fc = torch.nn.Linear(4, 2)

        def get_classifier(self):
            return self.fc

    with pytest.raises(ModelError) as error:
        _linear_head(Pooled(), "feat")
    assert str(error.value) == (
        "gradcam: closed_form needs a global-average-pool + linear head right after the "
        "layer (the layer is not the last feature stage None in Pooled); set closed_form: false"
    )
