"""Device handling checked without a GPU: models on the ``meta`` device and inputs on the CPU.

Every entry point that receives a model and user tensors must move the tensors to the model's
device; a CPU/CUDA mix-up then fails here as a CPU/meta mix-up instead of on a user's GPU.
"""

import pytest
import torch

import e2kd
from e2kd.evaluate import evaluate
from e2kd.report import explanation_maps
from e2kd.runtime import Runtime
from e2kd.testing import TinyCNN

META = torch.device("meta")


def _models():
    return TinyCNN(width=6).to(META), TinyCNN(width=4).to(META)


def test_notebook_explain_and_figure_maps_move_images_to_the_models():
    teacher, student = _models()
    images = torch.rand(2, 3, 8, 8)
    maps = e2kd.explain(student, images)
    assert maps.device == META and maps.shape == (2, 1, 8, 8)
    maps, preds = explanation_maps(
        {"teacher": teacher, "student": student}, images, e2kd.get_explainer("gradcam"), reference="teacher"
    )
    assert all(m.device == META and m.shape == (2, 1, 8, 8) for m in maps.values())
    assert preds["student"].shape == (2,)


def test_evaluate_moves_every_batch_field_to_the_device():
    teacher, student = _models()
    batch = {
        "image": torch.rand(2, 3, 8, 8),
        "label": torch.tensor([0, 1]),
        "mask": torch.ones(2, 1, 8, 8),
        "group": torch.tensor([0, 1]),
        "in_distribution": torch.tensor([True, False]),
    }
    values, skipped = evaluate(
        student,
        [batch],
        {},
        teacher=teacher,
        explainer=e2kd.get_explainer("gradcam"),
        runtime=Runtime(torch.device(META)),
    )
    assert values == {} and skipped == {}


def test_distiller_runs_on_the_models_device():
    teacher, student = _models()
    distiller = e2kd.distill.Distiller(
        teacher, student, explainer=e2kd.get_explainer("gradcam"), similarity=e2kd.get_similarity("cosine"), lam=1.0
    )
    out = distiller(torch.rand(2, 3, 8, 8, device=META), torch.tensor([0, 1], device=META))
    assert out["loss"].device == META and out["loss"].shape == ()


@pytest.mark.parametrize("mode", ["top1", "label", "topk", "all"])
def test_every_explained_class_mode_and_the_label_term_stay_on_the_device(mode):
    teacher, student = _models()
    distiller = e2kd.distill.Distiller(
        teacher,
        student,
        explainer=e2kd.get_explainer("gradcam"),
        similarity=e2kd.get_similarity("cosine"),
        lam=1.0,
        ce_weight=0.5,
        explain_classes=mode,
    )
    out = distiller(torch.rand(2, 3, 8, 8, device=META), torch.tensor([0, 1], device=META))
    assert out["loss"].device == META and out["explanation"].device == META


def test_similarities_and_explainers_keep_the_inputs_device():
    a = torch.rand(2, 1, 6, 6, device=META)
    for name in ("cosine", "pearson", "spearman", "l1", "l2", "jsd", "ssim", "topk_overlap"):
        assert e2kd.get_similarity(name)(a, a).device == META, name
    import timm

    vit = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        num_classes=3,
        img_size=8,
        patch_size=4,
        embed_dim=16,
        depth=2,
        num_heads=2,
    ).to(META)
    assert e2kd.explain(vit, torch.rand(2, 3, 8, 8), explainer="rollout").device == META
    model = TinyCNN().to(META)
    for name in ("gradient", "input_x_gradient", "gradcam"):
        assert e2kd.explain(model, torch.rand(2, 3, 8, 8), explainer=name).device == META, name


def test_explainers_move_cpu_targets_to_the_models_device():
    """A target given on the CPU (a label, a class index) is moved to where the logits are."""
    model = TinyCNN().to(META)
    x, target = torch.rand(2, 3, 8, 8, device=META), torch.tensor([0, 2])
    for name, options in (("gradcam", {}), ("gradient", {}), ("integrated_gradients", {"n_steps": 2})):
        explainer = e2kd.get_explainer(name, **options)
        with explainer.capture(model, x) as cap:
            logits = model(cap.inputs)
        maps = cap.explain(logits, target, create_graph=True)
        assert maps.device == META, name


def test_evaluation_hands_every_batch_field_over_on_the_device():
    from e2kd.api import Metric

    class Devices(Metric):
        name, description = "devices", "test"
        requires = frozenset({"labels", "groups"})  # (label maps need torch.nonzero, which meta cannot run)

        def update(self, batch):
            self._seen = {key: str(getattr(batch, key).device) for key in ("labels", "groups", "in_distribution")}

        def compute(self):
            return self._seen

    teacher, student = _models()
    batch = {
        "image": torch.rand(2, 3, 8, 8),
        "label": torch.tensor([0, 1]),
        "mask": torch.ones(2, 1, 8, 8),
        "group": torch.tensor([0, 1]),
        "in_distribution": torch.tensor([True, False]),
    }
    values, _ = evaluate(
        student,
        [batch],
        {"devices": Devices()},
        teacher=teacher,
        explainer=e2kd.get_explainer("gradcam"),
        runtime=Runtime(torch.device(META)),
    )
    assert set(values["devices"].values()) == {"meta"}


@pytest.mark.parametrize("mode", ["all", "topk", "top1"])
def test_explained_classes_are_chosen_on_the_logits_device(mode):
    teacher, student = _models()
    distiller = e2kd.distill.Distiller(
        teacher,
        student,
        explainer=e2kd.get_explainer("gradcam"),
        similarity=e2kd.get_similarity("cosine"),
        explain_classes=mode,
    )
    classes, _ = distiller.targets(torch.rand(2, 3, device=META), None)
    assert classes.device == META
