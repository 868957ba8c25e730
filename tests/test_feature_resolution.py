"""Similarities at the explainer's feature resolution: exactly the upsampled path's values and gradients."""

import pytest
import timm
import torch
import torch.nn.functional as F

import e2kd
from e2kd.distill import Distiller
from e2kd.explaining import explained_forward
from e2kd.upsampling import centred, interpolation_matrix, upsample, upsampled_inner, upsampled_sum

SHAPES = [
    ((7, 7), (7, 7), (224, 224)),
    ((7, 5), (14, 9), (61, 48)),
    ((7, 7), (224, 224), (224, 224)),
    ((224, 224), (7, 7), (224, 224)),
    ((3, 3), (3, 3), (3, 3)),
]


@pytest.mark.parametrize("a_size, b_size, size", SHAPES)
def test_inner_products_and_sums_equal_those_of_the_upsampled_maps(a_size, b_size, size):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 2, *a_size, dtype=torch.float64, generator=g)
    b = torch.randn(3, 2, *b_size, dtype=torch.float64, generator=g)
    up_a, up_b = (
        F.interpolate(m, size=size, mode="bilinear", align_corners=False) if m.shape[-2:] != size else m for m in (a, b)
    )
    torch.testing.assert_close(upsampled_inner(a, b, size), (up_a * up_b).flatten(1).sum(1), rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(upsampled_sum(a, size), up_a.flatten(1).sum(1), rtol=1e-12, atol=1e-9)
    # centring before upsampling = centring after it (rows of the interpolation matrix sum to 1)
    torch.testing.assert_close(
        upsample(centred(a, size), size).mean(dim=(1, 2, 3)), torch.zeros(3, dtype=torch.float64), rtol=0, atol=1e-12
    )


def test_interpolation_matrix_is_linear_interpolation_by_hand():
    # 2 -> 4 pixels, align_corners=False: source coordinate (i + 0.5) / 2 - 0.5, clamped at 0
    expected = torch.tensor([[1.0, 0.0], [0.75, 0.25], [0.25, 0.75], [0.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(interpolation_matrix(2, 4, torch.device("cpu"), torch.float64), expected)


def test_mismatched_maps_are_refused_with_the_shapes():
    with pytest.raises(ValueError, match="1 and 2 channels"):
        upsampled_inner(torch.rand(1, 1, 2, 2), torch.rand(1, 2, 2, 2), (4, 4))
    with pytest.raises(ValueError, match=r"no larger than \(4, 4\)"):
        upsampled_inner(torch.rand(1, 1, 8, 8), torch.rand(1, 1, 2, 2), (4, 4))


def test_an_all_zero_student_map_gives_zero_similarity_and_a_finite_gradient():
    cosine = e2kd.get_similarity("cosine")
    a = torch.zeros(2, 1, 7, 7, requires_grad=True)
    b = torch.rand(2, 1, 7, 7)
    value = cosine.upsampled(a, b, (224, 224))
    assert torch.equal(value, torch.zeros(2))
    (grad,) = torch.autograd.grad(value.sum(), a)
    assert torch.isfinite(grad).all()


def _pair(arch: str, dtype=torch.float64):
    torch.manual_seed(0)
    teacher = timm.create_model(arch, pretrained=False, num_classes=5, **VIT.get(arch, {})).to(dtype)
    student = timm.create_model(arch, pretrained=False, num_classes=5, **VIT.get(arch, {})).to(dtype)
    return teacher, student.eval()  # eval: the loss is a plain function of the weights


VIT = {"vit_tiny_patch16_224": dict(img_size=32, patch_size=8, embed_dim=16, depth=3, num_heads=2)}


@pytest.mark.parametrize("arch", ["resnet18", "vit_tiny_patch16_224"])
@pytest.mark.parametrize("similarity", ["cosine", "pearson"])
@pytest.mark.parametrize("explain_classes", ["top1", "topk"])
def test_distiller_loss_and_gradients_equal_the_upsampled_path(arch, similarity, explain_classes):
    teacher, student = _pair(arch)
    x = torch.rand(3, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    kw = dict(
        explainer=e2kd.get_explainer("gradcam"),
        similarity=e2kd.get_similarity(similarity),
        lam=2.0,
        explain_classes=explain_classes,
    )
    fast, slow = Distiller(teacher, student, **kw), Distiller(teacher, student, feature_resolution=False, **kw)
    assert fast.at_feature_resolution and not slow.at_feature_resolution
    params = [p for p in student.parameters() if p.requires_grad]
    results = []
    for distiller in (fast, slow):
        out = distiller(x)
        results.append((out["explanation"], torch.autograd.grad(out["loss"], params)))
    (e_fast, g_fast), (e_slow, g_slow) = results
    assert e_slow.item() > 1e-3  # a real term, not a trivially equal zero
    torch.testing.assert_close(e_fast, e_slow, rtol=1e-10, atol=1e-12)
    for a, b in zip(g_fast, g_slow):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)


def test_the_shortcut_hands_both_maps_over_at_feature_resolution(monkeypatch):
    """What makes it fast: no 32 x 32 map is formed for teacher or student (resnet18: 1 x 1 at
    layer4 of a 32 px image), and the similarity gets the image size to upsample to."""
    teacher, student = _pair("resnet18")
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    cosine = e2kd.get_similarity("cosine")
    seen = []
    real = type(cosine).upsampled
    monkeypatch.setattr(
        type(cosine),
        "upsampled",
        lambda self, a, b, size: seen.append((a.shape, b.shape, size)) or real(self, a, b, size),
    )
    Distiller(teacher, student, explainer=e2kd.get_explainer("gradcam"), similarity=cosine)(x)
    assert seen == [((2, 1, 1, 1), (2, 1, 1, 1), (32, 32))]


def test_frozen_teacher_replayed_at_input_resolution_gives_the_same_loss_and_gradient():
    teacher, student = _pair("resnet18")
    x = torch.rand(3, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    explainer, cosine = e2kd.get_explainer("gradcam"), e2kd.get_similarity("cosine")
    logits, maps, _ = explained_forward(teacher, x, explainer)  # what the cache stores: 32 x 32 maps
    assert maps.shape[-2:] == (32, 32)
    params = [p for p in student.parameters() if p.requires_grad]
    results = []
    for feature_resolution in (True, False):
        replay = Distiller(None, student, explainer=explainer, similarity=cosine, feature_resolution=feature_resolution)
        out = replay(x, teacher_logits=logits, teacher_maps=maps[:, 0])
        results.append((out["loss"], torch.autograd.grad(out["loss"], params)))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-10, atol=1e-12)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize(
    "explainer, similarity, option",
    [
        ("gradcam", "l2", True),  # the similarity does not declare it
        ({"name": "gradcam", "upsample": False}, "cosine", True),  # the map is not upsampled at all
        ("gradcam", "cosine", False),  # switched off
    ],
)
def test_the_upsampled_path_is_kept_where_the_shortcut_does_not_apply(explainer, similarity, option):
    teacher, student = _pair("resnet18", torch.float32)
    if isinstance(explainer, dict):  # (a copy: the parameter is shared by every run of the test)
        options = dict(explainer)
        explainer = e2kd.get_explainer(options.pop("name"), **options)
    else:
        explainer = e2kd.get_explainer(explainer)
    distiller = Distiller(
        teacher, student, explainer=explainer, similarity=e2kd.get_similarity(similarity), feature_resolution=option
    )
    assert not distiller.at_feature_resolution


def test_config_switch_reaches_the_distiller():
    from e2kd.config import ExperimentConfig
    from e2kd.experiment import make_distiller
    from e2kd.plan import plan_run

    teacher, student = _pair("resnet18", torch.float32)
    for value in (True, False):
        config = ExperimentConfig.model_validate({"distill": {"feature_resolution": value}})
        assert make_distiller(plan_run(config, "distill"), teacher, student).at_feature_resolution is value


@pytest.mark.parametrize(
    "low, size", [((24, 5), (24, 20)), ((3, 20), (24, 20)), ((6, 5), (24, 20)), ((24, 20), (24, 20))]
)
def test_upsampled_sum_when_one_side_is_already_at_size(low, size):
    """The sum of the upsampled map computed from the small one, with one side (or none) resized."""
    from e2kd.upsampling import upsample, upsampled_sum

    a = torch.rand(2, 3, *low, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    # float64 throughout: interpolation weights of another precision would show at 1e-12
    torch.testing.assert_close(upsampled_sum(a, size), upsample(a, size).flatten(1).sum(1), rtol=1e-12, atol=1e-12)
    assert upsampled_sum(a.float(), size).dtype == torch.float32  # the maps' precision, not the weights


def test_maps_larger_than_the_size_or_of_other_channels_are_refused():
    from e2kd.upsampling import upsampled_inner, upsampled_sum

    with pytest.raises(ValueError, match=r"no larger than \(24, 20\), got \(1, 1, 4, 30\)"):
        upsampled_sum(torch.zeros(1, 1, 4, 30), (24, 20))  # wider only
    with pytest.raises(ValueError, match=r"got \(1, 1, 30, 4\)"):
        upsampled_sum(torch.zeros(1, 1, 30, 4), (24, 20))  # taller only
    with pytest.raises(ValueError, match=r"^maps with 1 and 3 channels cannot be compared$"):
        upsampled_inner(torch.zeros(1, 1, 4, 4), torch.zeros(1, 3, 6, 6), (24, 20))
