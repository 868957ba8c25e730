"""Method-specific checks of the built-in explainers (the contract cases are in test_contracts.py)."""

import pytest
import torch
import torch.nn.functional as F

import e2kd
from e2kd.distill import Distiller
from e2kd.errors import ModelError
from e2kd.testing import TinyCNN, check_gradient


def tiny_vit(num_classes=3, img=8, depth=2):
    import timm

    return timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        num_classes=num_classes,
        img_size=img,
        patch_size=4,
        embed_dim=16,
        depth=depth,
        num_heads=2,
    )


def test_absolute_option_of_the_input_gradient_explainers():
    from captum.attr import InputXGradient, Saliency

    model = TinyCNN().double().eval()
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64) - 0.5  # signed inputs: x * grad has both signs
    target = torch.tensor([1, 2])
    ixg = e2kd.get_explainer("input_x_gradient", absolute=True).explain(model, x, target)
    torch.testing.assert_close(
        ixg, InputXGradient(model).attribute(x.clone().requires_grad_(True), target=target).abs()
    )
    signed = e2kd.get_explainer("input_x_gradient").explain(model, x, target)
    assert (signed < 0).any() and torch.equal(signed.abs(), ixg)
    saliency = e2kd.get_explainer("gradient", absolute=True).explain(model, x, target)
    torch.testing.assert_close(
        saliency, Saliency(model).attribute(x.clone().requires_grad_(True), target=target, abs=True)
    )


def test_input_x_gradient_and_gradient_match_captum():
    from captum.attr import InputXGradient, Saliency

    model = TinyCNN().eval()
    x = torch.rand(3, 3, 8, 8)
    target = torch.tensor([0, 2, 1])
    torch.testing.assert_close(
        e2kd.get_explainer("input_x_gradient").explain(model, x, target),
        InputXGradient(model).attribute(x, target=target),
    )
    torch.testing.assert_close(
        e2kd.get_explainer("gradient", absolute=True).explain(model, x, target),
        Saliency(model).attribute(x, target=target, abs=True),
    )


# ---- B-cos: the three proofs of the issue -----------------------------------------------------


@pytest.fixture
def bcos_net():
    torch.manual_seed(0)
    return e2kd.get_model_builder("bcos_small", widths=[4, 6]).build(5).double()


@pytest.mark.parametrize("train", [False, True])
def test_bcos_dynamic_linear_identity(bcos_net, train):
    """(a) logit - bias = sum(W(x) * x) per sample, for every class."""
    bcos_net.train(train)
    x = torch.rand(3, 3, 8, 8, dtype=torch.float64)
    explainer = e2kd.get_explainer("bcos")
    with explainer.capture(bcos_net, x) as cap:
        logits = bcos_net(cap.inputs)
    encoded = torch.cat([x, 1 - x], dim=1)
    for c in range(5):
        w = cap.explain(logits, torch.full((3,), c))
        assert w.shape == (3, 6, 8, 8)
        torch.testing.assert_close((w * encoded).flatten(1).sum(1), logits[:, c] - bcos_net.logit_bias.value)
    contribution = e2kd.get_explainer("bcos", contribution=True).explain(bcos_net.eval(), x, 2)
    torch.testing.assert_close(contribution.flatten(1).sum(1), bcos_net(x)[:, 2] - bcos_net.logit_bias.value)


def test_bcos_e2kd_gradient_matches_finite_differences_in_train_mode():
    """(b) the exact double backward, BatchNorm with batch statistics included."""
    torch.manual_seed(3)
    build = e2kd.get_model_builder("bcos_small", widths=[4, 6])
    teacher, student = build.build(3).double(), build.build(3).double()
    distiller = Distiller(
        teacher,
        student,
        explainer=e2kd.get_explainer("bcos"),
        similarity=e2kd.get_similarity("cosine"),
        lam=2.0,
        temperature=2.0,
    )
    x = torch.rand(4, 3, 8, 8, dtype=torch.float64)
    weights = [student.stages[1][0].body[0][0].weight, student.classifier.weight, student.stem[1].weight]
    check_gradient(lambda: distiller(x)["loss"], weights, samples=4, rel=1e-5, abs=1e-9)


def test_bcos_gradients_outside_explanation_equal_an_ordinary_network(bcos_net, monkeypatch):
    """(c) the switch only acts inside explanation_mode: training gradients are ordinary."""
    from e2kd_plugins.bcos import layers

    x = torch.rand(3, 3, 8, 8, dtype=torch.float64)
    bcos_net.train()
    params = list(bcos_net.parameters())
    ours = torch.autograd.grad((bcos_net(x) ** 2).sum(), params + [])
    state = {k: v.clone() for k, v in bcos_net.state_dict().items()}
    monkeypatch.setattr(layers, "dynamic_mul", lambda linear, factor: linear * factor)
    bcos_net.load_state_dict(state)
    plain = torch.autograd.grad((bcos_net(x) ** 2).sum(), params)
    for a, b in zip(ours, plain):
        torch.testing.assert_close(a, b)


def test_bcos_explainer_refuses_other_models_before_training():
    with pytest.raises(ModelError, match="not a B-cos network"):
        Distiller(
            TinyCNN(),
            TinyCNN(),
            explainer=e2kd.get_explainer("bcos"),
            similarity=e2kd.get_similarity("cosine"),
            lam=1.0,
        )


def test_bcos_resnets_build_and_explain():
    for name in ("bcos_resnet18", "bcos_resnet50"):
        model = e2kd.get_model_builder(name, small_input=True).build(4).eval()
        w = e2kd.get_explainer("bcos").explain(model, torch.rand(1, 3, 32, 32), 0)
        assert w.shape == (1, 6, 32, 32) and torch.isfinite(w).all()


def test_detaching_the_factor_in_the_forward_would_be_wrong(monkeypatch):
    """Why the switch is read at backward time: the `bcos` package's forward-detach gives the same
    W(x) values but a different e2KD gradient, far from the finite difference."""
    from e2kd_plugins.bcos import layers

    torch.manual_seed(3)
    build = e2kd.get_model_builder("bcos_small", widths=[4, 6])
    teacher, student = build.build(3).double().eval(), build.build(3).double().eval()
    distiller = Distiller(
        teacher, student, explainer=e2kd.get_explainer("bcos"), similarity=e2kd.get_similarity("cosine"), lam=1.0
    )
    x = torch.rand(4, 3, 8, 8, dtype=torch.float64)
    w = student.classifier.weight
    exact_value = distiller(x)["explanation"]
    exact = torch.autograd.grad(exact_value, [w])[0]
    monkeypatch.setattr(layers, "dynamic_mul", lambda linear, factor: linear * factor.detach())
    value = distiller(x)["explanation"]
    detached = torch.autograd.grad(value, [w])[0]
    assert value.item() == pytest.approx(exact_value.item(), rel=1e-12)  # same loss value
    relative_error = (detached - exact).norm() / exact.norm()
    assert relative_error > 0.1, relative_error.item()


def _baseline_by_hand(x, kind, k=3):
    """zeros, a constant, each image's channel mean, or a k x k box blur that averages only the
    pixels inside the image (k: 3 for 8 x 8 images, the shorter side / 4 made odd for larger ones)."""
    if kind == "zeros":
        return torch.zeros_like(x)
    if kind == "mean":
        return x.mean(dim=(2, 3), keepdim=True).expand_as(x)
    if kind == "blur":
        out = torch.empty_like(x)
        h, w, r = *x.shape[-2:], k // 2
        for i in range(h):
            for j in range(w):
                out[..., i, j] = x[..., max(0, i - r) : i + r + 1, max(0, j - r) : j + r + 1].mean(dim=(-2, -1))
        return out
    return torch.full_like(x, kind)


def test_blur_baseline_of_larger_images_by_hand():
    x = torch.rand(1, 3, 32, 40, dtype=torch.float64)
    explainer = e2kd.get_explainer("integrated_gradients", baseline="blur")
    with explainer.capture(TinyCNN().double(), x) as cap:
        torch.testing.assert_close(cap.baselines(), _baseline_by_hand(x, "blur", k=9))  # 32 // 4 = 8 -> 9


def test_explaining_before_the_forward_is_a_clear_error():
    vit = tiny_vit(depth=1).eval()
    with e2kd.get_explainer("rollout").capture(vit, torch.rand(1, 3, 8, 8)) as cap:
        with pytest.raises(
            RuntimeError, match=r"^rollout: no attention was recorded; run the model inside capture\(\)$"
        ):
            cap.explain(torch.zeros(1, 3), torch.tensor([0]))
    with e2kd.get_explainer("gradcam").capture(TinyCNN(), torch.rand(1, 3, 8, 8)) as cap:
        with pytest.raises(
            RuntimeError, match=r"^gradcam: layer 'feat' was not run; call the model inside capture\(\)$"
        ):
            cap.explain(torch.zeros(1, 3), torch.tensor([0]))


@pytest.mark.parametrize(
    "baseline, method",
    [("zeros", "gausslegendre"), ("mean", "gausslegendre"), (0.5, "riemann_trapezoid"), ("blur", "riemann_left")],
)
def test_integrated_gradients_trainable_mode_equals_captum(baseline, method):
    from captum.attr import IntegratedGradients

    model = TinyCNN().double().eval()
    x = torch.rand(3, 3, 8, 8, dtype=torch.float64)
    target = torch.tensor([0, 2, 1])
    explainer = e2kd.get_explainer("integrated_gradients", n_steps=8, baseline=baseline, method=method)
    with explainer.capture(model, x) as cap:
        logits = model(cap.inputs)
    ours = cap.explain(logits, target, create_graph=True)
    frozen = cap.explain(logits, target, create_graph=False)
    base = _baseline_by_hand(x, baseline)
    torch.testing.assert_close(cap.baselines(), base)
    ref = IntegratedGradients(model).attribute(x, baselines=base, target=target, n_steps=8, method=method)
    torch.testing.assert_close(ours.detach(), ref)
    torch.testing.assert_close(frozen, ref)
    assert ours.requires_grad and not frozen.requires_grad
    other = IntegratedGradients(model).attribute(x, baselines=base, target=target, n_steps=3, method=method)
    assert (other - ref).abs().max() > 1e-6  # n_steps reaches captum too


def test_integrated_gradients_keeps_batchnorm_statistics():
    model = TinyCNN(bn=True).train()
    explainer = e2kd.get_explainer("integrated_gradients", n_steps=4)
    bn = model.stem[1]
    with explainer.capture(model, torch.rand(2, 3, 8, 8)) as cap:
        logits = model(cap.inputs)
    after_forward = (bn.running_mean.clone(), bn.num_batches_tracked.item())
    cap.explain(logits, torch.tensor([0, 1]), create_graph=True)
    assert torch.equal(bn.running_mean, after_forward[0]) and bn.num_batches_tracked.item() == after_forward[1] == 1
    listed = {i.name: i.capabilities for i in e2kd.list_plugins("explainer")}
    assert listed["integrated_gradients"]["extra_forwards"] == "n_steps" and listed["gradcam"]["extra_forwards"] == 0


# ---- vision transformers -------------------------------------------------------------------------


def test_gradcam_on_timm_vit_default_layer_is_non_zero_and_matches_hand_computation():
    import timm

    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=5, img_size=64).eval()
    x = torch.randn(2, 3, 64, 64)
    maps = e2kd.get_explainer("gradcam", upsample=False).explain(vit, x, 1)
    assert maps.shape == (2, 1, 4, 4) and maps.abs().sum() > 0
    # by hand: tokens after the second-to-last block, patch tokens on the 4 x 4 grid
    store = {}
    handle = vit.blocks[10].register_forward_hook(lambda m, a, out: store.update(t=out))
    logits = vit(x)
    handle.remove()
    grads = torch.autograd.grad(logits[:, 1].sum(), store["t"])[0]
    acts, grads = (
        store["t"][:, 1:].transpose(1, 2).reshape(2, 192, 4, 4),
        grads[:, 1:].transpose(1, 2).reshape(2, 192, 4, 4),
    )
    expected = F.relu((grads.mean((2, 3), keepdim=True) * acts).sum(1, keepdim=True))
    torch.testing.assert_close(maps, expected.detach())
    # after the last token mixing only the class token reaches the head: the map is zero there
    last = e2kd.get_explainer("gradcam", layer="blocks.11").explain(vit, x, 1)
    assert last.abs().max() == 0


def _attention_probabilities(vit, x):
    """Each block's (B, heads, N, N) attention probabilities, recomputed by hand from its input."""
    inputs = []
    handles = [b.register_forward_pre_hook(lambda m, a: inputs.append(a[0])) for b in vit.blocks]
    logits = vit(x)
    for h in handles:
        h.remove()
    probs = []
    for block, tokens in zip(vit.blocks, inputs):
        attn = block.attn
        b, n, _ = tokens.shape
        qkv = attn.qkv(block.norm1(tokens)).reshape(b, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        probs.append(((qkv[0] * attn.scale) @ qkv[1].transpose(-2, -1)).softmax(-1))
    return logits, probs


@pytest.mark.parametrize("head_fusion, residual", [("mean", True), ("max", True), ("mean", False)])
def test_rollout_by_hand_through_three_blocks_and_fused_attention_restored(head_fusion, residual):
    """rollout = A_3' A_2' A_1' (the last block on the left), A' = (fuse_heads(A) + I) / 2; the class
    token's row over the patches. Three blocks, so a reversed product or a wrong fusion shows."""
    vit = tiny_vit(depth=3).double().eval()
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    fused_logits = vit(x)
    maps = e2kd.get_explainer("rollout", upsample=False, head_fusion=head_fusion, residual=residual).explain(vit, x)
    assert [b.attn.fused_attn for b in vit.blocks] == [True] * 3  # restored
    logits, probs = _attention_probabilities(vit, x)
    torch.testing.assert_close(logits, fused_logits)
    eye = torch.eye(5, dtype=torch.float64)
    product = eye
    for p in probs:
        a = p.mean(1) if head_fusion == "mean" else p.amax(1)
        product = (0.5 * (a + eye) if residual else a) @ product
    expected = product[:, 0, 1:].reshape(2, 1, 2, 2)
    torch.testing.assert_close(maps, expected)
    other_order = eye
    for p in probs:
        a = p.mean(1) if head_fusion == "mean" else p.amax(1)
        other_order = other_order @ (0.5 * (a + eye) if residual else a)
    assert (other_order[:, 0, 1:].reshape(2, 1, 2, 2) - expected).abs().max() > 1e-4  # the order matters here
    other_fusion = probs[0].amax(1) if head_fusion == "mean" else probs[0].mean(1)
    assert (other_fusion - (probs[0].mean(1) if head_fusion == "mean" else probs[0].amax(1))).abs().max() > 1e-3


def test_rollout_names_what_a_model_lacks():
    from types import SimpleNamespace

    explainer = e2kd.get_explainer("rollout")
    for model in (SimpleNamespace(blocks=[]), SimpleNamespace(patch_embed=None)):
        with pytest.raises(ModelError) as error:
            explainer.check_model(model)
        assert str(error.value) == (
            "rollout: SimpleNamespace is not a timm vision transformer (needs blocks and "
            "patch_embed); use gradcam or an input-gradient explainer"
        )


def test_rollout_refuses_a_cnn_before_training():
    with pytest.raises(ModelError, match="not a timm vision transformer"):
        Distiller(
            TinyCNN(),
            TinyCNN(),
            explainer=e2kd.get_explainer("rollout"),
            similarity=e2kd.get_similarity("cosine"),
            lam=1.0,
        )


def test_cnn_teacher_to_vit_student_with_gradcam():
    """Grad-CAM maps at input resolution let a CNN teacher guide a ViT student."""
    teacher, student = TinyCNN(), tiny_vit()
    distiller = Distiller(
        teacher, student, explainer=e2kd.get_explainer("gradcam"), similarity=e2kd.get_similarity("cosine"), lam=1.0
    )
    out = distiller(torch.rand(4, 3, 8, 8))
    out["loss"].backward()
    assert out["explanation"] > 0 and student.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def _bcos_vit(seed=0, zero_constants=False):
    torch.manual_seed(seed)
    vit = e2kd.get_model_builder("bcos_vit_tiny", img_size=8, patch_size=4, embed_dim=8, depth=2, num_heads=2).build(3)
    if zero_constants:
        with torch.no_grad():
            vit.pos_embed.zero_()
            vit.cls_token.zero_()
    return vit.double()


@pytest.mark.parametrize("name", ["densenet", "vit"])
def test_bcos_densenet_and_vit_dynamic_linear_identity(name):
    if name == "densenet":
        torch.manual_seed(0)
        model = e2kd.get_model_builder("bcos_densenet121", small_input=True, growth=4, init=8).build(3).double()
    else:  # class token and positional embeddings are additive constants: zero them for the exact identity
        model = _bcos_vit(zero_constants=True)
    model.eval()
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    explainer = e2kd.get_explainer("bcos")
    with explainer.capture(model, x) as cap:
        logits = model(cap.inputs)
    encoded = torch.cat([x, 1 - x], dim=1)
    for c in range(3):
        w = cap.explain(logits, torch.full((2,), c))
        torch.testing.assert_close((w * encoded).flatten(1).sum(1), logits[:, c] - model.logit_bias.value)


def test_bcos_cnn_teacher_to_bcos_vit_student_exact_gradient_and_training():
    torch.manual_seed(5)
    teacher = e2kd.get_model_builder("bcos_small", widths=[4, 6]).build(3).double().eval()
    student = _bcos_vit(seed=6)
    distiller = Distiller(
        teacher, student, explainer=e2kd.get_explainer("bcos"), similarity=e2kd.get_similarity("cosine"), lam=1.0
    )
    x = torch.rand(3, 3, 8, 8, dtype=torch.float64)
    weights = [student.blocks[0].attn.qkv.weight, student.patch_embed.proj.weight, student.blocks[1].norm2.weight]
    check_gradient(lambda: distiller(x)["loss"], weights, rel=1e-5, abs=1e-9)
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-2)
    first = distiller(x)["explanation"].item()
    for _ in range(5):
        out = distiller(x)
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
    assert distiller(x)["explanation"].item() < first
