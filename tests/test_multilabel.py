"""Multi-label distillation and evaluation, checked against hand computations."""

import math

import pytest
import torch
import torch.nn.functional as F

import e2kd
from e2kd.distill import Distiller, binary_kd_loss
from e2kd.evaluate import evaluate
from e2kd.labels import label_loss, padded_sets
from e2kd.testing import TinyCNN


def test_binary_kd_matches_the_formula_by_hand():
    zs = [[0.3, -1.2, 2.0], [-0.5, 0.1, 25.0]]
    zt = [[1.0, -0.4, -3.0], [0.7, 0.2, 30.0]]
    for t in (1.0, 2.0):
        total = 0.0
        for row_s, row_t in zip(zs, zt):
            for a, b in zip(row_s, row_t):
                p = min(max(1 / (1 + math.exp(-b / t)), 1e-6), 1 - 1e-6)
                q = min(max(1 / (1 + math.exp(-a / t)), 1e-6), 1 - 1e-6)
                total += p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))
        expected = t * t * total / len(zs)
        got = binary_kd_loss(torch.tensor(zs, dtype=torch.float64), torch.tensor(zt, dtype=torch.float64), t)
        assert got.item() == pytest.approx(expected, rel=1e-9)
    # identical logits: zero; the clamp keeps saturated probabilities finite
    same = torch.tensor([[40.0, -40.0]])
    assert binary_kd_loss(same, same).item() == 0.0 and torch.isfinite(binary_kd_loss(-same, same))


def test_label_loss_is_bce_for_multi_hot_and_ce_for_indices():
    z = torch.tensor([[0.5, -1.0, 2.0]])
    y = torch.tensor([[1.0, 0.0, 1.0]])
    by_hand = (
        -(
            math.log(torch.sigmoid(torch.tensor(0.5)))
            + math.log(1 - torch.sigmoid(torch.tensor(-1.0)))
            + math.log(torch.sigmoid(torch.tensor(2.0)))
        )
        / 3
    )
    assert label_loss(z, y).item() == pytest.approx(by_hand, rel=1e-6)
    assert label_loss(z, torch.tensor([2])).item() == pytest.approx(F.cross_entropy(z, torch.tensor([2])).item())
    assert label_loss(z, y.long()).item() == pytest.approx(by_hand, rel=1e-6)  # integer multi-hot labels too


def test_padded_sets_list_members_first_with_zero_weight_padding():
    member = torch.tensor([[False, True, True, False], [True, False, False, False], [False, False, False, True]])
    classes, weights = padded_sets(member)
    assert classes[:, :2].tolist()[0] == [1, 2] and classes[1, 0] == 0 and classes[2, 0] == 3
    assert weights.tolist() == [[1, 1], [1, 0], [1, 0]] and weights.dtype == torch.float32
    # every set of one class: one column, no padding
    classes, weights = padded_sets(torch.tensor([[False, True, False], [True, False, False]]))
    assert classes.tolist() == [[1], [0]] and weights.tolist() == [[1.0], [1.0]]
    # members in ascending class order, whatever the row
    classes, _ = padded_sets(torch.tensor([[True, False, True, True, False, True]]))
    assert classes.tolist() == [[0, 2, 3, 5]]


def test_label_sets_of_indices_and_of_multi_hot_labels():
    from e2kd.labels import label_sets

    classes, weights = label_sets(torch.tensor([2, 0, 1]))
    assert classes.tolist() == [[2], [0], [1]] and weights.tolist() == [[1.0], [1.0], [1.0]]
    # a soft label of exactly 0.5 is not present (> 0.5)
    classes, weights = label_sets(torch.tensor([[0.5, 1.0, 0.0], [1.0, 0.0, 0.6]]))
    assert weights.tolist() == [[1.0, 0.0], [1.0, 1.0]] and classes.tolist() == [[1, 0], [0, 2]]


def test_positive_classes_explanation_term_averages_over_image_class_pairs():
    """The distiller's explanation term = mean over the (image, class) pairs the teacher predicts
    positive (its top-1 where none is), each pair computed separately by hand."""
    for seed in range(20):  # the first seed whose teacher mixes 0, 1 and 2 positive classes per image
        torch.manual_seed(seed)
        teacher, student = TinyCNN(num_classes=4, width=6).double(), TinyCNN(num_classes=4, width=4).double()
        x = torch.randn(8, 3, 8, 8, dtype=torch.float64)
        with torch.no_grad():  # class 0 positive for ~60% of the images, class 1 for ~40%, 2 and 3 never
            z = teacher(x) - teacher.fc.bias
            teacher.fc.bias.copy_(
                torch.stack(
                    [-z[:, 0].quantile(0.4), -z[:, 1].quantile(0.6), torch.tensor(-100.0), torch.tensor(-100.0)]
                )
            )
            positives = (teacher(x) > 0).sum(1)
        if {0, 1, 2} <= set(positives.tolist()):
            break
    explainer, cosine = e2kd.get_explainer("gradcam"), e2kd.get_similarity("cosine")
    distiller = Distiller(
        teacher, student, explainer=explainer, similarity=cosine, lam=0.7, kd="binary", explain_classes="positive"
    )
    out = distiller(x)
    with torch.no_grad():
        z_t = teacher(x)
    pairs = [(i, c) for i in range(8) for c in range(4) if z_t[i, c] > 0]
    none = [i for i in range(8) if not (z_t[i] > 0).any()]
    pairs += [(i, int(z_t[i].argmax())) for i in none]
    counts = {i: sum(1 for j, _ in pairs if j == i) for i in range(8)}
    assert max(counts.values()) == 2 and min(counts.values()) == 1 and none, "the example must mix set sizes"
    losses = []
    for i, c in pairs:
        s_map = explainer.explain(student, x[i : i + 1], c)
        t_map = explainer.explain(teacher, x[i : i + 1], c)
        losses.append(1 - F.cosine_similarity(s_map.flatten(1), t_map.flatten(1)).item())
    assert out["explanation"].item() == pytest.approx(sum(losses) / len(losses), rel=1e-9)
    assert out["kd"].item() == pytest.approx(binary_kd_loss(student(x), z_t).item(), rel=1e-9)
    assert out["loss"].item() == pytest.approx(out["kd"].item() + 0.7 * out["explanation"].item(), rel=1e-9)


def test_multi_label_evaluation_scores_each_present_class_against_its_mask():
    torch.manual_seed(0)
    model, teacher = TinyCNN(num_classes=3, width=4), TinyCNN(num_classes=3, width=5)
    x = torch.rand(4, 3, 8, 8)
    labels = torch.tensor([[1, 0, 1], [0, 1, 0], [1, 1, 1], [0, 0, 1]], dtype=torch.float32)
    masks = (torch.rand(4, 3, 8, 8) > 0.6).to(torch.uint8)
    explainer = e2kd.get_explainer("gradcam")
    metrics = {
        n: e2kd.get_metric(n) for n in ("epg", "explanation_iou", "micro_f1", "accuracy", "explanation_similarity")
    }
    values, skipped = evaluate(
        model, [{"image": x, "label": labels, "mask": masks}], metrics, teacher=teacher, explainer=explainer
    )
    assert skipped == {"accuracy": "needs single_label"}
    from .reference import epg_loop, iou_loop

    pairs = [(i, c) for i in range(4) for c in range(3) if labels[i, c] > 0]
    maps = torch.cat([explainer.explain(model.eval(), x[i : i + 1], c) for i, c in pairs])
    pair_masks = torch.stack([masks[i, c][None] for i, c in pairs])
    assert values["epg"] == pytest.approx(epg_loop(maps, pair_masks).mean().item(), rel=1e-5)
    assert values["explanation_iou"] == pytest.approx(iou_loop(maps, pair_masks).mean().item(), rel=1e-5)
    pred = model(x) > 0
    tp = (pred & (labels > 0)).sum().item()
    assert values["micro_f1"] == pytest.approx(2 * tp / (pred.sum().item() + (labels > 0).sum().item()))
