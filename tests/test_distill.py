import math

import pytest
import torch
import torch.nn.functional as F

import e2kd
from e2kd.distill import Distiller, kd_loss
from e2kd.errors import PluginError

from e2kd.testing import TinyCNN, check_gradient


def _hand_kd(zs, zt, t):
    """T^2 * mean_b sum_c p_t (log p_t - log p_s), with plain Python floats."""
    total = 0.0
    for s_row, t_row in zip(zs, zt):
        es = [math.exp(v / t) for v in s_row]
        et = [math.exp(v / t) for v in t_row]
        ps = [v / sum(es) for v in es]
        pt = [v / sum(et) for v in et]
        total += sum(b * (math.log(b) - math.log(a)) for a, b in zip(ps, pt))
    return t * t * total / len(zs)


@pytest.mark.parametrize("temperature", [1.0, 5.0])
def test_kd_term_matches_hand_computation(temperature):
    zs = [[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]]
    zt = [[2.0, 0.0, -1.0], [-0.5, 1.0, 2.5]]
    value = kd_loss(torch.tensor(zs, dtype=torch.float64), torch.tensor(zt, dtype=torch.float64), temperature)
    assert value.item() == pytest.approx(_hand_kd(zs, zt, temperature), rel=1e-12)


def _distiller(teacher, student, lam, **kw):
    return Distiller(teacher, student, explainer=e2kd.get_explainer("gradcam"),
                     similarity=e2kd.get_similarity("cosine"), lam=lam, **kw)


def test_lambda_zero_gradients_equal_plain_kd_exactly(tiny_pair):
    teacher, student, x = tiny_pair
    out = _distiller(teacher, student, lam=0.0, temperature=2.0)(x)
    grads = torch.autograd.grad(out["loss"], list(student.parameters()))
    with torch.no_grad():
        zt = teacher(x)
    plain = kd_loss(student(x), zt, 2.0)
    ref = torch.autograd.grad(plain, list(student.parameters()))
    assert out["explanation"].item() == 0.0
    for a, b in zip(grads, ref):
        assert torch.equal(a, b)


def test_lambda_zero_does_no_explanation_work(tiny_pair, monkeypatch):
    teacher, student, x = tiny_pair
    distiller = _distiller(teacher, student, lam=0.0)

    def fail(*a, **k):
        raise AssertionError("capture called with lam=0")

    monkeypatch.setattr(distiller.explainer, "capture", fail)
    distiller(x)["loss"].backward()


def test_explanation_term_uses_teacher_top1_not_the_label(tiny_pair):
    teacher, student, x = tiny_pair
    out = _distiller(teacher, student, lam=1.0)(x, labels=torch.zeros(3, dtype=torch.long))
    top1 = teacher(x).argmax(1)
    gradcam = e2kd.get_explainer("gradcam")
    e_t, e_s = gradcam.explain(teacher, x, top1), gradcam.explain(student, x, top1)
    expected = (1 - F.cosine_similarity(e_s.flatten(1), e_t.flatten(1), dim=1)).mean()
    assert out["explanation"].item() == pytest.approx(expected.item(), rel=1e-10)
    label_based = (1 - F.cosine_similarity(
        gradcam.explain(student, x, 0).flatten(1), gradcam.explain(teacher, x, 0).flatten(1), dim=1)).mean()
    assert not torch.equal(top1, torch.zeros_like(top1))
    assert out["explanation"].item() != pytest.approx(label_based.item(), rel=1e-6)


def test_e2kd_gradient_matches_finite_differences(tiny_pair):
    teacher, student, x = tiny_pair
    distiller = _distiller(teacher, student, lam=5.0, temperature=2.0)
    check_gradient(lambda: distiller(x)["loss"], list(student.parameters()), samples=6, rel=1e-5, abs=1e-8)


def test_explanation_gradient_differs_from_kd_gradient(tiny_pair):
    """The explanation term really reaches the student's parameters (the double backward)."""
    teacher, student, x = tiny_pair
    out = _distiller(teacher, student, lam=1.0)(x)
    g = torch.autograd.grad(out["explanation"], [student.fc.weight, student.feat[0].weight])
    assert all(t.abs().max() > 1e-6 for t in g)


def test_student_runs_once_per_step_and_teacher_is_frozen():
    teacher, student = TinyCNN(bn=True), TinyCNN(bn=True)
    teacher.train()
    distiller = _distiller(teacher, student, lam=1.0)
    bn_s, bn_t = student.stem[1], teacher.stem[1]
    before_t = bn_t.running_mean.clone()
    out = distiller(torch.randn(4, 3, 8, 8), labels=None)
    out["loss"].backward()
    assert bn_s.num_batches_tracked.item() == 1
    assert not teacher.training and torch.equal(bn_t.running_mean, before_t)
    assert all(p.grad is None for p in teacher.parameters())
    assert not teacher.feat._forward_hooks and not student.feat._forward_hooks


def test_cross_entropy_term_is_optional():
    teacher, student = TinyCNN(), TinyCNN()
    x, y = torch.randn(2, 3, 8, 8), torch.tensor([0, 2])
    out = _distiller(teacher, student, lam=0.0, ce_weight=0.5)(x, y)
    expected = out["kd"] + 0.5 * F.cross_entropy(student(x), y)
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    with pytest.raises(ValueError, match="needs labels"):
        _distiller(teacher, student, lam=0.0, ce_weight=0.5)(x)


def test_non_differentiable_plugins_are_refused_before_training():
    class Frozen(type(e2kd.get_similarity("cosine"))):
        differentiable = False

    with pytest.raises(PluginError, match="not differentiable"):
        Distiller(TinyCNN(), TinyCNN(), explainer=e2kd.get_explainer("gradcam"), similarity=Frozen(), lam=1.0)
    with pytest.raises(PluginError, match="needs both"):
        Distiller(TinyCNN(), TinyCNN(), lam=1.0)


def test_missing_layer_fails_at_construction():
    with pytest.raises(e2kd.errors.ModelError, match="no layer 'nope'"):
        Distiller(TinyCNN(), TinyCNN(), explainer=e2kd.get_explainer("gradcam", layer="nope"),
                  similarity=e2kd.get_similarity("cosine"), lam=1.0)


def _term(student, teacher, x, cls):
    gradcam = e2kd.get_explainer("gradcam")
    e_s, e_t = gradcam.explain(student, x, cls), gradcam.explain(teacher, x, cls)
    return 1 - F.cosine_similarity(e_s.flatten(1), e_t.flatten(1), dim=1)


@pytest.mark.parametrize("mode", ["label", "topk", "all"])
def test_explained_classes_ablation_axis(tiny_pair, mode):
    teacher, student, x = tiny_pair
    labels = torch.tensor([2, 0, 1])
    out = _distiller(teacher, student, lam=1.0, explain_classes=mode, top_k=2)(x, labels)
    z = teacher(x)
    if mode == "label":
        classes = [labels]
    elif mode == "topk":
        top = z.topk(2, dim=1).indices
        classes = [top[:, 0], top[:, 1]]
    else:
        classes = [torch.full((3,), c) for c in range(3)]
    expected = torch.stack([_term(student, teacher, x, c) for c in classes], dim=1).mean()
    assert out["explanation"].item() == pytest.approx(expected.item(), rel=1e-10)


def test_all_classes_gradient_matches_finite_differences(tiny_pair):
    teacher, student, x = tiny_pair
    distiller = _distiller(teacher, student, lam=2.0, explain_classes="all")
    check_gradient(lambda: distiller(x)["loss"], [student.fc.weight, student.feat[0].weight], rel=1e-5, abs=1e-8)


def test_frozen_teacher_refuses_other_explained_classes():
    from e2kd.config import load_config_dict
    from e2kd.errors import ConfigError

    with pytest.raises(ConfigError, match="frozen teacher caches top-1 maps only"):
        load_config_dict({"distill": {"teacher_mode": "frozen", "explain_classes": "all"}})
