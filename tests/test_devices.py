"""Device handling checked without a GPU: models on the ``meta`` device and inputs on the CPU.

Every entry point that receives a model and user tensors must move the tensors to the model's
device; a CPU/CUDA mix-up then fails here as a CPU/meta mix-up instead of on a user's GPU.
"""

import torch

import e2kd
from e2kd.evaluate import evaluate
from e2kd.report import explanation_maps
from e2kd.testing import TinyCNN

META = torch.device("meta")


def _models():
    return TinyCNN(width=6).to(META), TinyCNN(width=4).to(META)


def test_notebook_explain_and_figure_maps_move_images_to_the_models():
    teacher, student = _models()
    images = torch.rand(2, 3, 8, 8)
    maps = e2kd.explain(student, images)
    assert maps.device == META and maps.shape == (2, 1, 8, 8)
    maps, preds = explanation_maps({"teacher": teacher, "student": student}, images, e2kd.get_explainer("gradcam"),
                                   reference="teacher")
    assert all(m.device == META and m.shape == (2, 1, 8, 8) for m in maps.values())
    assert preds["student"].shape == (2,)


def test_evaluate_moves_every_batch_field_to_the_device():
    teacher, student = _models()
    batch = {"image": torch.rand(2, 3, 8, 8), "label": torch.tensor([0, 1]), "mask": torch.ones(2, 1, 8, 8),
             "group": torch.tensor([0, 1]), "in_distribution": torch.tensor([True, False])}
    values, skipped = evaluate(student, [batch], {}, teacher=teacher, explainer=e2kd.get_explainer("gradcam"), device=META)
    assert values == {} and skipped == {}


def test_distiller_runs_on_the_models_device():
    teacher, student = _models()
    distiller = e2kd.distill.Distiller(teacher, student, explainer=e2kd.get_explainer("gradcam"),
                                       similarity=e2kd.get_similarity("cosine"), lam=1.0)
    out = distiller(torch.rand(2, 3, 8, 8, device=META), torch.tensor([0, 1], device=META))
    assert out["loss"].device == META and out["loss"].shape == ()
