"""Every metric against a hand computation; EPG and IoU also against a per-sample loop."""

import math

import pytest
import torch

import e2kd
from e2kd.api import EvalBatch
from e2kd_plugins.metrics.localisation import energy_pointing_game, epg_loop, explanation_iou, iou_loop
from e2kd_plugins.metrics.shift import overlap_cosine, shift_diagonal


def _run(name, *batches, **options):
    metric = e2kd.get_metric(name, **options)
    for batch in batches:
        metric.update(batch)
    return metric.compute()


LOGITS = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [1.0, 0.0, 2.0], [0.0, 2.0, 2.5]])
TEACHER = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
LABELS = torch.tensor([0, 1, 1, 1])


def test_accuracy_top1_and_topk():
    batch = EvalBatch(logits=LOGITS, labels=LABELS)
    assert _run("accuracy", batch) == pytest.approx(2 / 4)
    assert _run("accuracy", batch, top_k=2) == pytest.approx(3 / 4)  # sample 2: label 1 is third


def test_agreement_over_two_batches():
    b1 = EvalBatch(logits=LOGITS[:2], teacher_logits=TEACHER[:2])
    b2 = EvalBatch(logits=LOGITS[2:], teacher_logits=TEACHER[2:])
    assert _run("agreement", b1, b2) == pytest.approx(2 / 4)  # samples 0 and 2 agree


def test_kl_divergence_by_hand():
    z_s, z_t = [[1.0, 0.0]], [[0.0, 2.0]]
    p = [math.exp(0) / (1 + math.exp(2)), math.exp(2) / (1 + math.exp(2))]
    q = [math.exp(1) / (1 + math.exp(1)), 1 / (1 + math.exp(1))]
    expected = sum(a * math.log(a / b) for a, b in zip(p, q))
    assert _run("kl_divergence", EvalBatch(logits=torch.tensor(z_s), teacher_logits=torch.tensor(z_t))) == pytest.approx(expected)


def test_explanation_similarity_uses_the_named_similarity():
    a = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
    b = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]]])
    batch = EvalBatch(logits=LOGITS[:1], explanations=a, teacher_explanations=b)
    assert _run("explanation_similarity", batch) == pytest.approx(1 / math.sqrt(2))
    assert _run("explanation_similarity", batch, similarity="l1") == pytest.approx(1.0)


def test_epg_and_iou_by_hand():
    maps = torch.tensor([[[[4.0, -2.0], [1.0, 0.0]]], [[[0.0, 0.0], [0.0, 0.0]]]])
    masks = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]], [[[1.0, 0.0], [0.0, 0.0]]]])
    # sample 0: positive energy 4 + 1 = 5, inside the mask 4 -> 0.8; sample 1: no energy -> 0
    assert energy_pointing_game(maps, masks).tolist() == pytest.approx([0.8, 0.0])
    # sample 0: A+ = [4, 0, 1, 0] -> min-max [1, 0, .25, 0] -> > .5: {0}; mask {0, 1}: IoU 1/2. sample 1: empty -> 0/1 = 0
    assert explanation_iou(maps, masks).tolist() == pytest.approx([0.5, 0.0])
    batch = EvalBatch(logits=LOGITS[:2], label_explanations=maps, label_masks=masks)
    assert _run("epg", batch) == pytest.approx(0.4)
    assert _run("explanation_iou", batch) == pytest.approx(0.25)


def test_iou_constant_positive_map_divides_by_max():
    maps = torch.full((1, 1, 2, 2), 3.0)
    masks = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
    assert explanation_iou(maps, masks).item() == pytest.approx(1 / 4)  # all pixels on, one in the mask


def test_epg_and_iou_batch_native_equal_per_sample_loop():
    g = torch.Generator().manual_seed(0)
    maps = torch.randn(64, 2, 16, 16, generator=g)
    maps[:4] = 0  # degenerate samples
    maps[4:8] = maps[4:8].abs() * 0 + 1  # constant maps
    masks = (torch.rand(64, 1, 16, 16, generator=g) > 0.7).float()
    masks[8:10] = 0  # empty masks
    torch.testing.assert_close(energy_pointing_game(maps, masks), epg_loop(maps, masks))
    torch.testing.assert_close(explanation_iou(maps, masks), iou_loop(maps, masks))


def test_group_metrics_by_hand():
    logits = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    labels = torch.tensor([0, 0, 1, 1, 0, 1])
    groups = torch.tensor([0, 0, 1, 1, 1, 0])  # group == label: in distribution
    teacher = torch.tensor([[1.0, 0.0]] * 6)
    batch = EvalBatch(logits=logits, labels=labels, groups=groups, teacher_logits=teacher)
    acc = _run("group_accuracy", batch)
    # cells: (0,0): 2/2, (1,1): 1/2, (0,1): 0/1, (1,0): 1/1
    assert acc["y0_g0"] == 1.0 and acc["y1_g1"] == 0.5 and acc["y0_g1"] == 0.0 and acc["y1_g0"] == 1.0
    assert acc["worst_group"] == 0.0
    assert acc["mean_group"] == pytest.approx(2.5 / 4)
    assert acc["in_distribution"] == pytest.approx(3 / 4) and acc["out_of_distribution"] == pytest.approx(1 / 2)
    listed = _run("group_accuracy", batch, in_distribution=[0])
    assert listed["in_distribution"] == pytest.approx(3 / 3)  # cells (0,0) and (1,0)
    agree = _run("group_agreement", batch)
    assert agree["in_distribution"] == pytest.approx(3 / 4)  # teacher always says 0: samples 0, 1, 3


def test_micro_f1_by_hand():
    logits = torch.tensor([[1.0, -1.0, 2.0], [-1.0, 1.0, 1.0]])
    labels = torch.tensor([[1, 0, 0], [0, 1, 1]])
    # tp = 3 (0,0), (1,1), (1,2); fp = 1 (0,2); fn = 0 -> 6 / 7
    assert _run("micro_f1", EvalBatch(logits=logits, labels=labels)) == pytest.approx(6 / 7)


def test_shift_helpers_by_hand():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    shifted = shift_diagonal(x, 1)
    assert shifted[0, 0, 1:, 1:].tolist() == x[0, 0, :3, :3].tolist() and shifted[0, 0, 0].sum() == 0
    assert overlap_cosine(shifted, x, 1).item() == pytest.approx(1.0)


def test_shift_equivariance_of_a_perfectly_equivariant_explainer():
    """An explainer that returns the input itself moves exactly with the image: score 1 at every shift."""
    from tests.test_registry import AdHocPlugin

    e2kd.register_plugin(AdHocPlugin(), name="adhoc_shift")
    try:
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 2))
        x = torch.rand(3, 3, 8, 8)
        explainer = e2kd.get_explainer("adhoc_const")
        batch = EvalBatch(logits=model(x), images=x, explain=lambda images, t: explainer.explain(model, images, t))
        curve = _run("shift_equivariance", batch, max_shift=3)
        assert list(curve) == ["shift_0", "shift_1", "shift_2", "shift_3"]
        assert all(v == pytest.approx(1.0) for v in curve.values())
    finally:
        e2kd.unregister_plugin("adhoc_shift")


def test_missing_requirements_are_skipped_with_a_reason():
    from e2kd.evaluate import evaluate

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    batches = [{"image": torch.rand(4, 3, 2, 2), "label": torch.tensor([0, 1, 2, 0])}]
    metrics = {n: e2kd.get_metric(n) for n in ("accuracy", "agreement", "epg", "group_accuracy")}
    values, skipped = evaluate(model, batches, metrics)
    assert set(values) == {"accuracy"}
    assert skipped == {"agreement": "needs teacher", "epg": "needs label_explanations, masks", "group_accuracy": "needs groups"}
