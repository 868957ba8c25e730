"""A run planned once (``e2kd.plan``): the rules that depend on the command, ``auto`` resolved from
the dataset's labels, each plugin item built once (counted), the models checked once against the
explainer, and the distiller made from the plan's items and settings."""

from __future__ import annotations

import re
from collections import Counter
from types import SimpleNamespace

import pytest
from torch import nn

from e2kd import registry
from e2kd.config import load_config_dict
from e2kd.data import dataset_of
from e2kd.errors import ConfigError
from e2kd.experiment import make_distiller
from e2kd.guidance import Guidance
from e2kd.models import build_from
from e2kd.plan import plan_run

from .test_sweep_units import BASE


def _config(**sections):
    data = {**BASE, **sections}
    return load_config_dict(data, source="exp.yaml")


def _data(label_type="single", provides=(), name="d"):
    """A dataset as the plan sees one: its name, label type and optional fields."""
    return SimpleNamespace(name=name, label_type=label_type, provides=frozenset(provides))


@pytest.fixture
def created(monkeypatch):
    """Count every plugin item built, by (kind, name)."""
    counts = Counter()
    real = registry.registry().create

    def counting(kind, name, options=None):
        counts[kind, name] += 1
        return real(kind, name, options)

    monkeypatch.setattr(registry.registry(), "create", counting)
    return counts


def test_each_item_is_built_once_and_evaluation_shares_the_training_explainer(created):
    config = _config()
    created.clear()  # (loading a config builds its metrics once, to check their options)
    plan = plan_run(config, "distill", _data())
    assert created == {("explainer", "gradcam"): 1, ("similarity", "cosine"): 1}
    assert plan.eval_explainer is plan.explainer and plan.guidance is None
    config = _config(eval={"explainer": {"name": "gradcam", "options": {"relu": False}}})
    other = plan_run(config, "evaluate", _data())
    assert other.eval_explainer is not other.explainer and other.eval_explainer.options.relu is False
    assert other.explainer.options.relu is True and created["explainer", "gradcam"] == 3


def test_guidance_is_planned_for_train_teacher_only_and_needs_masks_or_boxes():
    config = _config(train={"guidance": {"loss": "l1"}})
    with pytest.raises(ConfigError) as error:
        plan_run(config, "train-teacher", _data(provides={"group"}, name="birds"))
    assert str(error.value) == (
        "exp.yaml: train.guidance: dataset 'birds' provides no masks or boxes to guide towards; "
        "remove train.guidance or use a dataset that has them"
    )
    for provides in ({"boxes"}, {"mask", "group"}):
        made = plan_run(config, "train-teacher", _data(provides=provides)).guidance
        assert made.explainer.name == "gradcam" and made.loss is Guidance(made.explainer, "l1").loss
    assert plan_run(_config(), "train-teacher", _data()).guidance is None
    assert plan_run(config, "evaluate", _data(provides={"group"})).guidance is None  # a guided teacher's run


@pytest.mark.parametrize(
    "label_type, kd, classes, want",
    [
        ("single", "auto", "auto", ("softmax", "top1")),
        ("multi", "auto", "auto", ("binary", "positive")),
        ("multi", "softmax", "topk", ("softmax", "topk")),
        ("single", "binary", "label", ("binary", "label")),
    ],
)
def test_auto_kd_and_explained_classes_follow_the_labels(label_type, kd, classes, want):
    plan = plan_run(_config(distill={"kd": kd, "explain_classes": classes}), "distill", _data(label_type))
    assert (plan.kd, plan.explain_classes) == want


def test_a_frozen_teacher_explains_top1_only():
    with pytest.raises(ConfigError) as error:
        plan_run(_config(distill={"teacher_mode": "frozen"}), "distill", _data("multi"))
    assert str(error.value) == (
        "exp.yaml: distill.teacher_mode: frozen caches the teacher's top-1 map, but this "
        "multi-label data explains 'positive' classes; set distill.explain_classes: top1 or "
        "teacher_mode: live"
    )
    kd_only = plan_run(_config(distill={"teacher_mode": "frozen", "lam": 0}), "distill", _data("multi"))
    assert (kd_only.kd, kd_only.explain_classes, kd_only.frozen, kd_only.explains) == (
        "binary",
        "positive",
        True,
        False,
    )
    top1 = plan_run(_config(distill={"teacher_mode": "frozen", "explain_classes": "top1"}), "distill", _data("multi"))
    assert (top1.kd, top1.explain_classes, top1.explains) == ("binary", "top1", True)


@pytest.mark.parametrize(
    "command, train, distill, message",
    [
        (
            "train-teacher",
            {"mixup": 0.2, "guidance": {}},
            {},
            "train.mixup: mixed images have no boxes to guide towards; use either train.mixup or train.guidance",
        ),
        ("distill", {"guidance": {}}, {}, "train.guidance guides a model trained on labels (train-teacher); "),
        ("distill", {"mixup": 0.2}, {"teacher_mode": "frozen"}, "train.mixup: a frozen teacher's outputs are stored "),
        ("distill", {"mixup": 0.2}, {"ce_weight": 0.5}, "train.mixup: a mixed image has two labels; "),
        ("distill", {"mixup": 0.2}, {"explain_classes": "label"}, "train.mixup: a mixed image has two labels; "),
    ],
)
def test_the_rules_of_each_command(command, train, distill, message):
    config = _config(train={**BASE["train"], **train}, distill=distill)
    with pytest.raises(ConfigError, match="^exp.yaml: " + re.escape(message)):
        plan_run(config, command, _data(provides={"mask"}))
    other = {"train-teacher": "evaluate", "distill": "train-teacher"}[command]
    plan_run(config, other, _data(provides={"mask"}))  # the rule is the command's


def test_the_distiller_gets_every_setting_and_the_plans_items():
    config = _config(
        distill={
            "temperature": 3.0,
            "lam": 2.5,
            "ce_weight": 0.5,
            "top_k": 3,
            "explain_every": 4,
            "explain_classes": "topk",
            "feature_resolution": False,
            "similarity": {"name": "cosine", "options": {"eps": 1e-3}},
        }
    )
    plan = plan_run(config, "distill", _data("multi"))
    dataset = dataset_of(config)
    teacher, student, forward = (
        build_from(config.model, dataset, None),
        build_from(config.model, dataset, None),
        nn.Identity(),
    )
    d = make_distiller(plan, teacher, student, forward)
    assert (d.teacher, d.student, d.student_forward, d.explainer, d.similarity) == (
        teacher,
        student,
        forward,
        plan.explainer,
        plan.similarity,
    )
    assert (d.temperature, d.lam, d.ce_weight, d.top_k, d.explain_every, d.kd, d.explain_classes) == (
        3.0,
        2.5,
        0.5,
        3,
        4,
        "binary",
        "topk",
    )
    assert d.similarity.options.eps == 1e-3 and d.at_feature_resolution is False
    plain = make_distiller(plan_run(_config(distill={"lam": 0}), "distill", _data()), None, student)
    assert plain.explainer is None and plain.similarity is None and plain.teacher is None
    assert plain.student_forward is student and (plain.kd, plain.explain_classes) == ("softmax", "top1")


def test_the_explainer_must_fit_teacher_and_student_each_checked_once(monkeypatch):
    config = _config(distill={"explainer": {"name": "gradcam", "options": {"layer": "stages.1"}}})
    dataset = dataset_of(config)
    narrow = build_from(config.model, dataset, None)  # one stage: no stages.1
    wide = build_from(config.model.model_copy(update={"options": {"widths": [4, 4]}}), dataset, None)
    plan = plan_run(config, "distill", dataset)
    with pytest.raises(ConfigError, match=r"^exp.yaml: distill.explainer: the teacher does not fit: gradcam: model "):
        make_distiller(plan, narrow, wide)
    with pytest.raises(ConfigError, match=r"^exp.yaml: distill.explainer: the student does not fit: gradcam: model "):
        make_distiller(plan, wide, narrow)
    make_distiller(
        plan_run(
            config.model_copy(update={"distill": config.distill.model_copy(update={"lam": 0})}), "distill", dataset
        ),
        narrow,
        narrow,
    )  # plain KD explains nothing

    checked = []
    real = type(plan.explainer).check_model
    monkeypatch.setattr(type(plan.explainer), "check_model", lambda self, m: (checked.append(m), real(self, m))[1])
    for _ in range(2):
        plan.check_model("distill.explainer", wide, "teacher")
    assert checked == [wide]  # once per model and plan
    with pytest.raises(ConfigError, match=r"^exp.yaml: distill.explainer: the teacher does not fit: gradcam: "):
        plan.check_model("distill.explainer", narrow, "teacher")
    guided = plan_run(
        _config(
            train={**BASE["train"], "guidance": {"explainer": {"name": "gradcam", "options": {"layer": "nowhere"}}}}
        ),
        "train-teacher",
        dataset,
    )
    with pytest.raises(ConfigError, match=r"^exp.yaml: train.guidance.explainer: gradcam: model SmallResNet has no "):
        guided.check_model("train.guidance.explainer", wide)


def test_an_unknown_command_is_a_programming_error():
    with pytest.raises(ValueError, match=r"^unknown command 'distil' \(known: train-teacher, distill, precompute, "):
        plan_run(_config(), "distil", _data())


def test_each_field_checks_with_its_own_explainer():
    """A guided teacher's plan holds two explainers: the guidance's (a layer the model lacks here)
    and distill.explainer's (the default layer); each field is checked with its own."""
    config = _config(
        train={**BASE["train"], "guidance": {"explainer": {"name": "gradcam", "options": {"layer": "nowhere"}}}}
    )
    dataset = dataset_of(config)
    plan = plan_run(config, "train-teacher", dataset)
    model = build_from(config.model, dataset, None)
    plan.check_model("distill.explainer", model)  # the default layer exists
    with pytest.raises(ConfigError, match=r"^exp.yaml: train.guidance.explainer: gradcam: model SmallResNet has no "):
        plan.check_model("train.guidance.explainer", model)  # not taken for the pair checked above
