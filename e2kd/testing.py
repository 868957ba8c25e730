"""The contract kit: the checks every registered item must pass, runnable against your own plugin.

One line per item in your tests::

    from e2kd.testing import check_explainer, check_similarity, check_metric, check_model, check_dataset

    def test_contract():
        check_explainer(MyExplainer())          # raises AssertionError naming the broken case

or one test per case, so a failure names it::

    import pytest
    from e2kd.testing import EXPLAINER_CASES

    @pytest.mark.parametrize("case", EXPLAINER_CASES)
    def test_explainer_contract(case):
        EXPLAINER_CASES[case](MyExplainer())

The same functions check e2kd's built-ins (``tests/test_contracts.py``). Values are compared
against independent computations: one sample at a time, a fresh capture per class, finite
differences, a live teacher versus its replay.
"""

from __future__ import annotations

import gc
import json
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .api import Dataset, EvalBatch, Explainer, Metric, ModelBuilder, Similarity
from .errors import ModelError, PluginError

__all__ = [
    "TinyCNN",
    "model_for",
    "check_gradient",
    "check_explainer",
    "check_similarity",
    "check_metric",
    "check_model",
    "check_dataset",
    "EXPLAINER_CASES",
    "SIMILARITY_CASES",
    "METRIC_CASES",
    "MODEL_CASES",
    "DATASET_CASES",
]


class TinyCNN(nn.Module):
    """conv -> relu -> conv ('feat') -> relu -> GAP -> fc, small enough for finite differences."""

    def __init__(self, num_classes: int = 3, width: int = 4, bn: bool = False) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width) if bn else nn.Identity(), nn.ReLU()
        )
        self.feat = nn.Sequential(nn.Conv2d(width, width, 3, stride=2, padding=1), nn.ReLU())
        self.fc = nn.Linear(width, num_classes)
        self.feature_info = [{"num_chs": width, "reduction": 2, "module": "feat"}]

    def forward(self, x):
        return self.fc(self.feat(self.stem(x)).mean(dim=(2, 3)))


def _tiny_vit(num_classes: int = 3) -> nn.Module:
    import timm

    return timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        num_classes=num_classes,
        img_size=8,
        patch_size=4,
        embed_dim=16,
        depth=2,
        num_heads=2,
    )


def _bcos_small(num_classes: int = 3) -> nn.Module:
    from .registry import get_model_builder

    return get_model_builder("bcos_small", widths=[4, 6]).build(num_classes)


def model_for(
    explainer: Explainer,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
    candidates: list[Callable[[], nn.Module]] | None = None,
) -> nn.Module:
    """A tiny 3-class model for 8 x 8 images that ``explainer`` accepts: a plain CNN, else a small
    B-cos network (if registered), else a tiny timm ViT. Pass ``candidates`` for other architectures."""
    makers = candidates or [TinyCNN, _bcos_small, _tiny_vit]
    problems = []
    for make in makers:
        torch.manual_seed(seed)
        try:
            model = make().to(dtype)
            explainer.check_model(model)
            return model
        except (ModelError, PluginError) as exc:
            problems.append(str(exc))
    raise AssertionError(
        f"no test model fits explainer {explainer.name!r} ({'; '.join(problems)}); "
        f"pass candidates=[...] with a model it accepts"
    )


def check_gradient(
    loss_fn: Callable[[], torch.Tensor],
    params: list[torch.Tensor],
    *,
    samples: int = 3,
    rel: float = 1e-5,
    abs: float = 1e-8,
    seed: int = 0,
) -> list[torch.Tensor]:
    """Autograd gradient of ``loss_fn()`` w.r.t. ``params`` vs central finite differences on ``samples``
    random entries of every parameter (use float64 models); returns the autograd gradients."""
    grads = torch.autograd.grad(loss_fn(), params, allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
    assert any(g.abs().max() > 0 for g in grads), "all gradients are zero"
    gen = torch.Generator().manual_seed(seed)
    eps = 1e-6
    for p, g in zip(params, grads):
        flat = p.data.view(-1)
        for i in torch.randperm(flat.numel(), generator=gen)[:samples].tolist():
            orig = flat[i].item()
            flat[i] = orig + eps
            up = loss_fn().item()
            flat[i] = orig - eps
            down = loss_fn().item()
            flat[i] = orig
            numeric = (up - down) / (2 * eps)
            got = g.reshape(-1)[i].item()
            assert math.isclose(got, numeric, rel_tol=rel, abs_tol=abs), (
                f"gradient of parameter {tuple(p.shape)}[{i}]: autograd {got:.6g}, finite differences {numeric:.6g}"
            )
    return grads


def _x(n: int = 4, dtype: torch.dtype = torch.float64, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 8, 8, dtype=dtype, generator=torch.Generator().manual_seed(seed))


# -- explainers ---------------------------------------------------------------------------


def explainer_shape_and_batch(explainer: Explainer) -> None:
    """(B, C, H, W) at input resolution, input dtype, finite, non-zero; a batch equals one sample at a time."""
    model = model_for(explainer).eval()
    x = _x()
    channels = explainer.map_channels(x.shape[1])
    total = 0.0
    for c in range(3):
        maps = explainer.explain(model, x, c)
        assert maps.shape == (4, channels, 8, 8), f"map shape {tuple(maps.shape)}, expected {(4, channels, 8, 8)}"
        assert maps.dtype == x.dtype, f"map dtype {maps.dtype}, input dtype {x.dtype}"
        assert torch.isfinite(maps).all(), "the maps are not finite"
        one_by_one = torch.cat([explainer.explain(model, x[i : i + 1], c) for i in range(4)])
        torch.testing.assert_close(maps, one_by_one, msg=lambda m: f"batch differs from one sample at a time: {m}")
        total += float(maps.abs().sum())
    assert total > 0, "every map is zero"


def explainer_several_classes_one_capture(explainer: Explainer) -> None:
    """``explain`` may be called once per class on one capture (top-k / all classes / multi-label):
    each call equals a fresh capture for that class (the graph must be retained)."""
    model = model_for(explainer).eval()
    x = _x()
    with torch.enable_grad():
        with explainer.capture(model, x, trainable=False) as cap:
            logits = model(cap.inputs)
        maps = [cap.explain(logits, torch.full((4,), c, dtype=torch.long)).detach() for c in (0, 2, 1)]
    for c, got in zip((0, 2, 1), maps):
        torch.testing.assert_close(
            got,
            explainer.explain(model, x, c),
            msg=lambda m: f"class {c} explained after other classes on one capture differs: {m}",  # noqa: B023
        )


def explainer_detached_by_default(explainer: Explainer) -> None:
    """``explain`` without ``create_graph`` (the default) returns a map that holds no graph (a
    teacher's or an evaluated model's map keeps no activations alive); with it, one that does."""
    model = model_for(explainer).eval()
    x = _x()
    with torch.enable_grad():
        with explainer.capture(model, x, trainable=True) as cap:
            logits = model(cap.inputs)
        target = torch.zeros(4, dtype=torch.long)
        assert not cap.explain(logits, target).requires_grad, "explain(...) without create_graph keeps a graph"
        if explainer.differentiable:
            assert cap.explain(logits, target, create_graph=True).requires_grad, (
                "explain(..., create_graph=True) returns a map without a graph"
            )


def explainer_frozen_teacher(explainer: Explainer) -> None:
    """A frozen teacher (parameters with requires_grad=False, ``trainable=False``) is explained:
    the captured activations must be made to require grad by the method itself."""
    teacher = model_for(explainer, seed=1).eval().requires_grad_(False)
    maps = explainer.explain(teacher, _x(), 0)
    assert torch.isfinite(maps).all() and maps.abs().sum() > 0, "a teacher whose parameters are frozen gets a zero map"


def explainer_hooks_released(explainer: Explainer) -> None:
    """No hook survives a capture, fused attention is restored, and repeated use does not grow memory."""
    model = model_for(explainer, torch.float32).eval()
    x = _x(2, torch.float32)
    fused_before = [getattr(m, "fused_attn", None) for m in model.modules()]

    def hooks() -> list[tuple[int, int, int]]:
        return [(len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks)) for m in model.modules()]

    hooks_before = hooks()

    def live_tensors() -> int:
        gc.collect()
        return sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor))

    for _ in range(3):
        explainer.explain(model, x, 0)
    before = live_tensors()
    for _ in range(30):
        explainer.explain(model, x, 0)
    assert live_tensors() <= before + 2, "tensors accumulate across explanations (a hook or graph is kept)"
    assert hooks() == hooks_before, "a hook is left on the model"
    assert [getattr(m, "fused_attn", None) for m in model.modules()] == fused_before, "fused attention not restored"


def explainer_trains_or_refuses(explainer: Explainer) -> None:
    """Differentiable: the e2KD gradient through the student's map equals finite differences, the
    teacher replayed from its stored outputs gives the live loss, and a few steps lower the term.
    Evaluation-only (``differentiable = False``): the distiller refuses it with lam > 0."""
    from .distill import Distiller
    from .explaining import explained_forward
    from .registry import get_similarity

    cosine = get_similarity("cosine")
    teacher, student = model_for(explainer, seed=1), model_for(explainer, seed=2)
    if not explainer.differentiable:
        try:
            Distiller(teacher, student, explainer=explainer, similarity=cosine, lam=1.0)
        except PluginError as exc:
            assert "not differentiable" in str(exc)
            return
        raise AssertionError("an evaluation-only explainer was accepted for training with lam > 0")
    distiller = Distiller(teacher, student, explainer=explainer, similarity=cosine, lam=3.0)
    student.eval()  # fixed normalisation statistics: the loss is a plain function of the weights
    x = _x(3)
    params = [p for p in student.parameters() if p.requires_grad]
    check_gradient(lambda: distiller(x)["explanation"], params, rel=1e-4, abs=1e-7)
    # frozen teacher: replaying its logits and maps gives the live loss
    logits, maps, _ = explained_forward(teacher, x, explainer)
    replay = Distiller(None, student, explainer=explainer, similarity=cosine, lam=3.0)
    live, frozen = distiller(x), replay(x, teacher_logits=logits, teacher_maps=maps[:, 0])
    torch.testing.assert_close(frozen["loss"], live["loss"], msg=lambda m: f"frozen replay differs from live: {m}")
    # and training lowers the explanation term
    teacher, student = model_for(explainer, torch.float32, 1), model_for(explainer, torch.float32, 2)
    distiller = Distiller(teacher, student, explainer=explainer, similarity=cosine, lam=1.0)
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-2)
    x = _x(8, torch.float32)
    first = None
    for _ in range(5):
        out = distiller(x)
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        first = first if first is not None else out["explanation"].item()
    assert torch.isfinite(out["loss"]) and out["explanation"].item() < first, "five steps did not lower the term"


def explainer_upsampling_declared_truthfully(explainer: Explainer) -> None:
    """If ``upsamples_bilinearly()``: ``explain(..., upsample=False)`` is smaller and its bilinear
    upsampling is the map, for the frozen and the trainable capture (value and gradient)."""
    if not explainer.upsamples_bilinearly():
        return
    from .upsampling import upsample

    model = model_for(explainer).eval()
    x = _x()
    target = torch.tensor([0, 1, 2, 0])
    with torch.enable_grad():
        with explainer.capture(model, x, trainable=True) as cap:
            logits = model(cap.inputs)
        full = cap.explain(logits, target, create_graph=True)
        low = cap.explain(logits, target, create_graph=True, upsample=False)
    assert low.dim() == 4 and low.shape[-2:] != full.shape[-2:], (
        f"upsample=False gave {tuple(low.shape)}, the same size as the upsampled map"
    )
    torch.testing.assert_close(
        upsample(low, full.shape[-2:]),
        full,
        msg=lambda m: f"bilinear upsampling of the upsample=False map is not the map: {m}",
    )
    params = [p for p in model.parameters() if p.requires_grad]
    weights = torch.rand(full.shape, dtype=full.dtype, generator=torch.Generator().manual_seed(3))
    g_full = torch.autograd.grad((full * weights).sum(), params, retain_graph=True, allow_unused=True)
    g_low = torch.autograd.grad((upsample(low, full.shape[-2:]) * weights).sum(), params, allow_unused=True)
    for a, b in zip(g_full, g_low):
        if a is not None or b is not None:
            torch.testing.assert_close(a, b, msg=lambda m: f"gradients through the two maps differ: {m}")


EXPLAINER_CASES: dict[str, Callable[[Explainer], None]] = {
    "shape_and_batch": explainer_shape_and_batch,
    "several_classes_one_capture": explainer_several_classes_one_capture,
    "detached_by_default": explainer_detached_by_default,
    "frozen_teacher": explainer_frozen_teacher,
    "hooks_released": explainer_hooks_released,
    "trains_or_refuses": explainer_trains_or_refuses,
    "upsampling_declared_truthfully": explainer_upsampling_declared_truthfully,
}


# -- similarities -------------------------------------------------------------------------


def similarity_batch_native(similarity: Similarity) -> None:
    """(B,) finite values; a batch equals one pair at a time."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(5, 1, 8, 8, generator=g), torch.rand(5, 1, 8, 8, generator=g)
    batch = similarity(a, b)
    assert batch.shape == (5,) and torch.isfinite(batch).all(), f"values of shape {tuple(batch.shape)}, expected (5,)"
    torch.testing.assert_close(batch, torch.cat([similarity(a[i : i + 1], b[i : i + 1]) for i in range(5)]))


def similarity_self_is_best(similarity: Similarity) -> None:
    """A map compared with itself scores best, in the direction ``higher_is_better`` declares."""
    g = torch.Generator().manual_seed(1)
    a, b = torch.rand(5, 1, 8, 8, generator=g), torch.rand(5, 1, 8, 8, generator=g)
    best, other = similarity(a, a), similarity(a, b)
    ok = (best >= other - 1e-6) if similarity.higher_is_better else (best <= other + 1e-6)
    assert ok.all(), f"self-similarity is not the best value (higher_is_better={similarity.higher_is_better})"


def similarity_training_reduces_distance(similarity: Similarity) -> None:
    """Differentiable: gradient steps on ``loss`` move a map towards its target (the loss has the right sign)."""
    if not similarity.differentiable:
        return
    g = torch.Generator().manual_seed(2)
    target = torch.rand(4, 1, 8, 8, generator=g)
    x0 = torch.rand(4, 1, 8, 8, generator=g)
    x = x0.clone().requires_grad_(True)
    start = similarity.loss(x, target).mean().item()
    optimizer = torch.optim.SGD([x], lr=0.05)
    for _ in range(20):
        optimizer.zero_grad()
        loss = similarity.loss(x, target).mean()
        loss.backward()
        assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0, "zero or non-finite gradient"
        optimizer.step()
    end = similarity.loss(x, target).mean().item()
    score = similarity(x.detach(), target).mean().item()
    first = similarity(x0, target).mean().item()
    assert end < start, f"minimising the loss did not lower it ({start:.4g} -> {end:.4g})"
    assert (score > first) if similarity.higher_is_better else (score < first), (
        "minimising the loss made the maps less similar: check higher_is_better"
    )


def similarity_feature_resolution_exact(similarity: Similarity) -> None:
    """If ``feature_resolution``: ``upsampled(a, b, size)`` equals the similarity of the upsampled
    maps, value and gradient, for maps at the same, different and full resolution (float64)."""
    if not similarity.feature_resolution:
        return
    from .upsampling import upsample

    g = torch.Generator().manual_seed(4)
    size = (24, 20)
    for a_size, b_size in (((6, 5), (6, 5)), ((3, 5), (12, 10)), ((6, 5), size), (size, (4, 4))):
        a = torch.rand(3, 1, *a_size, dtype=torch.float64, generator=g).requires_grad_(True)
        b = torch.rand(3, 1, *b_size, dtype=torch.float64, generator=g)
        got = similarity.upsampled(a, b, size)
        want = similarity(upsample(a, size), upsample(b, size))
        torch.testing.assert_close(
            got,
            want,
            msg=lambda m: f"upsampled() differs from the upsampled maps' value ({a_size} vs {b_size} -> {size}): {m}",  # noqa: B023
        )
        if similarity.differentiable:
            (g_got,) = torch.autograd.grad(got.sum(), a)
            (g_want,) = torch.autograd.grad(want.sum(), a)
            torch.testing.assert_close(g_got, g_want, msg=lambda m: f"upsampled() has another gradient: {m}")


SIMILARITY_CASES: dict[str, Callable[[Similarity], None]] = {
    "batch_native": similarity_batch_native,
    "self_is_best": similarity_self_is_best,
    "training_reduces_distance": similarity_training_reduces_distance,
    "feature_resolution_exact": similarity_feature_resolution_exact,
}


# -- metrics ------------------------------------------------------------------------------


def input_gradient(model: nn.Module, images: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """d logit_target / d image, summed over channels: the kit's explanation of any model (and a
    reference explainer for tests of metrics that explain other models, e.g. randomised copies)."""
    images = images.detach().requires_grad_(True)
    with torch.enable_grad():
        (grad,) = torch.autograd.grad(model(images).gather(1, target.view(-1, 1)).sum(), images)
    return grad.sum(1, keepdim=True)


def full_eval_batch(n: int = 6, num_classes: int = 3, seed: int = 0) -> EvalBatch:
    """A batch with every field a metric may require (random values, single labels); the model in
    the loop is a seeded :class:`TinyCNN`, explained by its input gradient."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % num_classes
    groups = torch.randint(0, num_classes, (n,), generator=g)
    images = torch.rand(n, 3, 8, 8, generator=g)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = TinyCNN(num_classes=num_classes).eval()

    def forward(x: torch.Tensor, model: nn.Module = model) -> torch.Tensor:
        with torch.no_grad():
            return model(x)

    return EvalBatch(
        logits=torch.randn(n, num_classes, generator=g),
        labels=labels,
        teacher_logits=torch.randn(n, num_classes, generator=g),
        explanations=torch.rand(n, 1, 8, 8, generator=g),
        teacher_explanations=torch.rand(n, 1, 8, 8, generator=g),
        label_explanations=torch.randn(n, 1, 8, 8, generator=g),
        label_masks=(torch.rand(n, 1, 8, 8, generator=g) > 0.6).float(),
        label_pairs=torch.stack([torch.arange(n), labels], dim=1),
        groups=groups,
        in_distribution=groups == labels,
        images=images,
        explain=lambda x, target, model=model: input_gradient(model, x, target),
        forward=forward,
        model=model,
    )


def _split_batch(batch: EvalBatch, lo: int, hi: int) -> EvalBatch:
    return EvalBatch(**{k: (v[lo:hi] if torch.is_tensor(v) else v) for k, v in vars(batch).items()})


def _flat(value: Any) -> dict[str, float]:
    from .evaluate import flatten_metrics

    return flatten_metrics(value) if isinstance(value, dict) else {"value": value}


def metric_accumulates(metric: Metric) -> None:
    """Finite values; two half batches give exactly what the whole batch gives (``update``/``compute``)."""
    batch = full_eval_batch()
    missing = metric.requires - batch.available()
    assert not missing, f"the kit's batch lacks {sorted(missing)}"
    metric.reset()
    metric.update(batch)
    whole = _flat(metric.compute())
    metric.reset()
    metric.update(_split_batch(batch, 0, 3))
    metric.update(_split_batch(batch, 3, 6))
    halves = _flat(metric.compute())
    assert whole and whole.keys() == halves.keys(), "compute() returns other keys after two updates"
    for key, value in whole.items():
        assert math.isfinite(value), f"{key} is not finite"
        assert math.isclose(halves[key], value, rel_tol=1e-6, abs_tol=1e-9), (
            f"{key}: {halves[key]} over two half batches, {value} over the whole batch"
        )


def metric_reset_forgets(metric: Metric) -> None:
    """``reset`` starts over: a second evaluation gives the same values as the first."""
    batch = full_eval_batch(seed=3)
    values = []
    for _ in range(2):
        metric.reset()
        metric.update(batch)
        values.append(json.dumps(_flat(metric.compute()), sort_keys=True))
    assert values[0] == values[1], "values depend on an earlier evaluation: reset() keeps state"


def metric_merges(metric: Metric) -> None:
    """Two processes' states merged (``state``/``merge``) give the values of one evaluation of all samples."""
    batch = full_eval_batch(seed=4)
    metric.reset()
    metric.update(batch)
    whole = _flat(metric.compute())
    other = type(metric)(metric.options)
    metric.reset()
    metric.update(_split_batch(batch, 0, 2))
    other.update(_split_batch(batch, 2, 6))
    metric.merge(other.state())
    merged = _flat(metric.compute())
    assert merged.keys() == whole.keys(), "merged states compute other keys"
    for key, value in whole.items():
        assert math.isclose(merged[key], value, rel_tol=1e-6, abs_tol=1e-9), (
            f"{key}: {merged[key]} from merged states, {value} from one evaluation"
        )


METRIC_CASES: dict[str, Callable[[Metric], None]] = {
    "accumulates": metric_accumulates,
    "reset_forgets": metric_reset_forgets,
    "merges": metric_merges,
}


# -- models -------------------------------------------------------------------------------


def model_builds_and_round_trips(builder: ModelBuilder, image_size: int = 32) -> None:
    """(B, K) finite logits on [0, 1] images; a state-dict round trip gives the same logits; the
    default explanation layer (if declared) resolves."""
    from .models import default_layer_name, resolve_layer

    model = builder.build(5).eval()
    x = torch.rand(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(x)
    assert logits.shape == (2, 5) and torch.isfinite(logits).all(), f"logits of shape {tuple(logits.shape)}"
    again = builder.build(5).eval()
    again.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(again(x), logits)
    if getattr(model, "feature_info", None) is not None:
        resolve_layer(model, default_layer_name(model))


MODEL_CASES: dict[str, Callable[[ModelBuilder], None]] = {"builds_and_round_trips": model_builds_and_round_trips}


# -- datasets -----------------------------------------------------------------------------


def dataset_declares_itself(dataset: Dataset) -> None:
    """Splits, class names, identity: consistent and JSON-serialisable; files exist (``check``)."""
    dataset.check()
    splits = dataset.splits()
    assert splits, "splits() names no split"
    assert dataset.train_split in splits, f"the train split {dataset.train_split!r} is not one of splits() {splits}"
    unknown = sorted(set(dataset.eval_splits()) - set(splits))
    assert not unknown, f"eval_splits() names {unknown}, which splits() {splits} does not"
    names = dataset.class_names()
    assert names, "class_names() is empty"
    assert len(set(names)) == len(names), "class names must be unique"
    for split in splits:
        identity = dataset.identity(split)
        assert json.loads(json.dumps(identity)) == identity, (
            f"identity({split!r}) does not survive a JSON round trip (use str, int, float, bool, list, dict)"
        )
        assert identity == dataset.identity(split), f"identity({split!r}) changes from one call to the next"


def dataset_samples_follow_the_contract(dataset: Dataset, limit: int = 4) -> None:
    """Each sample: image (3, H, W) uint8 or float in [0, 1]; a label of the declared type; the
    declared optional fields."""
    k = dataset.num_classes
    for split in dataset.splits():
        samples = dataset.samples(split)
        assert len(samples) > 0, f"split {split!r} is empty"
        for i in range(min(limit, len(samples))):
            item = samples[i]
            image = item["image"]
            assert image.dim() == 3 and image.shape[0] == 3, f"{split}[{i}]: image of shape {tuple(image.shape)}"
            assert image.dtype == torch.uint8 or (
                image.is_floating_point() and 0 <= image.min() and image.max() <= 1
            ), (
                f"{split}[{i}]: image of {image.dtype} in [{float(image.min()):.4g}, {float(image.max()):.4g}]; "
                f"expected uint8, or float in [0, 1]"
            )
            label = torch.as_tensor(item["label"])
            if dataset.label_type == "multi":
                assert label.shape == (k,) and label.is_floating_point(), f"{split}[{i}]: multi-hot label expected"
            else:
                assert label.dim() == 0 and label.dtype == torch.int64 and 0 <= int(label) < k, (
                    f"{split}[{i}]: a class index (int64 scalar) expected, got {label.dtype} of shape {tuple(label.shape)}"
                )
            for name in dataset.provides:
                assert name in item, f"{split}[{i}]: declared field {name!r} missing"


def dataset_loads_in_every_view(dataset: Dataset) -> None:
    """Batches of the ``train`` and ``eval`` views come out at the dataset's image size, float in [0, 1]."""
    from .data import make_loader, split_view

    for view, split in (
        ("train", dataset.train_split),
        ("eval", dataset.eval_splits()[0] if dataset.eval_splits() else dataset.train_split),
    ):
        batch = next(iter(make_loader(split_view(dataset, split, view), 2)))
        size = dataset.image_size
        assert batch["image"].shape[1:] == (3, size, size) and batch["image"].dtype == torch.float32, (
            f"{view} view: batch of shape {tuple(batch['image'].shape)}"
        )
        assert 0 <= batch["image"].min() and batch["image"].max() <= 1, (
            f"{view} view: pixels in [{float(batch['image'].min()):.4g}, {float(batch['image'].max()):.4g}], not [0, 1]"
        )


DATASET_CASES: dict[str, Callable[[Dataset], None]] = {
    "declares_itself": dataset_declares_itself,
    "samples_follow_the_contract": dataset_samples_follow_the_contract,
    "loads_in_every_view": dataset_loads_in_every_view,
}


# -- one call per item ----------------------------------------------------------------------


def _run_all(cases: dict[str, Callable], item: Any) -> None:
    """Every case on ``item``; the first failure, an assertion or any error the item raises, becomes
    an AssertionError naming the item and the case (an error's first line; the cause is chained)."""
    for name, case in cases.items():
        try:
            case(item)
        except AssertionError as exc:
            raise AssertionError(f"{type(item).__name__} fails contract case {name!r}: {exc}") from exc
        except Exception as exc:
            raise AssertionError(
                f"{type(item).__name__} fails contract case {name!r}: it raised "
                f"{type(exc).__name__}: {_first_line(exc)}"
            ) from exc


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else "(no message)"


def check_explainer(explainer: Explainer) -> None:
    """Every explainer contract case (see :data:`EXPLAINER_CASES`)."""
    _run_all(EXPLAINER_CASES, explainer)


def check_similarity(similarity: Similarity) -> None:
    """Every similarity contract case (see :data:`SIMILARITY_CASES`)."""
    _run_all(SIMILARITY_CASES, similarity)


def check_metric(metric: Metric) -> None:
    """Every metric contract case (see :data:`METRIC_CASES`)."""
    _run_all(METRIC_CASES, metric)


def check_model(builder: ModelBuilder) -> None:
    """Every model-builder contract case (see :data:`MODEL_CASES`)."""
    _run_all(MODEL_CASES, builder)


def check_dataset(dataset: Dataset) -> None:
    """Every dataset contract case (see :data:`DATASET_CASES`)."""
    _run_all(DATASET_CASES, dataset)
