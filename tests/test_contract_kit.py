"""The contract kit (``e2kd.testing``) fed broken items: each case passes a correct item and fails the
item with the mistake it guards against, with the message that names it.

The built-ins pass the kit (``tests/test_contracts.py``); this file checks that the kit can fail, and
fails for the right reason. Every broken item differs from a correct one in one place.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from e2kd import testing
from e2kd.api import Capture, Dataset, Explainer, Metric, ModelBuilder, Similarity
from e2kd.errors import ModelError

# -- explainers ------------------------------------------------------------------------------


class InputXGradient(Explainer):
    """A correct explainer (Input x Gradient); the broken ones below override one step of it."""

    name = "kit_input_x_gradient"
    description = "test"
    output_channels = None
    retain_graph = True  # keep the graph for the next class explained on the same capture

    def finish(self, out: torch.Tensor, create_graph: bool) -> torch.Tensor:
        return out if create_graph else out.detach()

    def install(self, model: nn.Module) -> Callable[[], None]:
        """Set up around a capture; returns what undoes it on exit."""
        return lambda: None

    @contextlib.contextmanager
    def capture(self, model, inputs, *, trainable=True):
        x = inputs.detach().requires_grad_(True)
        cap = Capture(x)

        def explain(logits, target, *, create_graph=False, upsample=True):
            score = logits.gather(1, target.view(-1, 1)).sum()
            (grad,) = torch.autograd.grad(score, x, create_graph=create_graph, retain_graph=self.retain_graph or None)
            return self.finish(grad * x, create_graph)

        cap.explain = explain
        undo = self.install(model)
        with torch.enable_grad():
            yield cap
        undo()


def _broken(name: str, **overrides) -> Explainer:
    return type(name, (InputXGradient,), {"name": name, **overrides})()


def test_a_correct_explainer_passes_every_case():
    testing.check_explainer(InputXGradient())


@pytest.mark.parametrize(
    "finish, message",
    [
        (lambda self, out, cg: out.sum(1), r"map shape \(4, 8, 8\), expected \(4, 3, 8, 8\)"),
        (lambda self, out, cg: out.float(), "map dtype torch.float32, input dtype torch.float64"),
        (
            lambda self, out, cg: out / out.abs().sum(dim=(1, 2, 3), keepdim=True) * float("inf"),
            "the maps are not finite",
        ),
        (lambda self, out, cg: out / out.abs().max(), "batch differs from one sample at a time"),
        (lambda self, out, cg: out * 0, "every map is zero"),
    ],
    ids=["shape", "dtype", "finite", "batch", "zero"],
)
def test_shape_and_batch_names_the_broken_property(finish, message):
    with pytest.raises(AssertionError, match="^" + message):
        testing.EXPLAINER_CASES["shape_and_batch"](_broken("Broken", finish=finish))


def test_several_classes_on_one_capture_catch_a_cached_first_map():
    class FirstClassOnly(InputXGradient):
        """Answers every later call on a capture with its first map."""

        @contextlib.contextmanager
        def capture(self, model, inputs, *, trainable=True):
            with super().capture(model, inputs, trainable=trainable) as cap:
                first, explain = [], cap.explain

                def cached(logits, target, **kwargs):
                    if not first:
                        first.append(explain(logits, target, **kwargs))
                    return first[0]

                cap.explain = cached
                yield cap

    testing.EXPLAINER_CASES["several_classes_one_capture"](InputXGradient())
    with pytest.raises(AssertionError, match="^class 2 explained after other classes on one capture differs"):
        testing.EXPLAINER_CASES["several_classes_one_capture"](FirstClassOnly())


def test_a_freed_graph_is_named_by_check_explainer_with_its_case():
    class Forgetful(InputXGradient):
        retain_graph = False  # frees the graph after the first class

    with pytest.raises(AssertionError) as caught:
        testing.check_explainer(Forgetful())
    message = str(caught.value)
    assert message.startswith("Forgetful fails contract case 'several_classes_one_capture': it raised RuntimeError: ")
    assert "\n" not in message and "second time" in message
    assert isinstance(caught.value.__cause__, RuntimeError)


@pytest.mark.parametrize(
    "finish, message",
    [
        (lambda self, out, cg: out, r"explain\(...\) without create_graph keeps a graph"),
        (lambda self, out, cg: out.detach(), r"explain\(..., create_graph=True\) returns a map without a graph"),
    ],
    ids=["keeps", "never"],
)
def test_detached_by_default_and_graph_on_request(finish, message):
    with pytest.raises(AssertionError, match="^" + message):
        testing.EXPLAINER_CASES["detached_by_default"](_broken("Broken", finish=finish))


def test_an_evaluation_only_explainer_need_not_build_a_graph():
    always_detached = _broken("EvaluationOnly", finish=lambda self, out, cg: out.detach(), differentiable=False)
    testing.EXPLAINER_CASES["detached_by_default"](always_detached)


def test_a_frozen_teacher_must_be_explained():
    class NeedsTrainableWeights(InputXGradient):
        @contextlib.contextmanager
        def capture(self, model, inputs, *, trainable=True):
            frozen = not any(p.requires_grad for p in model.parameters())
            with super().capture(model, inputs, trainable=trainable) as cap:
                if frozen:
                    cap.explain = lambda logits, target, **kw: torch.zeros_like(inputs)
                yield cap

    testing.EXPLAINER_CASES["frozen_teacher"](InputXGradient())
    with pytest.raises(AssertionError, match="^a teacher whose parameters are frozen gets a zero map"):
        testing.EXPLAINER_CASES["frozen_teacher"](NeedsTrainableWeights())


class _Hoard(InputXGradient):
    kept: list = []

    def finish(self, out, create_graph):
        self.kept.append(out)
        return super().finish(out, create_graph)


@pytest.mark.parametrize(
    "broken, message",
    [
        (
            _broken(
                "LeavesHook",
                install=lambda self, model: (model.register_forward_hook(lambda *a: None), lambda: None)[1],
            ),
            "a hook is left on the model",
        ),
        (_Hoard(), "tensors accumulate across explanations"),
        (
            _broken("Unfuses", install=lambda self, model: (setattr(model.stem, "fused_attn", False), lambda: None)[1]),
            "fused attention not restored",
        ),
    ],
    ids=["hook", "hoard", "fused"],
)
def test_hooks_released_names_what_is_left_behind(broken, message):
    testing.EXPLAINER_CASES["hooks_released"](InputXGradient())
    with pytest.raises(AssertionError, match="^" + message):
        testing.EXPLAINER_CASES["hooks_released"](broken)


def _scaled_gradient(out: torch.Tensor, factor: float) -> torch.Tensor:
    """``out`` in value, ``factor`` times its gradient."""
    return out.detach() + factor * (out - out.detach())


def test_trains_or_refuses_checks_the_gradient_against_finite_differences():
    wrong = _broken("WrongGradient", finish=lambda self, out, cg: _scaled_gradient(out, 2.0) if cg else out.detach())
    with pytest.raises(AssertionError, match=r"^gradient of parameter \(.*\)\[\d+\]: autograd .*, finite differences"):
        testing.EXPLAINER_CASES["trains_or_refuses"](wrong)


def test_trains_or_refuses_checks_that_training_lowers_the_term():
    # right gradient at float64 for the finite differences, ascent on the float32 training steps
    ascent = _broken(
        "Ascent",
        finish=lambda self, out, cg: (
            _scaled_gradient(out, -1.0) if cg and out.dtype == torch.float32 else InputXGradient.finish(self, out, cg)
        ),
    )
    with pytest.raises(AssertionError, match="^five steps did not lower the term"):
        testing.EXPLAINER_CASES["trains_or_refuses"](ascent)


def test_trains_or_refuses_checks_the_frozen_replay(monkeypatch):
    # the replay explains the teacher through explained_forward alone (role "model"), the live
    # distiller with role "teacher": a replay whose maps differ must be caught
    import e2kd.explaining

    live = e2kd.explaining.explained_forward

    def replayed_otherwise(model, images, explainer, targets=None, **kwargs):
        logits, maps, chosen = live(model, images, explainer, targets, **kwargs)
        return (logits, maps, chosen) if kwargs.get("role") == "teacher" else (logits, maps.flip(-1), chosen)

    monkeypatch.setattr(e2kd.explaining, "explained_forward", replayed_otherwise)
    with pytest.raises(AssertionError, match="^frozen replay differs from live"):
        testing.EXPLAINER_CASES["trains_or_refuses"](InputXGradient())


def test_an_evaluation_only_explainer_must_be_refused_by_the_distiller(monkeypatch):
    evaluation_only = _broken("EvaluationOnly", differentiable=False)
    testing.EXPLAINER_CASES["trains_or_refuses"](evaluation_only)  # the distiller refuses it: the case passes
    import e2kd.distill

    class Accepting(e2kd.distill.Distiller):
        def __init__(self, *args, **kwargs):
            pass

    monkeypatch.setattr(e2kd.distill, "Distiller", Accepting)
    with pytest.raises(AssertionError, match="^an evaluation-only explainer was accepted for training with lam > 0"):
        testing.EXPLAINER_CASES["trains_or_refuses"](evaluation_only)


class _Upsampling(InputXGradient):
    """Declares bilinear upsampling: the map is the 4 x 4 average-pooled map, upsampled."""

    def upsamples_bilinearly(self):
        return True

    def upsample(self, low, size):
        return F.interpolate(low, size=size, mode="bilinear", align_corners=False)

    @contextlib.contextmanager
    def capture(self, model, inputs, *, trainable=True):
        with super().capture(model, inputs, trainable=trainable) as cap:
            explain = cap.explain

            def pooled(logits, target, *, create_graph=False, upsample=True):
                low = F.avg_pool2d(explain(logits, target, create_graph=create_graph), 2)
                return self.upsample(low, inputs.shape[-2:]) if upsample else low

            cap.explain = pooled
            yield cap


def test_declared_upsampling_is_checked_in_value_and_gradient():
    testing.EXPLAINER_CASES["upsampling_declared_truthfully"](_Upsampling())
    nearest = type("Nearest", (_Upsampling,), {"upsample": lambda self, low, size: F.interpolate(low, size=size)})
    with pytest.raises(AssertionError, match="^bilinear upsampling of the upsample=False map is not the map"):
        testing.EXPLAINER_CASES["upsampling_declared_truthfully"](nearest())
    steeper = type(
        "Steeper",
        (_Upsampling,),
        {"upsample": lambda self, low, size: _scaled_gradient(_Upsampling.upsample(self, low, size), 3.0)},
    )
    with pytest.raises(AssertionError, match="^gradients through the two maps differ"):
        testing.EXPLAINER_CASES["upsampling_declared_truthfully"](steeper())
    full_size = type("FullSize", (_Upsampling,), {"upsample": lambda self, low, size: low})

    class AlwaysFull(full_size):
        @contextlib.contextmanager
        def capture(self, model, inputs, *, trainable=True):
            with InputXGradient.capture(self, model, inputs, trainable=trainable) as cap:
                explain = cap.explain
                cap.explain = lambda logits, target, *, create_graph=False, upsample=True: explain(
                    logits, target, create_graph=create_graph
                )
                yield cap

    with pytest.raises(
        AssertionError, match=r"^upsample=False gave \(4, 3, 8, 8\), the same size as the upsampled map"
    ):
        testing.EXPLAINER_CASES["upsampling_declared_truthfully"](AlwaysFull())


def test_the_kit_allows_what_the_contract_allows():
    """A capture made with trainable=False may skip building graphs (its maps are never
    back-propagated), and an explainer may give an all-zero map for some class: both pass."""

    class Frugal(_Upsampling):
        @contextlib.contextmanager
        def capture(self, model, inputs, *, trainable=True):
            with super().capture(model, inputs, trainable=trainable) as cap:
                if not trainable:
                    explain = cap.explain
                    cap.explain = lambda *a, **kw: explain(*a, **kw).detach()
                yield cap

    testing.check_explainer(Frugal())

    class SilentOnTheLastClass(InputXGradient):
        @contextlib.contextmanager
        def capture(self, model, inputs, *, trainable=True):
            with super().capture(model, inputs, trainable=trainable) as cap:
                explain = cap.explain
                cap.explain = lambda logits, target, **kw: (
                    explain(logits, target, **kw) * (target != 2).view(-1, 1, 1, 1)
                )
                yield cap

    testing.EXPLAINER_CASES["shape_and_batch"](SilentOnTheLastClass())


def test_an_explainer_that_does_not_declare_upsampling_is_not_asked_for_it():
    class Refuses(InputXGradient):
        @contextlib.contextmanager
        def capture(self, model, inputs, *, trainable=True):
            raise AssertionError("capture called")
            yield

    testing.EXPLAINER_CASES["upsampling_declared_truthfully"](Refuses())


def test_model_for_names_the_explainer_and_every_refusal():
    class NoModelFits(InputXGradient):
        name = "picky"

        def check_model(self, model):
            raise ModelError(f"no {type(model).__name__}")

    with pytest.raises(
        AssertionError,
        match=r"^no test model fits explainer 'picky' \(no TinyCNN; no TinyCNN\); "
        r"pass candidates=\[\.\.\.\]",
    ):
        testing.model_for(NoModelFits(), candidates=[testing.TinyCNN, testing.TinyCNN])


def test_model_for_takes_the_first_accepted_candidate_with_the_seed_and_dtype():
    class NoCNN(InputXGradient):
        def check_model(self, model):
            if isinstance(model, testing.TinyCNN):
                raise ModelError("not a CNN")

    model = testing.model_for(NoCNN(), torch.float32, seed=5, candidates=[testing.TinyCNN, lambda: nn.Linear(2, 3)])
    torch.manual_seed(5)
    want = nn.Linear(2, 3)
    assert isinstance(model, nn.Linear) and model.weight.dtype == torch.float32
    torch.testing.assert_close(model.weight, want.weight, rtol=0, atol=0)
    default = testing.model_for(InputXGradient())
    assert isinstance(default, testing.TinyCNN) and default.fc.weight.dtype == torch.float64


# -- check_gradient --------------------------------------------------------------------------


def test_check_gradient_passes_autograd_and_names_a_wrong_entry():
    w = torch.tensor([0.5, -1.5, 2.0], dtype=torch.float64, requires_grad=True)
    grads = testing.check_gradient(lambda: (w**3).sum(), [w], samples=3)
    torch.testing.assert_close(grads[0], 3 * w.detach() ** 2)

    class Halved(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return (x**2).sum()

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            return g * x  # half of 2x

    with pytest.raises(AssertionError) as caught:
        testing.check_gradient(lambda: Halved.apply(w), [w], samples=3)
    found = re.fullmatch(
        r"gradient of parameter \(3,\)\[(\d)\]: autograd (\S+), finite differences (\S+)", str(caught.value)
    )
    assert found, str(caught.value)
    i, autograd, numeric = int(found[1]), float(found[2]), float(found[3])
    assert autograd == pytest.approx(w[i].item()) and numeric == pytest.approx(2 * w[i].item(), rel=1e-6)


def test_check_gradient_refuses_all_zero_and_treats_unused_as_zero():
    w, unused = (torch.ones(2, dtype=torch.float64, requires_grad=True) for _ in range(2))
    with pytest.raises(AssertionError, match="^all gradients are zero"):
        testing.check_gradient(lambda: (w * 0).sum(), [w])
    grads = testing.check_gradient(lambda: (w * 2).sum(), [w, unused])
    torch.testing.assert_close(grads[1], torch.zeros(2, dtype=torch.float64))


def test_check_gradient_compares_with_the_stated_tolerance():
    w = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)

    class Off(torch.autograd.Function):  # gradient off by 1e-3 relative
        @staticmethod
        def forward(ctx, x):
            return (x**2).sum()

        @staticmethod
        def backward(ctx, g):
            return g * 2 * torch.tensor([1.0, 2.0], dtype=torch.float64) * 1.001

    testing.check_gradient(lambda: Off.apply(w), [w], rel=1e-2, samples=2)
    with pytest.raises(AssertionError):
        testing.check_gradient(lambda: Off.apply(w), [w], rel=1e-4, samples=2)


# -- similarities ----------------------------------------------------------------------------


class Cosine(Similarity):
    """A correct similarity with an exact feature-resolution form (the broken ones override one step)."""

    name = "kit_cosine"
    description = "test"
    feature_resolution = True

    def __call__(self, a, b):
        return F.cosine_similarity(a.flatten(1), b.flatten(1), dim=1)

    def upsampled(self, a, b, size):
        def up(m):
            if tuple(m.shape[-2:]) == tuple(size):
                return m
            return F.interpolate(m, size=size, mode="bilinear", align_corners=False)

        return self(up(a), up(b))


def _similarity(name: str, base: type = Cosine, **overrides) -> Similarity:
    return type(name, (base,), {"name": name, **overrides})()


def test_a_correct_similarity_passes_every_case():
    testing.check_similarity(Cosine())


def test_batch_native_names_the_shape_and_compares_pairs():
    column = _similarity("Column", __call__=lambda self, a, b: Cosine.__call__(self, a, b)[:, None])
    with pytest.raises(AssertionError, match=r"^values of shape \(5, 1\), expected \(5,\)"):
        testing.SIMILARITY_CASES["batch_native"](column)
    nan = _similarity("NaN", __call__=lambda self, a, b: Cosine.__call__(self, a, b) * float("nan"))
    with pytest.raises(AssertionError, match="^values of shape"):
        testing.SIMILARITY_CASES["batch_native"](nan)
    batch_mean = _similarity(
        "BatchMean", __call__=lambda self, a, b: Cosine.__call__(self, a, b) - Cosine.__call__(self, a, b).mean() + 1
    )
    with pytest.raises(AssertionError):
        testing.SIMILARITY_CASES["batch_native"](batch_mean)


def test_self_is_best_in_the_declared_direction():
    class Distance(Similarity):
        name, description, higher_is_better = "kit_l2", "test", False

        def __call__(self, a, b):
            return (a - b).flatten(1).norm(dim=1) / 20  # other pairs about 0.12 away: well within 1

    testing.SIMILARITY_CASES["self_is_best"](Distance())
    # a tie with the self-similarity is allowed, in either direction
    testing.SIMILARITY_CASES["self_is_best"](
        _similarity("Capped", __call__=lambda self, a, b: Cosine.__call__(self, a, b).clamp(max=0.5))
    )
    testing.SIMILARITY_CASES["self_is_best"](
        _similarity("Floored", Distance, __call__=lambda self, a, b: Distance.__call__(self, a, b).clamp(min=1.0))
    )
    with pytest.raises(AssertionError, match=r"^self-similarity is not the best value \(higher_is_better=True\)"):
        testing.SIMILARITY_CASES["self_is_best"](_similarity("Declared", Distance, higher_is_better=True))
    with pytest.raises(AssertionError, match=r"^self-similarity is not the best value \(higher_is_better=False\)$"):
        testing.SIMILARITY_CASES["self_is_best"](_similarity("Reversed", higher_is_better=False))


def test_training_reduces_distance_catches_a_wrong_sign_a_zero_gradient_and_a_divergence():
    increasing = _similarity("Increasing", loss=lambda self, s, t, size=None: self(s, t))
    with pytest.raises(AssertionError, match="^minimising the loss made the maps less similar: check higher_is_better"):
        testing.SIMILARITY_CASES["training_reduces_distance"](increasing)
    flat = _similarity("Flat", loss=lambda self, s, t, size=None: s.flatten(1).sum(1) * 0)
    with pytest.raises(AssertionError, match="^zero or non-finite gradient"):
        testing.SIMILARITY_CASES["training_reduces_distance"](flat)
    steep = _similarity("Steep", loss=lambda self, s, t, size=None: 160 * (s - t).pow(2).flatten(1).sum(1))
    with pytest.raises(AssertionError, match=r"^minimising the loss did not lower it \("):
        testing.SIMILARITY_CASES["training_reduces_distance"](steep)
    # a non-differentiable similarity is not trained
    testing.SIMILARITY_CASES["training_reduces_distance"](
        _similarity("Frozen", Cosine, differentiable=False, loss=None)
    )


def test_a_lower_is_better_similarity_must_become_lower():
    class Distance(Similarity):
        name, description, higher_is_better = "kit_l2", "test", False

        def __call__(self, a, b):
            return (a - b).pow(2).flatten(1).sum(1)

    testing.SIMILARITY_CASES["training_reduces_distance"](Distance())
    with pytest.raises(
        AssertionError, match="^minimising the loss made the maps less similar: check higher_is_better$"
    ):
        testing.SIMILARITY_CASES["training_reduces_distance"](
            _similarity("Away", Distance, loss=lambda self, s, t, size=None: -self(s, t))
        )


def test_feature_resolution_is_checked_in_value_and_gradient():
    nearest = _similarity(
        "Nearest", upsampled=lambda self, a, b, size: self(F.interpolate(a, size=size), F.interpolate(b, size=size))
    )
    with pytest.raises(AssertionError, match=r"^upsampled\(\) differs from the upsampled maps' value"):
        testing.SIMILARITY_CASES["feature_resolution_exact"](nearest)
    steeper = _similarity(
        "Steeper", upsampled=lambda self, a, b, size: _scaled_gradient(Cosine.upsampled(self, a, b, size), 2.0)
    )
    with pytest.raises(AssertionError, match=r"^upsampled\(\) has another gradient"):
        testing.SIMILARITY_CASES["feature_resolution_exact"](steeper)
    # an undeclared form is not called; an evaluation-only one is checked in value only
    testing.SIMILARITY_CASES["feature_resolution_exact"](
        _similarity("Undeclared", feature_resolution=False, upsampled=None)
    )
    testing.SIMILARITY_CASES["feature_resolution_exact"](
        _similarity("ValueOnly", differentiable=False, upsampled=steeper.upsampled.__func__)
    )


# -- metrics ---------------------------------------------------------------------------------


class Agreement(Metric):
    """A correct metric: top-1 agreement with the teacher, a sample mean."""

    name = "kit_agreement"
    description = "test"
    requires = frozenset({"teacher"})

    def per_sample(self, batch):
        return (batch.logits.argmax(1) == batch.teacher_logits.argmax(1)).double()


class Counts(Agreement):
    """A correct metric returning a dict."""

    def compute(self):
        return {"agreement": self._total / self._count, "samples": float(self._count)}


def _metric(name: str, base: type = Agreement, **overrides) -> Metric:
    return type(name, (base,), {"name": name, **overrides})()


def test_correct_metrics_pass_every_case():
    testing.check_metric(Agreement())
    testing.check_metric(Counts())


def test_accumulates_names_a_metric_that_keeps_only_the_last_batch():
    def update(self, batch):
        values = self.per_sample(batch)
        self._total, self._count = float(values.sum()), values.numel()

    with pytest.raises(AssertionError, match=r"^value: .* over two half batches, .* over the whole batch"):
        testing.METRIC_CASES["accumulates"](_metric("LastBatch", update=update))
    with pytest.raises(AssertionError, match=r"^agreement: .* over two half batches"):
        testing.METRIC_CASES["accumulates"](_metric("LastBatchDict", Counts, update=update))


def test_accumulates_names_other_keys_infinite_values_and_missing_requirements():
    def update(self, batch):
        Agreement.update(self, batch)
        self._updates = getattr(self, "_updates", 0) + 1

    def compute(self):
        return {f"after_{self._updates}_updates": 1.0}

    def reset(self):
        Agreement.reset(self)
        self._updates = 0

    with pytest.raises(AssertionError, match=r"^compute\(\) returns other keys after two updates"):
        testing.METRIC_CASES["accumulates"](_metric("Keys", compute=compute, update=update, reset=reset))
    with pytest.raises(AssertionError, match="^samples is not finite"):
        testing.METRIC_CASES["accumulates"](
            _metric("Infinite", Counts, compute=lambda self: {"agreement": 0.5, "samples": float("inf")})
        )
    with pytest.raises(AssertionError, match=r"^the kit's batch lacks \['nothing_like_it'\]"):
        testing.METRIC_CASES["accumulates"](_metric("Needs", requires=frozenset({"teacher", "nothing_like_it"})))
    with pytest.raises(AssertionError, match="compute"):
        testing.METRIC_CASES["accumulates"](_metric("Empty", compute=lambda self: {}))


def test_accumulates_compares_to_a_relative_tolerance():
    # compute() adds a relative error of 1e-7 on the second of two updates: within the kit's 1e-6
    def compute(self):
        value = self._total / self._count
        return value * (1 + 1e-7) if self.updates == 2 else value

    def update(self, batch):
        Agreement.update(self, batch)
        self.updates = getattr(self, "updates", 0) + 1

    def reset(self):
        Agreement.reset(self)
        self.updates = 0

    testing.METRIC_CASES["accumulates"](_metric("Close", compute=compute, update=update, reset=reset))
    far = lambda self: (self._total / self._count) * (1 + 1e-4 * (self.updates == 2))  # noqa: E731
    with pytest.raises(AssertionError, match=r"^value: .* over two half batches"):
        testing.METRIC_CASES["accumulates"](_metric("Far", compute=far, update=update, reset=reset))


def test_reset_forgets_names_a_metric_that_keeps_state():
    def reset(self):
        if not hasattr(self, "_total"):
            Agreement.reset(self)

    with pytest.raises(AssertionError, match=r"^values depend on an earlier evaluation: reset\(\) keeps state"):
        testing.METRIC_CASES["reset_forgets"](_metric("Sticky", Counts, reset=reset))


def test_merges_names_a_metric_whose_merge_loses_a_process():
    with pytest.raises(AssertionError, match=r"^value: .* from merged states, .* from one evaluation"):
        testing.METRIC_CASES["merges"](_metric("Deaf", merge=lambda self, state: None))
    with pytest.raises(AssertionError, match="^merged states compute other keys"):
        testing.METRIC_CASES["merges"](
            _metric("Renamed", Counts, merge=lambda self, state: setattr(self, "compute", lambda: {"merged": 0.0}))
        )


def test_the_full_eval_batch_has_every_requirement_and_splits_by_rows():
    from e2kd.api import REQUIREMENTS

    batch = testing.full_eval_batch(n=6)
    assert batch.available() == REQUIREMENTS
    torch.testing.assert_close(batch.labels, torch.tensor([0, 1, 2, 0, 1, 2]))
    torch.testing.assert_close(batch.label_pairs, torch.stack([torch.arange(6), batch.labels], 1))
    assert torch.equal(batch.in_distribution, batch.groups == batch.labels)
    part = testing._split_batch(batch, 2, 5)
    assert torch.equal(part.logits, batch.logits[2:5]) and part.explain is batch.explain and part.model is batch.model
    # the model in the loop: forward runs the batch's model; explain is its input gradient, summed over channels
    torch.testing.assert_close(batch.forward(batch.images), batch.model(batch.images))
    target = torch.tensor([0, 1, 2, 2, 1, 0])
    x = batch.images.clone().requires_grad_(True)
    batch.model(x).gather(1, target.view(-1, 1)).sum().backward()
    torch.testing.assert_close(batch.explain(batch.images, target), x.grad.sum(1, keepdim=True))
    other = testing.TinyCNN(num_classes=3, width=5)
    assert not torch.equal(batch.forward(batch.images, model=other), batch.forward(batch.images))
    assert not torch.equal(testing.full_eval_batch(seed=1).logits, batch.logits)


# -- models ----------------------------------------------------------------------------------


class TinyBuilder(ModelBuilder):
    name = "kit_tiny"
    description = "test"

    def build(self, num_classes):
        return testing.TinyCNN(num_classes)


def _builder(name: str, build) -> ModelBuilder:
    return type(name, (TinyBuilder,), {"name": name, "build": build})()


def test_a_correct_model_passes_and_broken_builds_are_named():
    testing.check_model(TinyBuilder())
    testing.check_model(_builder("NoStages", lambda self, k: nn.Sequential(nn.Flatten(), nn.LazyLinear(k))))
    with pytest.raises(
        AssertionError, match=r"^OneMore fails contract case 'builds_and_round_trips': logits of shape \(2, 6\)$"
    ):
        testing.check_model(_builder("OneMore", lambda self, k: testing.TinyCNN(k + 1)))

    class Unsaved(testing.TinyCNN):  # a weight outside the state dict: the round trip loses it
        def __init__(self, k):
            super().__init__(k)
            self.register_buffer("shift", torch.randn(k), persistent=False)

        def forward(self, x):
            return super().forward(x) + self.shift

    with pytest.raises(AssertionError, match="builds_and_round_trips"):
        testing.check_model(_builder("Unsaved", lambda self, k: Unsaved(k)))

    def lost_layer(self, k):
        model = testing.TinyCNN(k)
        model.feature_info = [{"module": "nowhere"}]
        return model

    with pytest.raises(
        AssertionError,
        match=r"LostLayer fails contract case 'builds_and_round_trips': it raised "
        r"ModelError: .*no layer 'nowhere'",
    ):
        testing.check_model(_builder("LostLayer", lost_layer))


# -- datasets --------------------------------------------------------------------------------


class Squares(Dataset):
    """A correct in-memory dataset: 16 x 16 images of a bright square whose side is the class."""

    name = "kit_squares"
    description = "test"
    fixed_size = True
    default_augment = "flip"
    provides = frozenset({"group"})
    image_size = 16

    def splits(self):
        return ("train", "val")

    def class_names(self):
        return ["small", "medium", "large"]

    def sample(self, i):
        image = torch.zeros(3, 16, 16)
        image[:, : 4 * (i % 3 + 1), : 4 * (i % 3 + 1)] = 1.0
        return {"image": image, "label": torch.tensor(i % 3), "group": torch.tensor(i % 2)}

    def samples(self, split):
        return [self.sample(i) for i in range(5 if split == "train" else 3)]


def _dataset(name: str, **overrides) -> Dataset:
    return type(name, (Squares,), {"name": name, **overrides})()


def test_a_correct_dataset_passes_every_case():
    testing.check_dataset(Squares())


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"class_names": lambda self: ["a", "a", "b"]}, "class names must be unique"),
        ({"class_names": lambda self: []}, r"class_names\(\) is empty"),
        (
            {"identity": lambda self, split: {"split": split, "files": ("a", "b")}},
            r"identity\('train'\) does not survive a JSON round trip",
        ),
        ({"train_split": "training"}, r"the train split 'training' is not one of splits\(\) \('train', 'val'\)"),
    ],
    ids=["duplicate names", "no names", "tuple identity", "train split"],
)
def test_declares_itself_catches_inconsistent_declarations(overrides, message):
    with pytest.raises(AssertionError, match="^Inconsistent fails contract case 'declares_itself': " + message):
        testing.check_dataset(_dataset("Inconsistent", **overrides))


def test_declares_itself_runs_check_and_requires_a_stable_identity():
    from e2kd.errors import DataError

    def check(self):
        raise DataError("data.options.root: /nowhere does not exist")

    with pytest.raises(
        AssertionError,
        match=r"^Missing fails contract case 'declares_itself': it raised DataError: data.options.root: /nowhere",
    ):
        testing.check_dataset(_dataset("Missing", check=check))
    counter = iter(range(100))
    with pytest.raises(
        AssertionError,
        match=r"^Drifting fails contract case 'declares_itself': identity\('train'\) changes from one call to the next$",
    ):
        testing.check_dataset(_dataset("Drifting", identity=lambda self, split: {"call": next(counter)}))
    with pytest.raises(
        AssertionError, match=r"^NoSplits fails contract case 'declares_itself': splits\(\) names no split$"
    ):
        testing.check_dataset(_dataset("NoSplits", splits=lambda self: (), train_split="train"))
    with pytest.raises(
        AssertionError,
        match=r"^UnknownEval fails contract case 'declares_itself': eval_splits\(\) names \['test'\], which splits\(\) \('train', 'val'\) "
        r"does not",
    ):
        testing.check_dataset(_dataset("UnknownEval", eval_splits=lambda self: ("test", "val")))


def _with(field: str, value) -> Callable:
    return lambda self, i: {**Squares.sample(self, i), field: value(Squares.sample(self, i))}


@pytest.mark.parametrize(
    "sample, message",
    [
        (
            _with("label", lambda s: s["label"].int()),
            r"train\[0\]: a class index \(int64 scalar\) expected, got torch.int32 "
            r"of shape \(\)",
        ),
        (
            _with("label", lambda s: s["label"][None]),
            r"train\[0\]: a class index \(int64 scalar\) expected, got torch.int64 "
            r"of shape \(1,\)$",
        ),
        (
            _with("label", lambda s: torch.tensor(3)),
            r"train\[0\]: a class index \(int64 scalar\) expected, got torch.int64 "
            r"of shape \(\)$",
        ),
        (_with("label", lambda s: torch.tensor(-1)), r"train\[0\]: a class index"),
        (_with("image", lambda s: s["image"][:1]), r"train\[0\]: image of shape \(1, 16, 16\)"),
        (_with("image", lambda s: s["image"][0]), r"train\[0\]: image of shape \(16, 16\)$"),
        (
            _with("image", lambda s: s["image"] * 255),
            r"train\[0\]: image of torch.float32 in \[0, 255\]; expected uint8, "
            r"or float in \[0, 1\]",
        ),
        (_with("image", lambda s: s["image"] * 1.5), r"train\[0\]: image of torch.float32 in \[0, 1.5\]"),
        (_with("image", lambda s: s["image"] - 0.5), r"train\[0\]: image of torch.float32 in \[-0.5, 0.5\]"),
        (
            _with("image", lambda s: (s["image"] * 255).to(torch.int16)),
            r"train\[0\]: image of torch.int16 in \[0, 255\]",
        ),
        (
            lambda self, i: {k: v for k, v in Squares.sample(self, i).items() if k != "group"},
            r"train\[0\]: declared field 'group' missing",
        ),
    ],
    ids=[
        "int32",
        "shape (1,)",
        "too large",
        "negative",
        "one channel",
        "2-D",
        "0-255 floats",
        "negative pixels",
        "1.5",
        "int16",
        "no group",
    ],
)
def test_samples_follow_the_contract_names_the_sample(sample, message):
    with pytest.raises(AssertionError, match="^" + message):
        testing.DATASET_CASES["samples_follow_the_contract"](_dataset("Broken", sample=sample))


def test_samples_accept_uint8_images_and_multi_hot_labels_and_read_every_split():
    uint8 = _with("image", lambda s: (s["image"] * 255).to(torch.uint8))
    testing.DATASET_CASES["samples_follow_the_contract"](_dataset("Bytes", sample=uint8))
    multi_hot = _with("label", lambda s: F.one_hot(s["label"], 3).float())
    testing.DATASET_CASES["samples_follow_the_contract"](_dataset("Multi", sample=multi_hot, label_type="multi"))
    with pytest.raises(AssertionError, match=r"^train\[0\]: multi-hot label expected"):
        testing.DATASET_CASES["samples_follow_the_contract"](_dataset("IndexForMulti", label_type="multi"))
    with pytest.raises(AssertionError, match=r"^train\[0\]: multi-hot label expected"):
        testing.DATASET_CASES["samples_follow_the_contract"](
            _dataset("IntMulti", label_type="multi", sample=_with("label", lambda s: F.one_hot(s["label"], 3)))
        )
    with pytest.raises(AssertionError, match=r"^split 'val' is empty"):
        testing.DATASET_CASES["samples_follow_the_contract"](
            _dataset("EmptyVal", samples=lambda self, split: Squares.samples(self, split) if split == "train" else [])
        )
    # only the first `limit` samples are read: a broken fifth sample passes with limit 4, not 5
    late = _dataset("Late", sample=lambda self, i: Squares.sample(self, i) if i < 4 else {"image": None})
    testing.DATASET_CASES["samples_follow_the_contract"](late)
    with pytest.raises(AttributeError):
        testing.dataset_samples_follow_the_contract(late, limit=5)
    late_val = _dataset(
        "LateVal",
        samples=lambda self, split: (
            Squares.samples(self, split)
            + ([{"image": torch.zeros(1, 16, 16), "label": torch.tensor(0)}] if split == "val" else [])
        ),
    )
    with pytest.raises(AssertionError, match=r"^val\[3\]: image of shape"):
        testing.dataset_samples_follow_the_contract(late_val, limit=5)


def test_loads_in_every_view_names_the_view_whose_batches_are_wrong():
    with pytest.raises(AssertionError, match=r"^train view: batch of shape \(2, 3, 16, 16\)"):
        testing.DATASET_CASES["loads_in_every_view"](_dataset("Declared8", image_size=8))
    no_eval = _dataset("TrainOnly", splits=lambda self: ("train",))
    testing.DATASET_CASES["loads_in_every_view"](no_eval)
    bright = _dataset(
        "Bright", sample=lambda self, i: {**Squares.sample(self, i), "image": Squares.sample(self, i)["image"] * 2}
    )
    with pytest.raises(AssertionError, match=r"^train view: pixels in \[0, 2\], not \[0, 1\]"):
        testing.DATASET_CASES["loads_in_every_view"](bright)


def test_loads_in_every_view_reads_the_first_eval_split():
    seen = []

    class Watched(Squares):
        def splits(self):
            return ("train", "val", "test")

        def samples(self, split):
            seen.append(split)
            return Squares.samples(self, split)

    testing.DATASET_CASES["loads_in_every_view"](Watched())
    assert seen == ["train", "val"]


# -- one call per item -----------------------------------------------------------------------


def test_check_functions_run_every_case_and_name_the_first_failure(monkeypatch):
    ran = []
    cases = {
        "first": lambda item: ran.append("first"),
        "second": lambda item: (_ for _ in ()).throw(ValueError("bad value\nsecond line")),
        "third": lambda item: ran.append("third"),
    }
    for kind in ("EXPLAINER", "SIMILARITY", "METRIC", "MODEL", "DATASET"):
        monkeypatch.setitem(vars(testing), f"{kind}_CASES", cases)
    for check, item in (
        (testing.check_explainer, InputXGradient()),
        (testing.check_similarity, Cosine()),
        (testing.check_metric, Agreement()),
        (testing.check_model, TinyBuilder()),
        (testing.check_dataset, Squares()),
    ):
        ran.clear()
        with pytest.raises(AssertionError) as caught:
            check(item)
        assert str(caught.value) == (
            f"{type(item).__name__} fails contract case 'second': it raised ValueError: bad value"
        )
        assert ran == ["first"] and isinstance(caught.value.__cause__, ValueError)


def test_an_assertion_keeps_its_message_and_an_empty_error_is_named():
    def fails(item):
        raise AssertionError("the map is upside down")

    with pytest.raises(AssertionError) as caught:
        testing._run_all({"orientation": fails}, Cosine())
    assert str(caught.value) == "Cosine fails contract case 'orientation': the map is upside down"
    assert isinstance(caught.value.__cause__, AssertionError)
    with pytest.raises(AssertionError, match=r"^Cosine fails contract case 'quiet': it raised KeyError: 'k'$"):
        testing._run_all({"quiet": lambda item: {}["k"]}, Cosine())
    with pytest.raises(
        AssertionError, match=r"^Cosine fails contract case 'empty': it raised RuntimeError: \(no message\)$"
    ):
        testing._run_all({"empty": lambda item: (_ for _ in ()).throw(RuntimeError("  \n "))}, Cosine())


# -- the kit's own test models -------------------------------------------------------------------


def test_tiny_cnn_is_conv_relu_strided_conv_relu_mean_linear_by_hand():
    torch.manual_seed(0)
    model = testing.TinyCNN(num_classes=5, width=3).double()
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    conv1, conv2 = model.stem[0], model.feat[0]
    h = F.relu(F.conv2d(x, conv1.weight, conv1.bias, padding=1))
    h = F.relu(F.conv2d(h, conv2.weight, conv2.bias, stride=2, padding=1))
    assert h.shape == (2, 3, 4, 4)
    torch.testing.assert_close(model(x), F.linear(h.mean(dim=(2, 3)), model.fc.weight, model.fc.bias))
    assert model.feature_info == [{"num_chs": 3, "reduction": 2, "module": "feat"}]
    assert isinstance(model.stem[1], nn.Identity) and conv1.kernel_size == conv2.kernel_size == (3, 3)
    default = testing.TinyCNN()
    assert default.fc.out_features == 3 and default.fc.in_features == 4
    normed = testing.TinyCNN(bn=True)
    assert isinstance(normed.stem[1], nn.BatchNorm2d) and normed.stem[1].num_features == 4
