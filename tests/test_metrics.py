"""Every metric against a hand computation; EPG and IoU also against a per-sample loop."""

import math

import pytest
import torch
import torch.nn.functional as F

import e2kd
from e2kd.api import EvalBatch
from e2kd_plugins.metrics.localisation import energy_pointing_game, explanation_iou
from e2kd_plugins.metrics.shift import overlap_cosine, shift_diagonal

from .reference import epg_loop, iou_loop


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
    b3 = EvalBatch(logits=LOGITS[:3], teacher_logits=torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 1.0, 0.0]]))
    assert _run("agreement", b3) == pytest.approx(2 / 3)  # samples 0 and 1 agree


def test_kl_divergence_by_hand():
    z_s, z_t = [[1.0, 0.0]], [[0.0, 2.0]]
    p = [math.exp(0) / (1 + math.exp(2)), math.exp(2) / (1 + math.exp(2))]
    q = [math.exp(1) / (1 + math.exp(1)), 1 / (1 + math.exp(1))]
    expected = sum(a * math.log(a / b) for a, b in zip(p, q))
    assert _run(
        "kl_divergence", EvalBatch(logits=torch.tensor(z_s), teacher_logits=torch.tensor(z_t))
    ) == pytest.approx(expected)
    # T = 2: p = softmax([0, 1]), q = softmax([0.5, 0])
    p = [1 / (1 + math.e), math.e / (1 + math.e)]
    q = [math.exp(0.5) / (1 + math.exp(0.5)), 1 / (1 + math.exp(0.5))]
    expected_t2 = sum(a * math.log(a / b) for a, b in zip(p, q))
    assert expected_t2 != pytest.approx(expected, rel=1e-2)
    batch = EvalBatch(logits=torch.tensor(z_s), teacher_logits=torch.tensor(z_t))
    assert _run("kl_divergence", batch, temperature=2.0) == pytest.approx(expected_t2)


def test_explanation_similarity_uses_the_named_similarity():
    a = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
    b = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]]])
    batch = EvalBatch(logits=LOGITS[:1], explanations=a, teacher_explanations=b)
    assert _run("explanation_similarity", batch) == pytest.approx(1 / math.sqrt(2))
    assert _run("explanation_similarity", batch, similarity="l1") == pytest.approx(1.0)
    # the run's training similarity is bound unless one is named; binding nothing keeps the default
    named = e2kd.get_metric("explanation_similarity", similarity="l1")
    named.bind(similarity=e2kd.get_similarity("cosine"))
    unnamed = e2kd.get_metric("explanation_similarity")
    unnamed.bind(similarity=None)
    assert (named.similarity.name, unnamed.similarity.name) == ("l1", "cosine")
    unnamed.bind(similarity=e2kd.get_similarity("cosine", eps=0.5))
    assert unnamed.similarity.options.eps == 0.5
    # keyword options work like an options object (the plugin API)
    assert type(named)(similarity="pearson").similarity.name == "pearson"
    # cosine's eps guards small norms: each norm (1e-6, 1.4e-6) is raised to eps = 1e-3 here
    tiny = _run(
        "explanation_similarity",
        EvalBatch(logits=LOGITS[:1], explanations=a.double() * 1e-6, teacher_explanations=b.double() * 1e-6),
        similarity="cosine",
        similarity_options={"eps": 1e-3},
    )
    assert tiny == pytest.approx(1e-12 / (1e-3 * 1e-3), rel=1e-6)


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


def test_localisation_at_the_spec_boundaries():
    """The spec's edges, in float64: EPG is 0 only below a positive total of 1e-7; IoU min-max
    normalises when max - min >= 1e-7 (else divides by max); a one-pixel union is a real IoU."""
    one = torch.zeros(1, 1, 2, 2, dtype=torch.float64)
    one[0, 0, 0, 0] = 1e-7  # positive total exactly 1e-7
    corner = torch.zeros_like(one)
    corner[0, 0, 0, 0] = 1.0
    assert energy_pointing_game(one, corner).item() == 1.0
    assert explanation_iou(one, corner).item() == 1.0  # union of one pixel
    # span exactly 1e-7 (2e-7 - 1e-7): min-max, cut 1.5e-7 -> only the 2e-7 pixel (dividing by max: 1.2e-7 too)
    spread = torch.tensor([[[[1e-7, 1.2e-7], [2e-7, 1e-7]]]], dtype=torch.float64)
    top = torch.tensor([[[[0.0, 0.0], [1.0, 0.0]]]], dtype=torch.float64)
    assert explanation_iou(spread, top).item() == 1.0
    # a flat positive map below 1: every pixel is on (A / max = 1 > 0.5)
    assert explanation_iou(torch.full((1, 1, 2, 2), 0.2), top.float()).item() == pytest.approx(1 / 4)
    # rows with different minima are normalised each by its own
    rows = torch.tensor([[[[2.0, 3.0], [2.0, 2.0]]], [[[0.0, 1.0], [0.0, 0.0]]]])
    masks = torch.tensor([[[[0.0, 1.0], [0.0, 0.0]]]] * 2)
    assert explanation_iou(rows, masks).tolist() == [1.0, 1.0]
    torch.testing.assert_close(explanation_iou(rows, masks), iou_loop(rows, masks))
    # the metric passes its threshold option on
    batch = EvalBatch(
        logits=LOGITS[:1],
        label_explanations=torch.tensor([[[[4.0, 1.5], [1.0, 0.0]]]]),
        label_masks=torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]]]),
    )
    assert (
        _run("explanation_iou", batch) == pytest.approx(1 / 2) and _run("explanation_iou", batch, threshold=0.3) == 1.0
    )


def test_epg_and_iou_batch_native_equal_per_sample_loop():
    """Over more maps than one vectorised chunk (2,048), each chunk with its own masks."""
    from e2kd_plugins.metrics.localisation import CHUNK

    g = torch.Generator().manual_seed(0)
    n = CHUNK + 40
    maps = torch.randn(n, 2, 6, 6, generator=g)
    maps[:4] = 0  # degenerate samples
    maps[4:8] = maps[4:8].abs() * 0 + 1  # constant maps
    masks = (torch.rand(n, 1, 6, 6, generator=g) > 0.7).float()
    masks[8:10] = 0  # empty masks
    masks[CHUNK:] = 1 - masks[:40]  # the second chunk's masks differ from the first chunk's
    epg, iou = energy_pointing_game(maps, masks), explanation_iou(maps, masks)
    torch.testing.assert_close(epg, epg_loop(maps, masks))
    torch.testing.assert_close(iou, iou_loop(maps, masks))
    assert (epg[CHUNK:] - epg_loop(maps[CHUNK:], masks[:40])).abs().max() > 0.1
    # multi-channel masks: a pixel belongs to the mask when any channel has it
    two = torch.stack([masks[:, 0], torch.zeros_like(masks[:, 0])], dim=1)
    torch.testing.assert_close(energy_pointing_game(maps, two), epg)


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


def _two(classes):
    """2-class logits whose argmax is ``classes``."""
    return torch.tensor([[1.0, 0.0] if c == 0 else [0.0, 1.0] for c in classes])


def test_group_metrics_add_up_over_batches_and_follow_the_datasets_marks():
    """Cells accumulate over two batches; the dataset marks (0, 1) and (1, 0) in distribution
    (the opposite of the group == label default)."""
    b1 = EvalBatch(
        logits=_two([0, 0, 1, 0]),
        labels=torch.tensor([0, 0, 1, 1]),
        groups=torch.tensor([0, 1, 0, 1]),
        in_distribution=torch.tensor([False, True, True, False]),
        teacher_logits=_two([0, 1, 1, 0]),
    )
    b2 = EvalBatch(
        logits=_two([1, 1]),
        labels=torch.tensor([0, 1]),
        groups=torch.tensor([1, 0]),
        in_distribution=torch.tensor([True, True]),
        teacher_logits=_two([0, 0]),
    )
    acc = _run("group_accuracy", b1, b2)
    # (0,0): 1/1, (0,1): 1/2, (1,0): 2/2, (1,1): 0/1
    assert (acc["y0_g0"], acc["y0_g1"], acc["y1_g0"], acc["y1_g1"]) == (1.0, 0.5, 1.0, 0.0)
    assert acc["worst_group"] == 0.0 and acc["mean_group"] == pytest.approx(2.5 / 4)
    assert acc["in_distribution"] == pytest.approx(3 / 4) and acc["out_of_distribution"] == pytest.approx(1 / 2)
    agree = _run("group_agreement", b1, b2)
    # agreement: b1 [T, F, T, T], b2 [F, F] -> (0,0): 1/1, (0,1): 0/2, (1,0): 1/2, (1,1): 1/1
    assert (agree["y0_g0"], agree["y0_g1"], agree["y1_g0"], agree["y1_g1"]) == (1.0, 0.0, 0.5, 1.0)
    assert agree["in_distribution"] == pytest.approx(1 / 4) and agree["out_of_distribution"] == pytest.approx(1.0)
    assert _run("group_accuracy") == {}  # no batch: nothing to report


def test_micro_f1_by_hand():
    logits = torch.tensor([[1.0, -1.0, 2.0], [-1.0, 1.0, 1.0]])
    labels = torch.tensor([[1, 0, 0], [0, 1, 1]])
    # tp = 3 (0,0), (1,1), (1,2); fp = 1 (0,2); fn = 0 -> 6 / 7
    assert _run("micro_f1", EvalBatch(logits=logits, labels=labels)) == pytest.approx(6 / 7)
    # class indices are one-hot: labels 0 and 2 -> tp = 2 (0,0), (1,2); fp = 2 (0,2), (1,1); fn = 0 -> 4 / 6
    assert _run("micro_f1", EvalBatch(logits=logits, labels=torch.tensor([0, 2]))) == pytest.approx(4 / 6)
    # over two batches the counts add up (not the two F1 values): tp 3 + 0, fp 1 + 0, fn 0 + 2 -> 6 / 9
    second = EvalBatch(logits=torch.tensor([[-1.0, -1.0, -1.0]]), labels=torch.tensor([[1, 1, 0]]))
    assert _run("micro_f1", EvalBatch(logits=logits, labels=labels), second) == pytest.approx(6 / 9)
    assert math.isnan(_run("micro_f1", EvalBatch(logits=-logits.abs(), labels=labels * 0)))  # nothing to score
    # a logit of exactly 0 is not predicted, a soft label of exactly 0.5 not present: tp 1, fp 0, fn 0 -> 1
    edge = EvalBatch(logits=torch.tensor([[0.0, 1.0]]), labels=torch.tensor([[0.5, 1.0]]))
    assert _run("micro_f1", edge) == 1.0
    assert _run("micro_f1", EvalBatch(logits=torch.tensor([[0.0, 1.0]]), labels=torch.tensor([[0.6, 1.0]]))) == 2 / 3


def test_shift_helpers_by_hand():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    shifted = shift_diagonal(x, 1)
    assert shifted[0, 0, 1:, 1:].tolist() == x[0, 0, :3, :3].tolist() and shifted[0, 0, 0].sum() == 0
    assert shifted[0, 0, :, 0].sum() == 0 and torch.equal(shift_diagonal(x, 0), x)
    assert overlap_cosine(shifted, x, 1).item() == pytest.approx(1.0)
    # maps of tiny norm: the cosine is still their cosine (eps 1e-8 only guards zero maps)
    a, b = torch.tensor([[[[1e-3, 0.0], [0.0, 0.0]]]]), torch.tensor([[[[1e-3, 1e-3], [0.0, 0.0]]]])
    assert overlap_cosine(a, b, 0).item() == pytest.approx(1 / math.sqrt(2), rel=1e-5)
    assert overlap_cosine(torch.zeros(1, 1, 2, 2), b, 0).item() == 0.0
    assert e2kd.get_metric("shift_equivariance").compute() == {}  # nothing seen yet


def test_shift_equivariance_curve_by_hand():
    """An explainer that weights the image by a fixed ramp does not move its weights with the
    image: the cosine on the overlap falls with the shift, by a value computed here in plain Python.
    Every shifted image is explained for the class predicted on the unshifted one."""
    x = torch.rand(2, 1, 6, 6, dtype=torch.float64)
    ramp = torch.arange(36, dtype=torch.float64).view(6, 6) + 1
    logits = torch.tensor([[0.0, 1.0], [2.0, 0.0]])
    asked = []

    def explain(images, target):
        asked.append(target.tolist())
        return images * ramp

    curve = _run("shift_equivariance", EvalBatch(logits=logits, images=x, explain=explain), max_shift=4, step=2)
    assert list(curve) == ["shift_0", "shift_2", "shift_4"]
    assert asked == [[1, 0]] * 3  # the unshifted image, then shifts 2 and 4, all for the unshifted top-1
    for t in (0, 2, 4):
        total = 0.0
        for img in x[:, 0].tolist():
            a = [img[i][j] * float(ramp[i + t, j + t]) for i in range(6 - t) for j in range(6 - t)]
            b = [img[i][j] * float(ramp[i, j]) for i in range(6 - t) for j in range(6 - t)]
            total += sum(u * v for u, v in zip(a, b)) / math.sqrt(sum(u * u for u in a) * sum(v * v for v in b))
        assert curve[f"shift_{t}"] == pytest.approx(total / 2, rel=1e-9)
    assert curve["shift_0"] == pytest.approx(1.0) and curve["shift_4"] < curve["shift_2"] < 1 - 1e-3


def test_evaluation_explains_the_teachers_top1_for_both_models(disagreeing_pair):
    """explanation_similarity compares both maps for the teacher's top-1 class; the model's own
    top-1 would give 1 here (its map of class t + 1 is the teacher's map of class t)."""
    from e2kd.evaluate import evaluate

    teacher, student, x = disagreeing_pair
    gradcam = e2kd.get_explainer("gradcam")
    metrics = {"explanation_similarity": e2kd.get_metric("explanation_similarity")}
    values, skipped = evaluate(student, [{"image": x}], metrics, teacher=teacher, explainer=gradcam)
    t1 = teacher(x).argmax(1)
    expected = F.cosine_similarity(
        gradcam.explain(student, x, t1).flatten(1), gradcam.explain(teacher, x, t1).flatten(1)
    )
    assert skipped == {} and values["explanation_similarity"] == pytest.approx(expected.mean().item(), rel=1e-9)
    assert values["explanation_similarity"] < 0.999


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
    assert skipped == {
        "agreement": "needs teacher",
        "epg": "needs label_explanations, masks",
        "group_accuracy": "needs groups",
    }
