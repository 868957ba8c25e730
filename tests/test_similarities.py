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
    # eps bounds |a| |b| = 5 from below: with eps = 10 the value is 3 / 10
    assert _sim("pearson", eps=10.0)(A, B).item() == pytest.approx(3 / 10)


def test_spearman_by_hand():
    a = torch.tensor([[10.0, 20.0, 30.0, 40.0, 50.0]])
    b = torch.tensor([[1.0, 3.0, 2.0, 5.0, 4.0]])
    d2 = 0 + 1 + 1 + 1 + 1  # rank differences squared
    n = 5
    assert _sim("spearman")(a, b).item() == pytest.approx(1 - 6 * d2 / (n * (n * n - 1)))
    # rank-based: any monotone transform leaves it unchanged
    assert _sim("spearman")(a.exp(), b).item() == pytest.approx(_sim("spearman")(a, b).item())


def test_spearman_with_ties_uses_average_ranks():
    """A ReLU map is mostly zeros: tied values share the mean of their ranks (Pearson of the
    average ranks, as scipy.stats.spearmanr), so the result does not depend on the pixel order."""
    from e2kd_plugins.similarities.correlation import ranks

    a = torch.tensor([[0.0, 0.0, 3.0, 0.0, 1.0]], dtype=torch.float64)
    b = torch.tensor([[2.0, 0.0, 5.0, 1.0, 1.0]], dtype=torch.float64)
    ra, rb = [1.0, 1.0, 4.0, 1.0, 3.0], [3.0, 0.0, 4.0, 1.5, 1.5]  # 0-based; ties -> mean position
    assert ranks(a).tolist() == [ra] and ranks(b).tolist() == [rb]
    ma, mb = sum(ra) / 5, sum(rb) / 5
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    expected = cov / math.sqrt(sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb))
    assert _sim("spearman")(a, b).item() == pytest.approx(expected, rel=1e-12)
    flipped = _sim("spearman")(a.flip(1), b.flip(1)).item()  # same pairs, other order
    assert flipped == pytest.approx(expected, rel=1e-12)
    assert (
        ranks(a).dtype == torch.float64
        and ranks(a.float()).dtype == ranks(torch.tensor([[1, 0]])).dtype == torch.float32
    )
    assert ranks(torch.tensor([[1, 0]])).tolist() == [[1.0, 0.0]]
    # eps guards constant maps: their correlation is 0, and a larger eps shrinks small correlations
    assert _sim("spearman")(torch.ones(1, 5), b.float()).item() == 0.0
    assert _sim("spearman", eps=100.0)(a, b).item() == pytest.approx(cov / 100.0, rel=1e-12)


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
    # temperature 2 halves the (normalised) logits of both maps: a = [0, 0.5] -> [0, 1] / 2, b -> [1, 0] / 2
    a2, b2 = torch.tensor([[0.0, 0.5]], dtype=torch.float64), b.double()
    e = math.exp(0.5)
    p2, q2 = [1 / (1 + e), e / (1 + e)], [e / (1 + e), 1 / (1 + e)]
    m2 = [(x + y) / 2 for x, y in zip(p2, q2)]
    assert _sim("jsd", temperature=2.0)(a2, b2).item() == pytest.approx(0.5 * kl(p2, m2) + 0.5 * kl(q2, m2), rel=1e-12)


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


def _ssim_by_hand(x, y, window, k1=0.01, k2=0.03):
    """Mean SSIM over every window x window position of two 2-D lists (uniform weights)."""
    h, w = len(x), len(x[0])
    values = []
    for i in range(h - window + 1):
        for j in range(w - window + 1):
            px = [x[i + u][j + v] for u in range(window) for v in range(window)]
            py = [y[i + u][j + v] for u in range(window) for v in range(window)]
            n = len(px)
            mx, my = sum(px) / n, sum(py) / n
            vx = sum((v - mx) ** 2 for v in px) / n
            vy = sum((v - my) ** 2 for v in py) / n
            cov = sum((u - mx) * (v - my) for u, v in zip(px, py)) / n
            c1, c2 = k1**2, k2**2
            values.append((2 * mx * my + c1) * (2 * cov + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    return sum(values) / len(values)


def test_ssim_sliding_window_and_normalisation_by_hand():
    """A 2 x 2 window over a 3 x 3 map: the mean over its four positions; min-max scaling first."""
    x = [[0.0, 2.0, 1.0], [4.0, 3.0, 0.5], [1.0, 1.5, 2.5]]
    y = [[1.0, 0.0, 3.0], [2.0, 4.0, 1.0], [0.0, 2.0, 3.5]]
    a, b = torch.tensor([[x]], dtype=torch.float64), torch.tensor([[y]], dtype=torch.float64)
    raw = _sim("ssim", window=2, normalise=False, k1=0.05, k2=0.1)(a, b).item()
    assert raw == pytest.approx(_ssim_by_hand(x, y, 2, 0.05, 0.1), rel=1e-9)
    assert raw != pytest.approx(_ssim_by_hand(x, y, 3, 0.05, 0.1), rel=1e-3)  # the window matters here
    # min-max scaling first: x spans [0.2, 0.7], y [1.0, 1.6] (span < 1, minimum > 0)
    x2 = [[0.2 + v / 8 for v in row] for row in x]
    y2 = [[1.0 + v * 0.15 for v in row] for row in y]
    scaled = [[v / 4.0 for v in row] for row in x], [[v / 4.0 for v in row] for row in y]
    a2, b2 = torch.tensor([[x2]], dtype=torch.float64), torch.tensor([[y2]], dtype=torch.float64)
    assert _sim("ssim", window=2)(a2, b2).item() == pytest.approx(_ssim_by_hand(*scaled, 2), rel=1e-9)


@pytest.mark.parametrize("shape", [(5, 3), (3, 5)])
def test_ssim_window_is_clipped_to_the_shorter_side(shape):
    g = torch.Generator().manual_seed(0)
    a, b = (
        torch.rand(1, 1, *shape, generator=g, dtype=torch.float64),
        torch.rand(1, 1, *shape, generator=g, dtype=torch.float64),
    )
    expected = _ssim_by_hand(a[0, 0].tolist(), b[0, 0].tolist(), 3)
    assert _sim("ssim", window=4, normalise=False)(a, b).item() == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("n, percent, k", [(4, 25, 1), (4, 10, 1), (6, 25, 2), (6, 50, 3)])
def test_topk_overlap_keeps_round_n_percent_pixels(n, percent, k):
    """k = max(1, round(n * percent / 100)): b moves a's k-th pixel to the bottom, so the top-k
    sets share k - 1 pixels of k + 1: IoU (k - 1) / (k + 1)."""
    a = torch.arange(n, 0, -1, dtype=torch.float64).view(1, 1, 1, n)  # top pixels: 0, 1, 2, ...
    b = a.clone()
    b[0, 0, 0, k - 1] = -1.0
    # a batch of two pairs, (a, b) and (a, a): each row scored on its own
    got = _sim("topk_overlap", percent=percent)(torch.cat([a, a]), torch.cat([b, a]))
    assert got.tolist() == pytest.approx([(k - 1) / (k + 1), 1.0])


def test_topk_overlap_by_hand():
    a = torch.tensor([[9.0, 8.0, 1.0, 0.0, 7.0, 2.0, 3.0, 4.0, 5.0, 6.0]])
    b = torch.tensor([[9.0, 0.0, 8.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]])
    # top 30% = 3 pixels: a -> {0, 1, 4}, b -> {0, 2, 9}; IoU = 1 / 5
    assert _sim("topk_overlap", percent=30)(a, b).item() == pytest.approx(1 / 5)


def test_distiller_refuses_non_differentiable_similarity():
    from e2kd.distill import Distiller
    from e2kd.errors import PluginError

    with pytest.raises(PluginError, match="similarity 'spearman' is not differentiable"):
        Distiller(
            torch.nn.Linear(2, 2),
            torch.nn.Linear(2, 2),
            explainer=e2kd.get_explainer("gradcam"),
            similarity=e2kd.get_similarity("spearman"),
            lam=1.0,
        )
