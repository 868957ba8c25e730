"""e2kd's own B-cos layers and explanation against formulas written out by hand, one output at a time,
and the property that makes B-cos networks explainable: the logit is the sum of the contribution map
(dynamic linearity), for the ResNet, DenseNet and ViT builders."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from e2kd.registry import isolated_registry
from e2kd_plugins.bcos.layers import (
    BcosConv2d,
    BcosLinear,
    DynamicLayerNorm,
    DynamicMatmul,
    LogitBias,
    UncenteredBatchNorm2d,
    dynamic_mul,
    explanation_mode,
)
from e2kd_plugins.bcos.vit import Attention, Block

REGISTRY = isolated_registry()


def _bcos_by_hand(patch: torch.Tensor, weight: torch.Tensor, b: float, eps: float) -> torch.Tensor:
    """One output of a B-cos unit: (w.x) |cos|^(B-1) scaled by ||x||, w of unit norm."""
    w = weight.flatten() / weight.flatten().norm()
    linear = float((w @ patch.flatten()).detach())
    norm = math.sqrt(float((patch.flatten() @ patch.flatten()).detach()) + eps)
    return torch.tensor(linear * abs(linear / norm) ** (b - 1), dtype=torch.float64)


@pytest.mark.parametrize("b, stride, padding", [(2.0, 1, 0), (3.0, 2, 1), (1.0, 1, 1), (2.0, 2, 1)])
def test_bcos_conv_by_hand_at_every_output(b, stride, padding):
    torch.manual_seed(0)
    conv = BcosConv2d(2, 3, kernel_size=3, stride=stride, padding=padding, b=b).double()
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64)
    out = conv(x)
    padded = F.pad(x, (padding,) * 4)
    for o in range(3):
        for i in range(out.shape[2]):
            for j in range(out.shape[3]):
                patch = padded[0, :, i * stride : i * stride + 3, j * stride : j * stride + 3]
                want = (
                    _bcos_by_hand(patch, conv.weight[o], b, conv.eps)
                    if b != 1
                    else (conv.weight[o].flatten() / conv.weight[o].flatten().norm()) @ patch.flatten()
                )
                torch.testing.assert_close(out[0, o, i, j], want)
    assert "ones" not in conv.state_dict() and set(conv.state_dict()) == {"weight"}


def test_bcos_conv_defaults_are_a_1x1_unit_with_b_2():
    conv = BcosConv2d(4, 2)
    assert (conv.weight.shape, conv.stride, conv.padding, conv.b, conv.eps) == ((2, 4, 1, 1), 1, 0, 2.0, 1e-6)
    x = torch.zeros(1, 4, 2, 2, dtype=torch.float32)
    assert torch.equal(conv(x), torch.zeros(1, 2, 2, 2))  # the eps keeps a zero input finite


def test_bcos_linear_by_hand():
    torch.manual_seed(1)
    layer = BcosLinear(4, 3).double()
    x = torch.randn(2, 5, 4, dtype=torch.float64)
    out = layer(x)
    assert layer.eps == 1e-6 and out.shape == (2, 5, 3)
    for n in range(2):
        for t in range(5):
            for o in range(3):
                torch.testing.assert_close(out[n, t, o], _bcos_by_hand(x[n, t], layer.weight[o], 2.0, layer.eps))


def test_uncentred_batch_norm_by_hand_in_training_and_eval():
    norm = UncenteredBatchNorm2d(2).double()
    assert (norm.momentum, norm.eps) == (0.1, 1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([2.0, 0.5]))
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    second = x.pow(2).mean(dim=(0, 2, 3))
    out = norm.train()(x)
    torch.testing.assert_close(out, x * (norm.weight / (second + 1e-5).sqrt()).view(1, 2, 1, 1))
    torch.testing.assert_close(norm.running_var, 0.9 * torch.ones(2, dtype=torch.float64) + 0.1 * second)
    assert norm.running_var.dtype == torch.float64
    out = norm.eval()(x)
    torch.testing.assert_close(out, x * (norm.weight / (norm.running_var + 1e-5).sqrt()).view(1, 2, 1, 1))


def test_logit_bias_is_minus_log_of_the_other_classes():
    assert LogitBias(1000).value == pytest.approx(-math.log(999))
    assert LogitBias(2).value == 0.0 and LogitBias(1).value == 0.0
    assert torch.equal(LogitBias(3)(torch.zeros(1, 3)), torch.full((1, 3), -math.log(2)))


def test_dynamic_layer_norm_by_hand():
    norm = DynamicLayerNorm(4).double()
    assert norm.eps == 1e-6
    x = torch.tensor([[1.0, 2.0, 3.0, 6.0]], dtype=torch.float64)
    centred = x - 3.0
    torch.testing.assert_close(norm(x), centred / (centred.pow(2).mean() + 1e-6).sqrt())


def test_dynamic_products_have_the_plain_gradient_outside_explanation_mode_and_constant_factors_inside():
    g = torch.Generator().manual_seed(3)
    linear = torch.randn(2, 3, 4, dtype=torch.float64, generator=g, requires_grad=True)
    factor = torch.randn(1, 3, 1, dtype=torch.float64, generator=g, requires_grad=True)  # broadcast
    upstream = torch.randn(2, 3, 4, dtype=torch.float64, generator=g)
    got = torch.autograd.grad((dynamic_mul(linear, factor) * upstream).sum(), (linear, factor))
    want = torch.autograd.grad((linear * factor * upstream).sum(), (linear, factor))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    with explanation_mode():
        (only,) = torch.autograd.grad((dynamic_mul(linear, factor) * upstream).sum(), linear)
        assert torch.autograd.grad((dynamic_mul(linear, factor) * upstream).sum(), factor, allow_unused=True)[0] is None
    torch.testing.assert_close(only, factor.detach() * upstream)
    weights = torch.randn(2, 3, 4, 5, dtype=torch.float64, generator=g, requires_grad=True)
    values = torch.randn(2, 3, 5, 6, dtype=torch.float64, generator=g, requires_grad=True)
    upstream = torch.randn(2, 3, 4, 6, dtype=torch.float64, generator=g)
    got = torch.autograd.grad((DynamicMatmul.apply(weights, values) * upstream).sum(), (weights, values))
    want = torch.autograd.grad(((weights @ values) * upstream).sum(), (weights, values))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    with explanation_mode():
        grads = torch.autograd.grad(
            (DynamicMatmul.apply(weights, values) * upstream).sum(), (weights, values), allow_unused=True
        )
    assert grads[0] is None
    torch.testing.assert_close(grads[1], want[1])


def test_vit_attention_and_block_by_hand():
    torch.manual_seed(4)
    attention = Attention(8, 2).double()
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    q, k, v = attention.qkv(x).reshape(2, 3, 3, 2, 4).permute(2, 0, 3, 1, 4)
    probs = torch.softmax(q @ k.transpose(-2, -1) / 2.0, dim=-1)  # head_dim 4: scale 1 / sqrt(4)
    mixed = (probs @ v).transpose(1, 2).reshape(2, 3, 8)
    torch.testing.assert_close(attention(x), attention.proj(mixed))
    block = Block(8, 2).double()
    assert block.mlp[0].weight.shape == (32, 8)
    h = x + block.attn(block.norm1(x))
    torch.testing.assert_close(block(x), h + block.mlp(block.norm2(h)))


@pytest.mark.parametrize(
    "name, options, size",
    [
        ("bcos_small", {"widths": [4, 6]}, 16),
        ("bcos_densenet121", {"small_input": True, "growth": 4, "init": 8}, 8),
        ("bcos_vit_tiny", {"img_size": 16, "patch_size": 8, "embed_dim": 12, "depth": 1, "num_heads": 2}, 16),
    ],
)
def test_the_contribution_map_sums_to_the_logit_minus_its_bias(name, options, size):
    torch.manual_seed(5)
    model = REGISTRY.create("model", name, options).build(4).double().eval()
    if hasattr(model, "pos_embed"):  # the ViT's position and class tokens add a part no input pixel explains
        with torch.no_grad():
            model.pos_embed.zero_()
            model.cls_token.zero_()
    x = torch.rand(2, 3, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    logits = model(x)
    explainer = REGISTRY.create("explainer", "bcos", {"contribution": True})
    for target in (0, 3):
        contribution = explainer.explain(model, x, target)
        assert contribution.shape == (2, 1, size, size)
        torch.testing.assert_close(contribution.sum(dim=(1, 2, 3)), logits[:, target] - model.logit_bias.value)
    weights = REGISTRY.create("explainer", "bcos").explain(model, x, 1)
    assert weights.shape == (2, 6, size, size)
    encoded = torch.cat([x, 1 - x], dim=1)
    torch.testing.assert_close((weights * encoded).sum(dim=(1, 2, 3)), logits[:, 1] - model.logit_bias.value)


def test_the_bcos_explainer_refuses_other_models_and_a_capture_never_run():
    from e2kd.errors import ModelError
    from e2kd.testing import TinyCNN

    explainer = REGISTRY.create("explainer", "bcos")
    with pytest.raises(
        ModelError,
        match=r"^bcos: TinyCNN is not a B-cos network \(needs bcos = True and one "
        r"AddInverse input encoding\); use a bcos_\* model or another explainer$",
    ):
        explainer.check_model(TinyCNN())
    unmarked = REGISTRY.create("model", "bcos_small", {"widths": [4]}).build(3)
    unmarked.bcos = False
    with pytest.raises(ModelError, match="is not a B-cos network"):
        explainer.check_model(unmarked)
    model = REGISTRY.create("model", "bcos_small", {"widths": [4]}).build(3)
    with explainer.capture(model, torch.rand(1, 3, 8, 8)) as cap:
        with pytest.raises(RuntimeError, match=r"^bcos: the model was not run inside capture\(\)$"):
            cap.explain(torch.zeros(1, 3, requires_grad=True), torch.tensor([0]))


def test_blocks_add_their_shortcut_and_a_7x7_stem_pads_by_3():
    from e2kd_plugins.bcos.models import BasicBlock

    torch.manual_seed(7)
    block = BasicBlock(4, 6, 2).double().eval()
    x = torch.rand(1, 4, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(block(x), block.body(x) + block.shortcut(x))
    model = REGISTRY.create("model", "bcos_resnet18", {}).build(3)
    assert model.stem[0][0].padding == 3 and model.stem[1][0].padding == 1
    seen = []
    model.stages[0].register_forward_hook(lambda m, i, o: seen.append(o.shape[-1]))
    model.eval()(torch.rand(1, 3, 66, 66))
    assert seen == [17]  # 66 -> 33 (7x7/2, padding 3) -> 17 (3x3/2, padding 1)


def test_bcos_units_normalise_weights_of_any_norm():
    torch.manual_seed(8)
    conv = BcosConv2d(2, 1, kernel_size=1).double()
    with torch.no_grad():
        conv.weight.mul_(1e-3 / conv.weight.norm())  # a norm far below 1
    x = torch.rand(1, 2, 1, 1, dtype=torch.float64)
    torch.testing.assert_close(conv(x)[0, 0, 0, 0], _bcos_by_hand(x[0, :, 0, 0], conv.weight[0], 2.0, conv.eps))


def test_dynamic_matmul_under_cpu_autocast_saves_operands_in_the_product_dtype():
    weights = torch.rand(2, 3, 3, requires_grad=True)  # float32, as a softmax under autocast
    values = torch.rand(2, 3, 4).bfloat16().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = DynamicMatmul.apply(weights, values)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert weights.grad.dtype == torch.float32 and values.grad.dtype == torch.bfloat16


def test_vit_adds_position_embeddings_and_reads_the_class_token():
    torch.manual_seed(9)
    model = (
        REGISTRY.create(
            "model", "bcos_vit_tiny", {"img_size": 16, "patch_size": 8, "embed_dim": 12, "depth": 1, "num_heads": 2}
        )
        .build(3)
        .double()
        .eval()
    )
    assert 0.01 < float(model.pos_embed.detach().std()) < 0.03  # initialised at std 0.02
    x = torch.rand(2, 3, 16, 16, dtype=torch.float64)
    tokens = model.patch_embed(model.encode(x))
    tokens = torch.cat([model.cls_token.expand(2, 1, 12), tokens], dim=1) + model.pos_embed
    want = model.logit_bias(model.head(model.norm(model.blocks(tokens))[:, 0]))
    torch.testing.assert_close(model(x), want)
    with torch.no_grad():
        model.pos_embed.add_(torch.randn_like(model.pos_embed))  # (a constant would be centred away)
    assert not torch.allclose(model(x), want)


def test_the_bcos_explainer_needs_the_bcos_flag_as_well_as_the_encoding():
    from e2kd.errors import ModelError

    model = REGISTRY.create("model", "bcos_small", {"widths": [4]}).build(3)
    del type(model).bcos  # (restored below) a network with the encoding but without the flag
    try:
        with pytest.raises(ModelError, match="is not a B-cos network"):
            REGISTRY.create("explainer", "bcos").check_model(model)
    finally:
        type(model).bcos = True


@pytest.mark.parametrize("options", [{"img_size": 30, "patch_size": 8}, {"embed_dim": 13, "num_heads": 2}])
def test_the_vit_builder_refuses_sizes_that_do_not_divide(options):
    builder = REGISTRY.create(
        "model",
        "bcos_vit_tiny",
        {"img_size": 32, "patch_size": 8, "embed_dim": 12, "depth": 1, "num_heads": 2, **options},
    )
    with pytest.raises(ValueError, match=r"^img_size must be a multiple of patch_size and embed_dim of num_heads$"):
        builder.build(3)
