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
    return Distiller(
        teacher,
        student,
        explainer=e2kd.get_explainer("gradcam"),
        similarity=e2kd.get_similarity("cosine"),
        lam=lam,
        **kw,
    )


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


def _term(student, teacher, x, cls, teacher_cls=None):
    """Per sample 1 - cos(E_S(x, cls), E_T(x, teacher_cls or cls)), the Grad-CAM explainer called directly."""
    gradcam = e2kd.get_explainer("gradcam")
    e_s, e_t = (
        gradcam.explain(student, x, cls),
        gradcam.explain(teacher, x, cls if teacher_cls is None else teacher_cls),
    )
    return 1 - F.cosine_similarity(e_s.flatten(1), e_t.flatten(1), dim=1)


def test_explanation_term_uses_teacher_top1_not_the_label(tiny_pair):
    teacher, student, x = tiny_pair
    out = _distiller(teacher, student, lam=1.0)(x, labels=torch.zeros(3, dtype=torch.long))
    top1 = teacher(x).argmax(1)
    gradcam = e2kd.get_explainer("gradcam")
    e_t, e_s = gradcam.explain(teacher, x, top1), gradcam.explain(student, x, top1)
    expected = (1 - F.cosine_similarity(e_s.flatten(1), e_t.flatten(1), dim=1)).mean()
    assert out["explanation"].item() == pytest.approx(expected.item(), rel=1e-10)
    label_based = (
        1
        - F.cosine_similarity(
            gradcam.explain(student, x, 0).flatten(1), gradcam.explain(teacher, x, 0).flatten(1), dim=1
        )
    ).mean()
    assert not torch.equal(top1, torch.zeros_like(top1))
    assert out["explanation"].item() != pytest.approx(label_based.item(), rel=1e-6)


def test_e2kd_gradient_matches_finite_differences(tiny_pair):
    teacher, student, x = tiny_pair
    distiller = _distiller(teacher, student, lam=5.0, temperature=2.0)
    check_gradient(lambda: distiller(x)["loss"], list(student.parameters()), samples=6, rel=1e-5, abs=1e-8)


def test_explanation_gradient_is_added_to_the_kd_gradient(tiny_pair):
    """The explanation term really reaches the student's parameters (the double backward): the
    e2KD gradient is the KD gradient plus lam times a non-zero explanation gradient."""
    teacher, student, x = tiny_pair
    params = [student.fc.weight, student.feat[0].weight]
    out = _distiller(teacher, student, lam=2.5)(x)
    g_loss = torch.autograd.grad(out["loss"], params, retain_graph=True)
    g_expl = torch.autograd.grad(out["explanation"], params)
    g_kd = torch.autograd.grad(_distiller(teacher, student, lam=0.0)(x)["loss"], params)
    for total, kd, expl in zip(g_loss, g_kd, g_expl):
        assert expl.abs().max() > 1e-6
        torch.testing.assert_close(total, kd + 2.5 * expl)
        assert (total - kd).abs().max() > 1e-6


def test_both_maps_explain_the_teachers_top1_when_the_student_disagrees(disagreeing_pair):
    teacher, student, x = disagreeing_pair
    t1, s1 = teacher(x).argmax(1), student(x).argmax(1)
    assert torch.equal(s1, (t1 + 1) % 3)
    value = _distiller(teacher, student, lam=1.0)(x)["explanation"].item()
    assert value == pytest.approx(_term(student, teacher, x, t1).mean().item(), rel=1e-10)
    # explaining the student's own top-1 (for the student, or for both) gives other values
    assert _term(student, teacher, x, s1, t1).mean().item() == pytest.approx(0.0, abs=1e-12)
    assert abs(value - _term(student, teacher, x, s1).mean().item()) > 1e-3 and value > 1e-3


def test_loss_is_kd_plus_lambda_explanation_plus_weighted_label_term(disagreeing_pair):
    """L = T^2 KL + lam * (1 - cos) + w * CE with lam, w outside {0, 1}, each term computed independently."""
    teacher, student, x = disagreeing_pair
    labels = torch.tensor([0, 2, 1, 1])
    lam, w, temperature = 0.37, 0.6, 3.0
    out = _distiller(teacher, student, lam=lam, ce_weight=w, temperature=temperature)(x, labels)
    with torch.no_grad():
        z_t, z_s = teacher(x), student(x)
    kd = _hand_kd(z_s.tolist(), z_t.tolist(), temperature)
    t1 = z_t.argmax(1)
    expl = _term(student, teacher, x, t1).mean().item()
    ce = F.cross_entropy(z_s, labels).item()
    assert out["kd"].item() == pytest.approx(kd, rel=1e-10)
    assert out["explanation"].item() == pytest.approx(expl, rel=1e-10)
    assert out["ce"].item() == pytest.approx(ce, rel=1e-10)
    assert out["loss"].item() == pytest.approx(kd + lam * expl + w * ce, rel=1e-10)
    torch.testing.assert_close(out["student_logits"], z_s)
    torch.testing.assert_close(out["teacher_logits"], z_t)


@pytest.mark.parametrize("name", ["l1", "l2", "jsd"])
def test_a_lower_is_better_similarity_is_minimised(name):
    """For a distance the explanation term is the distance itself (not 1 - distance), and
    training on it brings the student's map to the teacher's."""
    similarity = e2kd.get_similarity(name)
    g = torch.Generator().manual_seed(0)
    teacher_map = torch.rand(2, 1, 4, 4, generator=g, dtype=torch.float64)
    student_map = torch.rand(2, 1, 4, 4, generator=g, dtype=torch.float64).requires_grad_(True)
    assert not similarity.higher_is_better
    torch.testing.assert_close(similarity.loss(student_map, teacher_map), similarity(student_map, teacher_map))
    start = similarity(student_map, teacher_map).mean().item()
    optimizer = torch.optim.Adam([student_map], lr=0.05)
    for _ in range(40):
        optimizer.zero_grad()
        similarity.loss(student_map, teacher_map).mean().backward()
        optimizer.step()
    assert similarity(student_map, teacher_map).mean().item() < 0.1 * start


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
        Distiller(
            TinyCNN(),
            TinyCNN(),
            explainer=e2kd.get_explainer("gradcam", layer="nope"),
            similarity=e2kd.get_similarity("cosine"),
            lam=1.0,
        )


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


@pytest.mark.parametrize(
    "options, message",
    [
        ({"temperature": 0.0}, "temperature must be > 0 (got 0.0)"),
        ({"lam": -0.5}, "lam and ce_weight must be >= 0 (got lam=-0.5, ce_weight=0.0)"),
        ({"ce_weight": -1.0}, "lam and ce_weight must be >= 0 (got lam=1.0, ce_weight=-1.0)"),
        ({"explain_classes": "top2"}, "explain_classes must be one of top1, label, topk, all, positive (got 'top2')"),
        ({"kd": "hinge"}, "kd must be one of softmax, binary (got 'hinge')"),
        ({"explain_every": 0}, "explain_every must be >= 1 (got 0)"),
    ],
)
def test_distiller_settings_are_checked_at_construction(options, message):
    with pytest.raises(ValueError) as error:
        _distiller(TinyCNN(), TinyCNN(), **{"lam": 1.0, **options})
    assert str(error.value) == message


def test_distiller_call_errors_name_what_is_missing(tiny_pair):
    teacher, student, x = tiny_pair
    logits, maps = teacher(x).detach(), torch.ones(3, 1, 8, 8, dtype=torch.float64)
    frozen = _distiller(None, student, lam=1.0)
    with pytest.raises(ValueError, match="^a frozen teacher needs teacher_maps when lam > 0$"):
        frozen(x, teacher_logits=logits)
    with pytest.raises(ValueError, match="^this distiller has no teacher model: pass teacher_logits"):
        frozen(x)
    with pytest.raises(ValueError, match="^a frozen teacher stores top-1 maps only"):
        _distiller(None, student, lam=1.0, explain_classes="all")(x, teacher_logits=logits, teacher_maps=maps)
    with pytest.raises(ValueError, match="^explain_classes='label' needs labels$"):
        _distiller(teacher, student, lam=1.0, explain_classes="label")(x)
    # explain_every: the explanation term on steps 0, 3, ... only; without a step, always
    every = _distiller(teacher, student, lam=1.0, explain_every=3)
    assert [every(x, step=s)["explanation"].item() > 0 for s in range(4)] == [True, False, False, True]
    assert every(x)["explanation"].item() > 0
    # a frozen teacher without explanations (plain KD): the logits alone
    kd_only = _distiller(None, student, lam=0.0)(x, teacher_logits=logits)
    assert kd_only["kd"].item() == pytest.approx(kd_loss(student(x), logits).item(), rel=1e-12)


def test_defaults_frozen_teacher_and_the_label_term_when_off(tiny_pair):
    teacher, student, x = tiny_pair
    distiller = Distiller(
        teacher, student, explainer=e2kd.get_explainer("gradcam"), similarity=e2kd.get_similarity("cosine")
    )
    assert (
        distiller.lam,
        distiller.temperature,
        distiller.ce_weight,
        distiller.top_k,
        distiller.explain_every,
        distiller.explain_classes,
        distiller.kd,
    ) == (1.0, 1.0, 0.0, 2, 1, "top1", "softmax")
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    out = distiller(x)
    assert out["ce"].item() == 0.0 and out["loss"].item() == pytest.approx((out["kd"] + out["explanation"]).item())
    with pytest.raises(ValueError, match="^ce_weight > 0 needs labels$"):
        _distiller(teacher, student, lam=0.0, ce_weight=1.0)(x)


def test_explained_classes_at_their_edges(disagreeing_pair):
    """'all': every class for every image (batch 4, 3 classes); 'positive': a logit of exactly 0 is
    not positive, and the top-1 class always counts."""
    teacher, student, x = disagreeing_pair
    distiller = _distiller(teacher, student, lam=1.0, explain_classes="all")
    classes, weights = distiller.targets(teacher(x), None)
    assert classes.tolist() == [[0, 1, 2]] * 4 and weights is None
    positive = _distiller(teacher, student, lam=1.0, explain_classes="positive")
    logits = torch.tensor([[0.0, 2.0, 1.0], [-1.0, -2.0, -3.0], [0.0, -1.0, -0.5]])
    classes, weights = positive.targets(logits, None)
    assert classes.tolist() == [[1, 2], [0, 1], [0, 1]] and weights.tolist() == [[1, 1], [1, 0], [1, 0]]


def test_a_similarity_or_an_explainer_alone_is_refused():
    from e2kd.explaining import check_trainable

    for explainer, similarity in ((e2kd.get_explainer("gradcam"), None), (None, e2kd.get_similarity("cosine"))):
        with pytest.raises(PluginError, match="^distill.lam > 0 needs both distill.explainer and distill.similarity$"):
            check_trainable(explainer, similarity)


def test_explained_forward_without_an_explainer_gives_the_top1_column():
    from e2kd.explaining import explained_forward
    from e2kd.runtime import at_least_fp32

    model = TinyCNN()
    x = torch.randn(5, 3, 8, 8)
    logits, maps, targets = explained_forward(model, x, None)
    assert maps is None and targets.shape == (5, 1) and torch.equal(targets[:, 0], logits.argmax(1))
    assert not logits.requires_grad
    # half precision becomes float32, float32 and float64 stay as they are
    assert [at_least_fp32(torch.zeros(1, dtype=d)).dtype for d in (torch.float16, torch.bfloat16, torch.float64)] == [
        torch.float32,
        torch.float32,
        torch.float64,
    ]
