"""Runtime guards on what plugins hand back: a student map without a gradient path, maps of the wrong
shape and an explainer that frees its graph are refused with one line naming the plugin, in the
distiller (so in ``e2kd distill``) and in evaluation."""

import contextlib

import pytest
import torch
import torch.nn.functional as F
import yaml

import e2kd
from e2kd.api import Capture, Explainer, Similarity
from e2kd.distill import Distiller
from e2kd.errors import PluginError
from e2kd.explaining import check_map_shape, explained_forward, reaches
from e2kd.testing import TinyCNN

from .conftest import TINY


class InputGradient(Explainer):
    """|d logit / d input| summed over colours, with a fault planted by ``fault``."""

    name = "faulty_gradient"
    description = "input gradient with a planted fault (tests)"
    fault = "none"

    @contextlib.contextmanager
    def capture(self, model, inputs, *, trainable=True):
        x = inputs.detach().requires_grad_(True)
        fault = self.fault

        class Cap(Capture):
            def explain(self, logits, target, *, create_graph=False, upsample=True):
                score = logits.gather(1, target.view(-1, 1)).sum()
                # "frees": the classic mistake, no retain_graph when no graph is created
                keep = create_graph or fault != "frees"
                (grad,) = torch.autograd.grad(score, x, create_graph=create_graph, retain_graph=keep)
                maps = grad.abs().sum(1, keepdim=True)
                if fault == "detached":
                    return maps.detach()
                if fault == "small":
                    return F.avg_pool2d(maps, 2)
                if fault == "three_d":
                    return maps[:, 0]
                if fault == "channels":
                    return grad.abs()
                return maps

        yield Cap(x)


def faulty(fault: str) -> Explainer:
    explainer = InputGradient()
    explainer.fault = fault
    return explainer


class DetachedCosine(Similarity):
    name = "detached_cosine"
    description = "cosine computed on detached maps (tests)"

    def __call__(self, a, b):
        return F.cosine_similarity(a.detach().flatten(1), b.flatten(1))


def _distiller(explainer, similarity=None, **kw):
    torch.manual_seed(0)
    teacher, student = TinyCNN(width=6), TinyCNN(width=4)
    return Distiller(
        teacher, student, explainer=explainer, similarity=similarity or e2kd.get_similarity("cosine"), lam=5.0, **kw
    )


def test_a_healthy_explainer_trains_and_passes_every_guard():
    distiller = _distiller(faulty("none"))
    out = distiller(torch.rand(4, 3, 8, 8))
    assert distiller.graph_checked and out["explanation"].requires_grad
    grads = torch.autograd.grad(out["explanation"], list(distiller.student.parameters()), allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


def test_a_detached_student_map_is_refused_at_the_first_explaining_step():
    distiller = _distiller(faulty("detached"), explain_every=2)
    x = torch.rand(4, 3, 8, 8)
    distiller(x, step=1)  # plain KD step: nothing to check yet
    assert not distiller.graph_checked
    with pytest.raises(PluginError) as err:
        distiller(x, step=2)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(
        "explainer 'faulty_gradient' returned a student map with no gradient path to the student's parameters"
    )
    assert "plain KD" in message and "distill.lam: 0" in message


def test_a_similarity_that_cuts_the_gradient_is_named():
    with pytest.raises(PluginError, match=r"^similarity 'detached_cosine' cuts the gradient"):
        _distiller(faulty("none"), DetachedCosine())(torch.rand(4, 3, 8, 8))


def test_reaches_tells_a_map_of_the_parameters_from_one_of_the_input_alone():
    model = TinyCNN(width=4)
    x = torch.rand(2, 3, 8, 8, requires_grad=True)
    params = list(model.parameters())
    assert reaches(model(x).sum(), params)
    assert not reaches((x * 2).sum(), params)  # a graph, but to the input only
    assert not reaches(model(x).sum().detach(), params)
    assert reaches(model(x).sum(), params[:1]) and not reaches((model.fc.weight * 2).sum(), params[:1])


@pytest.mark.parametrize(
    "fault, problem",
    [
        ("small", "4 x 4 where the input is 8 x 8"),
        ("three_d", "not 4-D"),
        ("channels", "3 channels where the explainer declares 1"),
    ],
)
def test_maps_of_the_wrong_shape_are_refused_in_distill_and_evaluate(fault, problem):
    explainer = faulty(fault)
    x = torch.rand(4, 3, 8, 8)
    with pytest.raises(PluginError) as err:  # the teacher's map is checked first (it runs first)
        _distiller(explainer)(x)
    assert str(err.value).startswith("explainer 'faulty_gradient' returned teacher maps of shape ")
    assert problem in str(err.value) and "\n" not in str(err.value)
    frozen = Distiller(None, TinyCNN(width=4), explainer=explainer, similarity=e2kd.get_similarity("cosine"), lam=1.0)
    with pytest.raises(PluginError, match=r"returned student maps of shape .*" + problem):
        frozen(x, teacher_logits=torch.randn(4, 3), teacher_maps=torch.rand(4, 1, 8, 8))
    with pytest.raises(PluginError, match="returned evaluated model maps"):
        explained_forward(TinyCNN(), x, explainer, role="evaluated model")
    from e2kd.evaluate import _model_in_loop
    from e2kd.runtime import Runtime

    explain = _model_in_loop(TinyCNN(), explainer, Runtime(torch.device("cpu")))["explain"]
    with pytest.raises(PluginError, match=r"^explainer 'faulty_gradient' returned evaluated model maps of shape "):
        explain(x, torch.zeros(4, dtype=torch.long))  # a metric's explanation of other images is checked the same way


def test_shape_declaration_at_feature_resolution_and_for_input_channels():
    images = torch.zeros(2, 3, 8, 8)
    gradcam, gradient = e2kd.get_explainer("gradcam"), e2kd.get_explainer("gradient")
    check_map_shape(gradcam, torch.zeros(2, 1, 4, 4), images, upsample=False)  # smaller is what upsample=False gives
    check_map_shape(gradient, torch.zeros(2, 3, 8, 8), images)  # output_channels None: the input's
    with pytest.raises(PluginError, match=r"larger than the 8 x 8 input"):
        check_map_shape(gradcam, torch.zeros(2, 1, 16, 16), images, upsample=False)
    with pytest.raises(PluginError, match=r"expected \(2, 3, 8, 8\): another batch size"):
        check_map_shape(gradient, torch.zeros(3, 3, 8, 8), images)


def test_an_explainer_that_frees_its_graph_fails_topk_with_one_line():
    distiller = _distiller(faulty("frees"), explain_classes="topk", top_k=2)
    with pytest.raises(PluginError) as err:
        distiller(torch.rand(4, 3, 8, 8))
    message = str(err.value)
    assert message.startswith("explainer 'faulty_gradient' explains only one class per capture")
    assert "retain_graph=True" in message and "explain_classes: top1" in message and "\n" not in message
    _distiller(faulty("frees"))(torch.rand(4, 3, 8, 8))  # one class per capture is fine


@pytest.fixture
def faulty_plugin(fresh_registry):
    from e2kd import hookimpl

    class Detached(InputGradient):
        name = "detached_gradient"
        fault = "detached"

    class Small(InputGradient):
        name = "small_gradient"
        fault = "small"

    class Plugin:
        @hookimpl
        def register_explainers(self, register):
            register(Detached)
            register(Small)

    e2kd.register_plugin(Plugin(), name="faulty_explainers")
    yield


def test_distill_with_a_detached_explainer_stops_with_one_line(faulty_plugin, tmp_path, capsys):
    from e2kd.cli import main

    teacher = tmp_path / "teacher.yaml"
    teacher.write_text(
        yaml.safe_dump({**TINY, "train": {**TINY["train"], "epochs": 1}, "out_dir": str(tmp_path / "t")})
    )
    assert main(["train-teacher", str(teacher)]) == 0
    student = {
        **TINY,
        "train": {**TINY["train"], "epochs": 1},
        "distill": {"lam": 5, "explainer": "detached_gradient"},
        "teacher": {**TINY["model"], "checkpoint": str(tmp_path / "t" / "model.pt")},
        "out_dir": str(tmp_path / "s"),
    }
    path = tmp_path / "student.yaml"
    path.write_text(yaml.safe_dump(student))
    capsys.readouterr()
    assert main(["distill", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(
        "e2kd: error: explainer 'detached_gradient' returned a student map with no gradient path"
    )
    assert not (tmp_path / "s" / "model.pt").exists() and not (tmp_path / "s" / "checkpoint.pt").exists()
    # evaluation of a run with an explainer whose maps are too small: one line, no matrix-size traceback
    assert main(["evaluate", str(tmp_path / "t"), "--metrics", "epg"]) == 0
    config = yaml.safe_load((tmp_path / "t" / "config.yaml").read_text())
    config["eval"]["explainer"] = {"name": "small_gradient"}
    (tmp_path / "t" / "config.yaml").write_text(yaml.safe_dump(config))
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "t"), "--metrics", "epg"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "explainer 'small_gradient' returned evaluated model maps of shape (" in err[0]


def test_the_contract_kit_names_the_case_for_any_error_the_item_raises():
    from e2kd.testing import check_explainer

    with pytest.raises(AssertionError) as err:
        check_explainer(faulty("frees"))
    assert str(err.value).startswith(
        "InputGradient fails contract case 'several_classes_one_capture': it raised "
        "RuntimeError: Trying to backward through the graph a second time"
    )
    assert "\n" not in str(err.value) and isinstance(err.value.__cause__, RuntimeError)


def test_guidance_refuses_a_detached_map_too():
    from e2kd.guidance import Guidance

    torch.manual_seed(0)
    model = TinyCNN(width=4)
    x, labels = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 0])
    masks = torch.zeros(4, 1, 8, 8)
    masks[..., :4, :4] = 1
    annotated = torch.ones(4, dtype=torch.bool)
    guidance = Guidance(faulty("none"))
    _, term = guidance(model, model, x, labels, masks, annotated)
    assert guidance.graph_checked and term.requires_grad
    with pytest.raises(
        PluginError,
        match=r"^explainer 'faulty_gradient' returned a guided model map with no gradient "
        r"path .*, so train.guidance would guide nothing; .*, or remove train.guidance$",
    ):
        Guidance(faulty("detached"))(model, model, x, labels, masks, annotated)
    with pytest.raises(
        PluginError, match=r"^explainer 'faulty_gradient' returned guided model maps of shape \(4, 1, 4, 4\)"
    ):
        Guidance(faulty("small"))(model, model, x, labels, masks, annotated)


def test_an_explainer_declaring_its_own_resolution_may_return_smaller_maps():
    images = torch.zeros(2, 3, 8, 8)
    low = e2kd.get_explainer("gradcam", upsample=False)
    check_map_shape(low, torch.zeros(2, 1, 4, 4), images)
    with pytest.raises(PluginError, match=r"16 x 16, larger than the 8 x 8 input"):
        check_map_shape(low, torch.zeros(2, 1, 16, 16), images)
    with pytest.raises(PluginError, match=r"4 x 4 where the input is 8 x 8"):
        check_map_shape(e2kd.get_explainer("gradcam"), torch.zeros(2, 1, 4, 4), images)
    bcos = e2kd.get_explainer("bcos")
    check_map_shape(bcos, torch.zeros(2, 6, 8, 8), images)
    check_map_shape(e2kd.get_explainer("bcos", contribution=True), torch.zeros(2, 1, 8, 8), images)
    with pytest.raises(PluginError, match="1 channels where the explainer declares 6"):
        check_map_shape(bcos, torch.zeros(2, 1, 8, 8), images)


def test_map_shape_messages_name_each_side_and_the_role(monkeypatch):
    """Non-square maps, so that height and width cannot be swapped unnoticed; the full messages."""
    images = torch.zeros(2, 3, 8, 6)
    gradcam = e2kd.get_explainer("gradcam")
    with pytest.raises(PluginError) as err:
        check_map_shape(gradcam, torch.zeros(2, 1, 4, 3), images)
    assert str(err.value) == (
        "explainer 'gradcam' returned model maps of shape (2, 1, 4, 3), expected (2, 1, 8, 6): 4 x 3 where the "
        "input is 8 x 6 (upsample the map to the input); maps are (B, C, H, W) at input resolution with "
        "C = map_channels() (docs/plugins.md)"
    )
    for size in ((9, 6), (8, 7)):  # larger in one side only
        with pytest.raises(PluginError) as err:
            check_map_shape(gradcam, torch.zeros(2, 1, *size), images, upsample=False, role="teacher")
        assert str(err.value).startswith(
            f"explainer 'gradcam' returned teacher maps of shape (2, 1, {size[0]}, {size[1]}), expected "
            f"(2, 1, <= 8, <= 6): {size[0]} x {size[1]}, larger than the 8 x 6 input; "
        )
    with pytest.raises(
        PluginError,
        match=r"^explainer 'gradcam' returned model maps of shape \(2, 8, 6\), expected "
        r"\(2, 1, 8, 6\): not 4-D; ",
    ):
        check_map_shape(gradcam, torch.zeros(2, 8, 6), images)
    check_map_shape(gradcam, torch.zeros(2, 1, 8, 6), images, upsample=False)  # as large as the input: fine
    with pytest.raises(PluginError) as err:
        explained_forward(TinyCNN(), torch.rand(2, 3, 8, 8), faulty("small"))
    assert str(err.value).startswith("explainer 'faulty_gradient' returned model maps of shape (2, 1, 4, 4)")


def test_evaluation_names_the_teacher_when_the_teachers_map_is_wrong():
    from e2kd.evaluate import evaluate

    metrics = {"explanation_similarity": e2kd.get_metric("explanation_similarity")}
    metrics["explanation_similarity"].bind(similarity=e2kd.get_similarity("cosine"))
    with pytest.raises(PluginError, match=r"^explainer 'faulty_gradient' returned teacher maps of shape"):
        evaluate(TinyCNN(), [{"image": torch.rand(2, 3, 8, 8)}], metrics, teacher=TinyCNN(), explainer=faulty("small"))


def test_a_detached_student_map_names_the_consequence_and_the_fix_by_default():
    from e2kd.explaining import check_gradient_path

    model = TinyCNN(width=4)
    with pytest.raises(PluginError) as err:
        check_gradient_path(e2kd.get_explainer("gradient"), torch.rand(2, 3, 8, 8), model)
    message = str(err.value)
    assert "so distill.lam > 0 would train plain KD;" in message and message.endswith("or set distill.lam: 0")


def test_a_non_differentiable_explainer_cannot_train_a_student():
    from e2kd.explaining import check_trainable

    class Frozen(type(e2kd.get_explainer("gradient"))):
        name, differentiable = "frozen_map", False

    with pytest.raises(PluginError) as err:
        check_trainable(Frozen(), e2kd.get_similarity("cosine"))
    assert str(err.value) == (
        "explainer 'frozen_map' is not differentiable and cannot train a student (use it for evaluation, "
        "or set distill.lam: 0)"
    )
