"""Every similarity against a hand computation on tiny tensors."""

import math

import pytest
import torch

import e2kd

A = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
B = torch.tensor([[2.0, 1.0, 4.0, 3.0]])


def _sim(name, **options):
    return e2kd.get_similarity(name, **options)


def test_cosine_by_hand():
    expected = (2 + 2 + 12 + 12) / (math.sqrt(30) * math.sqrt(30))
    assert _sim("cosine")(A, B).item() == pytest.approx(expected)


def test_pearson_by_hand():
    # centred: a = (-1.5, -0.5, 0.5, 1.5), b = (-0.5, -1.5, 1.5, 0.5): sum ab = 0.75 + 0.75 + 0.75 + 0.75 = 3, |a|^2 = |b|^2 = 5
    assert _sim("pearson")(A, B).item() == pytest.approx(3 / 5)


def test_spearman_by_hand():
    a = torch.tensor([[10.0, 20.0, 30.0, 40.0, 50.0]])
    b = torch.tensor([[1.0, 3.0, 2.0, 5.0, 4.0]])
    d2 = 0 + 1 + 1 + 1 + 1  # rank differences squared
    n = 5
    assert _sim("spearman")(a, b).item() == pytest.approx(1 - 6 * d2 / (n * (n * n - 1)))
    # rank-based: any monotone transform leaves it unchanged
    assert _sim("spearman")(a.exp(), b).item() == pytest.approx(_sim("spearman")(a, b).item())


def test_l1_l2_by_hand():
    p, q = A / 10, B / 10
    assert _sim("l1")(A, B).item() == pytest.approx(float((p - q).abs().sum()))
    assert _sim("l1")(A, B).item() == pytest.approx(0.4)
    assert _sim("l2")(A, B).item() == pytest.approx(math.sqrt(4 * 0.01))
    assert _sim("l1")(A, 3 * A).item() == pytest.approx(0.0, abs=1e-7)  # scale-invariant


def test_jsd_by_hand():
    """Maps are scaled to unit maximum |value| before the softmax: [c, 0] -> [1, 0] for any c > 0."""
    a, b = torch.tensor([[0.0, 0.0]]), torch.tensor([[2.0, 0.0]])
    p, q = [0.5, 0.5], [math.e / (1 + math.e), 1 / (1 + math.e)]
    m = [(x + y) / 2 for x, y in zip(p, q)]
    kl = lambda u, v: sum(x * math.log(x / y) for x, y in zip(u, v))  # noqa: E731
    assert _sim("jsd")(a, b).item() == pytest.approx(0.5 * kl(p, m) + 0.5 * kl(q, m))
    # temperature 2 halves the (normalised) logits
    q2 = [math.exp(0.5) / (1 + math.exp(0.5)), 1 / (1 + math.exp(0.5))]
    m2 = [(x + y) / 2 for x, y in zip(p, q2)]
    assert _sim("jsd", temperature=2.0)(a, b).item() == pytest.approx(0.5 * kl(p, m2) + 0.5 * kl(q2, m2), rel=1e-5)


def test_softmax_similarity_ignores_the_scale_of_the_maps():
    """Grad-CAM values are ~1e-2: without scale normalisation a softmax would see near-uniform maps."""
    torch.manual_seed(0)
    a, b = torch.rand(4, 1, 6, 6), torch.rand(4, 1, 6, 6)
    jsd = _sim("jsd")
    reference = jsd(a, b)
    for scale in (1e-2, 1e2):
        torch.testing.assert_close(jsd(scale * a, scale * b), reference)
    assert (reference > 1e-3).all()  # a real signal at scale 1e-2 too, not ~0 as for near-uniform softmaxes


def test_ssim_whole_image_window_by_hand():
    a = torch.tensor([[[[0.0, 1.0], [0.5, 0.25]]]])
    b = torch.tensor([[[[0.0, 0.8], [1.0, 0.2]]]])
    x, y = a.flatten().tolist(), b.flatten().tolist()
    mx, my = sum(x) / 4, sum(y) / 4
    vx = sum((v - mx) ** 2 for v in x) / 4
    vy = sum((v - my) ** 2 for v in y) / 4
    cov = sum((u - mx) * (v - my) for u, v in zip(x, y)) / 4
    c1, c2 = 0.01**2, 0.03**2
    expected = (2 * mx * my + c1) * (2 * cov + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    assert _sim("ssim", window=2, normalise=False)(a, b).item() == pytest.approx(expected, rel=1e-5)
    assert _sim("ssim")(a, a).item() == pytest.approx(1.0)


def test_topk_overlap_by_hand():
    a = torch.tensor([[9.0, 8.0, 1.0, 0.0, 7.0, 2.0, 3.0, 4.0, 5.0, 6.0]])
    b = torch.tensor([[9.0, 0.0, 8.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]])
    # top 30% = 3 pixels: a -> {0, 1, 4}, b -> {0, 2, 9}; IoU = 1 / 5
    assert _sim("topk_overlap", percent=30)(a, b).item() == pytest.approx(1 / 5)


def test_distiller_refuses_non_differentiable_similarity():
    from e2kd.distill import Distiller
    from e2kd.errors import PluginError

    with pytest.raises(PluginError, match="similarity 'spearman' is not differentiable"):
        Distiller(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2), explainer=e2kd.get_explainer("gradcam"),
                  similarity=e2kd.get_similarity("spearman"), lam=1.0)
