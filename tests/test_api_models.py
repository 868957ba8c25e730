"""The base classes plugins subclass (``e2kd.api``) and the model helpers (``e2kd.models``), by value."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import BaseModel
from torch import nn

from e2kd.api import (
    Capture,
    Dataset,
    EvalBatch,
    Explainer,
    Metric,
    PluginItem,
    Similarity,
    _add_states,
)
from e2kd.errors import ConfigError, ModelError
from e2kd.models import (
    build_from,
    default_layer_name,
    load_teacher,
    module_device,
    normalize_inputs,
    resolve_layer,
)
from e2kd.testing import TinyCNN


class _Options(BaseModel):
    size: int = 3
    name: str = "x"


class _Item(PluginItem):
    name, description, Options = "item", "test", _Options


def test_plugin_items_take_options_one_way_and_show_them():
    assert repr(_Item(size=4)) == "_Item(size=4, name='x')"
    assert _Item(_Options(size=5)).options.size == 5
    with pytest.raises(TypeError, match=r"^pass either an Options instance or keyword options, not both$"):
        _Item(_Options(), size=2)


def test_capabilities_name_every_flag():
    class E(Explainer):
        needs_layer, extra_forwards, output_channels, differentiable = True, "steps", 3, False

    assert E.capabilities() == {
        "differentiable": False,
        "needs_layer": True,
        "extra_forwards": "steps",
        "output_channels": 3,
    }

    class S(Similarity):
        higher_is_better, feature_resolution = False, True

    assert S.capabilities() == {"differentiable": True, "higher_is_better": False, "feature_resolution": True}

    class M(Metric):
        requires, higher_is_better, category = frozenset({"teacher", "labels"}), False, "localisation"

    assert M.capabilities() == {
        "requires": ["labels", "teacher"],
        "higher_is_better": False,
        "category": "localisation",
    }

    class D(Dataset):
        label_type, provides = "multi", frozenset({"mask", "boxes"})

    assert D.capabilities() == {"label_type": "multi", "provides": ["boxes", "mask"]}
    assert PluginItem.capabilities() == {}


def test_a_dataset_keeps_its_options_and_seed_in_its_identity():
    class D(Dataset):
        name, Options = "d", _Options

    d = D(size=9)
    assert d.seed == 0 and d.options.size == 9
    assert D(seed=4, name="y").identity("val") == {
        "dataset": "d",
        "split": "val",
        "seed": 4,
        "options": {"size": 3, "name": "y"},
    }


def test_eval_batch_availability_needs_both_halves_of_a_pair():
    logits = torch.zeros(2, 3)
    one_map = EvalBatch(logits=logits, explanations=torch.zeros(2, 1, 4, 4))
    assert "explanations" not in one_map.available()
    images_only = EvalBatch(logits=logits, images=torch.zeros(2, 3, 4, 4))
    assert "model" not in images_only.available()
    run, explain = (lambda x: logits), (lambda x, t: torch.zeros(2, 1, 4, 4))
    assert "model" not in EvalBatch(logits=logits, explain=explain, forward=run).available()  # no images
    assert "model" in EvalBatch(logits=logits, images=torch.zeros(2, 3, 4, 4), explain=explain, forward=run).available()
    multi = EvalBatch(logits=logits, labels=torch.zeros(2, 3))
    assert multi.available() == {"labels"}


def test_metric_defaults_average_and_merge_states():
    class Mean(Metric):
        def per_sample(self, batch):
            return batch.logits[:, 0]

    m = Mean()
    assert math.isnan(m.compute())
    m.update(EvalBatch(logits=torch.tensor([[1.0], [2.0]])))
    assert m.compute() == 1.5
    assert _add_states({"a": 1, "flag": False, "xs": [1, 2]}, {"a": 2, "flag": True, "xs": [3, 4], "b": 5}) == {
        "a": 3,
        "flag": True,
        "xs": [4, 6],
        "b": 5,
    }
    assert _add_states(True, False) is True and _add_states(False, False) is False
    assert _add_states((1, 2), (3, 4)) == (4, 6)


def test_a_similarity_without_a_feature_resolution_form_says_so():
    class S(Similarity):
        name = "plain"

    with pytest.raises(NotImplementedError, match=r"^similarity 'plain' does not declare feature_resolution$"):
        S().upsampled(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2), (4, 4))


class _Gradient(Explainer):
    """d z_target / d x, recording what capture and explain were called with."""

    name = "grad"
    output_channels = None
    calls: list = []

    def capture(self, model, inputs, *, trainable=True):
        import contextlib

        explainer = self

        @contextlib.contextmanager
        def cm():
            x = inputs.detach().requires_grad_(True)
            cap = Capture(x)

            def explain(logits, target, *, create_graph=False, upsample=True):
                explainer.calls.append((trainable, create_graph, target.dtype))
                (g,) = torch.autograd.grad(logits.gather(1, target.view(-1, 1)).sum(), x, create_graph=create_graph)
                return g

            cap.explain = explain
            yield cap

        return cm()


def test_explain_defaults_to_each_images_top1_and_takes_a_class_for_all(spread_images):
    torch.manual_seed(10)
    model = TinyCNN(num_classes=3)
    x = spread_images
    explainer = _Gradient()
    top1 = model(x).argmax(1)
    assert len(set(top1.tolist())) > 1  # the images disagree: a flattened argmax would pick other classes
    x_ = x.clone().requires_grad_(True)
    want = torch.autograd.grad(model(x_).gather(1, top1.view(-1, 1)).sum(), x_)[0]
    torch.testing.assert_close(explainer.explain(model, x), want)
    x_ = x.clone().requires_grad_(True)
    want = torch.autograd.grad(model(x_)[:, 2].sum(), x_)[0]
    _Gradient.calls.clear()
    got = explainer.explain(model, x, 2)
    torch.testing.assert_close(got, want)
    assert _Gradient.calls == [(False, False, torch.int64)] and not got.requires_grad


def test_normalize_inputs_subtracts_the_mean_and_divides_by_the_std_per_channel():
    model = normalize_inputs(nn.Identity(), [0.5, 0.25, 0.0], [0.5, 1.0, 2.0])
    x = torch.ones(2, 3, 2, 2, dtype=torch.float64)
    out = model(x)
    assert out.dtype == torch.float64
    assert out[0, :, 0, 0].tolist() == [1.0, 0.75, 0.5]
    assert model.input_mean.shape == (1, 3, 1, 1) and model.input_mean.dtype == torch.float32
    assert model.input_std.shape == (1, 3, 1, 1) and model.input_std.dtype == torch.float32
    assert model.state_dict() == {}  # non-persistent: checkpoints keep their keys
    with pytest.raises(
        ModelError,
        match=r"^normalisation: mean and std need one value per channel and std > 0 "
        r"\(got \[0.5\], \[0.0\]\)$",
    ):
        normalize_inputs(nn.Identity(), [0.5], [0.0])


def test_module_device_of_a_model_without_parameters_is_the_cpu():
    assert module_device(nn.ReLU()) == torch.device("cpu")
    assert module_device(TinyCNN().to("meta")) == torch.device("meta")


def test_layers_resolve_by_name_with_a_hint_or_the_last_declared_stage():
    model = TinyCNN()
    assert resolve_layer(model, "stem.0") is model.stem[0] and resolve_layer(model, None) is model.feat
    with pytest.raises(ModelError, match=r"^gradcam: model TinyCNN has no layer 'fet'; did you mean 'feat'\? "):
        resolve_layer(model, "fet", who="gradcam")
    with pytest.raises(ModelError, match=r"^explainer: model TinyCNN has no layer 'zzz' \(") as caught:
        resolve_layer(model, "zzz")
    assert "did you mean" not in str(caught.value)

    class FeatureInfo:  # timm's object: the list is its .info
        info = [{"module": "stem"}, {"module": "feat"}]

    model.feature_info = FeatureInfo()
    assert default_layer_name(model) == "feat"
    bare = nn.Sequential(nn.Conv2d(3, 3, 1))
    with pytest.raises(
        ModelError,
        match=r"^rollout: model Sequential declares no feature stages \(feature_info\); "
        r"set option 'layer' to a module name$",
    ):
        resolve_layer(bare, None, who="rollout")
    with pytest.raises(ModelError, match=r"^explainer: model Sequential declares no feature stages"):
        default_layer_name(bare)
    bare.feature_info = [{"num_chs": 3}]  # entries without a module name
    with pytest.raises(ModelError, match="declares no feature stages"):
        default_layer_name(bare)


def test_the_teacher_is_built_with_its_checkpoint_or_refused_in_one_line(tmp_path):
    from types import SimpleNamespace

    dataset = SimpleNamespace(num_classes=3)
    torch.manual_seed(0)
    trained = build_from(SimpleNamespace(name="small_resnet", options={"widths": [4]}), dataset)
    path = tmp_path / "teacher.pt"
    torch.save(trained.state_dict(), path)
    ref = SimpleNamespace(name="small_resnet", options={"widths": [4]}, checkpoint=str(path))
    teacher = load_teacher(SimpleNamespace(teacher=ref), dataset)
    for a, b in zip(teacher.state_dict().values(), trained.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(ConfigError, match=r"^distillation needs a 'teacher' section \(name, options, checkpoint\)$"):
        load_teacher(SimpleNamespace(teacher=None), dataset)
    with pytest.raises(
        ConfigError,
        match=r"^teacher.checkpoint: a trained teacher is required \(run `e2kd "
        r"train-teacher` first\)$",
    ):
        load_teacher(SimpleNamespace(teacher=SimpleNamespace(**{**vars(ref), "checkpoint": None})), dataset)
