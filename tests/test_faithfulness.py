"""Faithfulness and randomisation metrics: against Quantus (the reference library) on the same
model, images, maps and settings, and against hand computations on a 4 x 4 image and a linear model.

Where Quantus' randomness can be fixed the values must agree to 1e-5 (deletion = PixelFlipping /
RegionPerturbation, ROAD with noise 0, MPRT); ROAD's noise cannot be drawn from the same stream
(numpy's global generator there, torch's here), so its distribution is compared statistically.
"""

import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import e2kd
from e2kd.api import EvalBatch
from e2kd.errors import ModelError, PluginError
from e2kd.evaluate import evaluate
from e2kd.testing import TinyCNN, input_gradient
from e2kd_plugins.metrics import faithfulness
from e2kd_plugins.metrics.faithfulness import (
    area_under,
    perturbation_curve,
    pixel_ranks,
    pixel_relevance,
    road_predictions,
)
from e2kd_plugins.metrics.imputation import linear_imputation
from e2kd_plugins.metrics.randomisation import randomisable_layers, randomised_models

from .conftest import dev_extra

quantus = dev_extra("quantus")


def _model(channels: int = 3, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = TinyCNN(num_classes=4, width=6)
    if channels != 3:
        model.stem[0] = nn.Conv2d(channels, 6, 3, padding=1)
    return model.eval()


def _forward(model):
    def forward(images, model=model):
        with torch.no_grad():
            return model(images)

    return forward


def _probabilities(model, x):
    with torch.no_grad():
        return model(torch.as_tensor(x)).softmax(1).numpy()


def _maps(shape, seed=1):
    """Smooth-ish random maps with distinct values (no ties: Quantus' sort is not stable)."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g) + torch.linspace(0, 1e-3, math.prod(shape[1:])).view(shape[1:])


def _quiet(metric_class, **options):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return metric_class(disable_warnings=True, display_progressbar=False, **options)


@pytest.mark.parametrize("size", [12, 6])
def test_deletion_pixel_by_pixel_equals_quantus_pixel_flipping(size):
    model = _model()
    x = torch.rand(5, 3, size, size, generator=torch.Generator().manual_seed(2))
    maps = _maps((5, 1, size, size))
    classes = model(x).argmax(1)
    per_step = 4  # pixels; Quantus counts features of the channel-broadcast map: 3 x 4 per step
    pf = _quiet(quantus.PixelFlipping, features_in_step=3 * per_step, perturb_baseline=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = np.array(
            pf(model=model, x_batch=x.numpy(), y_batch=classes.numpy(), a_batch=maps.numpy(), device="cpu")
        )
    fractions, ours = perturbation_curve(
        _forward(model), x, maps[:, 0], classes, patch_size=1, patches_per_step=per_step, chunk=10
    )
    assert ours.shape == (5, size * size // per_step + 1)
    default = perturbation_curve(_forward(model), x, maps[:, 0], classes, patches_per_step=per_step)[1]
    assert torch.equal(default, ours)  # pixel by pixel unless told otherwise
    # without a step size: the patches divided into `steps` steps (default 32), rounded up: 33 pixels
    # make 17 steps of 2 (and 34 steps of 1 were the default 33)
    odd, relevance = torch.rand(5, 3, 3, 11), _maps((5, 3, 11), seed=9)
    by_steps, _ = perturbation_curve(_forward(model), odd, relevance, classes, patches_per_step=None)
    assert len(by_steps) == 18 and by_steps[1] == 2 / 33
    np.testing.assert_allclose(ours[:, 1:].numpy(), theirs, atol=1e-5)
    np.testing.assert_allclose(ours[:, 0].numpy(), _probabilities(model, x)[np.arange(5), classes], atol=1e-6)
    assert fractions[0] == 0 and fractions[-1] == 1 and fractions[1] == pytest.approx(per_step / size**2)


@pytest.mark.parametrize(
    ("size", "order"),
    [((12, 12), "morf"), ((10, 10), "morf"), ((10, 10), "lerf"), ((9, 11), "morf"), ((11, 9), "lerf")],
)
def test_deletion_by_patches_equals_quantus_region_perturbation(size, order):
    """Quantus reports the drop y(x) - y(x_k); 10 px with 4-px patches checks the cut-short edge patches
    of the centred grid, 9 x 11 its uneven split (1 + 2 rows, 0 + 1 columns of padding) per axis."""
    model = _model()
    x = torch.rand(4, 3, *size, generator=torch.Generator().manual_seed(3))
    maps = _maps((4, 1, *size), seed=4)
    classes = model(x).argmax(1)
    n_patches = math.ceil(size[0] / 4) * math.ceil(size[1] / 4)
    rp = _quiet(
        quantus.RegionPerturbation, patch_size=4, order=order, regions_evaluation=n_patches, perturb_baseline=0.0
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = np.array(
            rp(model=model, x_batch=x.numpy(), y_batch=classes.numpy(), a_batch=maps.numpy(), device="cpu")
        )
    fractions, ours = perturbation_curve(
        _forward(model), x, maps[:, 0], classes, patch_size=4, most_relevant_first=order == "morf"
    )
    np.testing.assert_allclose((ours[:, :1] - ours[:, 1:]).numpy(), theirs, atol=1e-5)
    assert fractions.dtype == torch.float64 and fractions[1] == 1 / n_patches


def _linear(weight: torch.Tensor, bias: torch.Tensor) -> nn.Module:
    model = nn.Sequential(nn.Flatten(), nn.Linear(weight.shape[1], weight.shape[0], dtype=weight.dtype))
    with torch.no_grad():
        model[1].weight.copy_(weight)
        model[1].bias.copy_(bias)
    return model.eval()


def test_deletion_and_insertion_by_hand_on_a_4x4_image_and_a_linear_model():
    """logit_t(x) = w_t . x + b_t, so removing a patch subtracts w_t . x over it (baseline 0) and
    inserting it adds the same; patches of 2 x 2, ranked by their summed relevance."""
    g = torch.Generator().manual_seed(5)
    x = torch.rand(1, 1, 4, 4, generator=g, dtype=torch.float64)
    w = torch.randn(2, 16, generator=g, dtype=torch.float64)
    b = torch.tensor([0.5, -0.25], dtype=torch.float64)
    model = _linear(w, b)
    relevance = torch.tensor([[[1, 1, 9, 9], [1, 1, 9, 9], [5, 5, 0, 0], [5, 5, 0, -1.0]]], dtype=torch.float64)
    # patch order, most relevant first: top right (36), bottom left (20), top left (4), bottom right (-1)
    patches = [(0, 2), (2, 0), (0, 0), (2, 2)]
    contribution = [float((w[1].view(4, 4) * x[0, 0])[r : r + 2, c : c + 2].sum()) for r, c in patches]
    full = float(w[1] @ x.flatten() + b[1])
    target = torch.tensor([1])
    kwargs = {"patch_size": 2, "output": "logit"}
    fractions, deletion = perturbation_curve(_forward(model), x, relevance, target, **kwargs)
    expected = [full - sum(contribution[:k]) for k in range(5)]
    np.testing.assert_allclose(deletion[0].numpy(), expected, atol=1e-12)
    np.testing.assert_allclose(fractions.numpy(), [0, 0.25, 0.5, 0.75, 1])
    _, insertion = perturbation_curve(_forward(model), x, relevance, target, insertion=True, **kwargs)
    np.testing.assert_allclose(insertion[0].numpy(), [b[1] + sum(contribution[:k]) for k in range(5)], atol=1e-12)
    _, lerf = perturbation_curve(_forward(model), x, relevance, target, most_relevant_first=False, **kwargs)
    np.testing.assert_allclose(lerf[0].numpy(), [full - sum(contribution[::-1][:k]) for k in range(5)], atol=1e-12)
    # two patches per step, and a baseline of 0.5: a removed pixel now contributes w * 0.5
    _, pairs = perturbation_curve(_forward(model), x, relevance, target, patches_per_step=2, baseline=0.5, **kwargs)
    half = [float((w[1].view(4, 4) * 0.5)[r : r + 2, c : c + 2].sum()) for r, c in patches]
    expected = [full, full - sum(contribution[:2]) + sum(half[:2]), b[1] + sum(half)]
    np.testing.assert_allclose(pairs[0].numpy(), expected, atol=1e-12)
    # the area: trapezoids over the fractions removed
    trapezoids = sum((deletion[0, k] + deletion[0, k + 1]) / 2 * 0.25 for k in range(4))
    assert float(area_under(fractions, deletion[0])) == pytest.approx(float(trapezoids))


def test_mean_baseline_and_probability_output_by_hand():
    g = torch.Generator().manual_seed(6)
    x = torch.rand(2, 3, 4, 4, generator=g, dtype=torch.float64)
    w = torch.randn(3, 48, generator=g, dtype=torch.float64)
    model = _linear(w, torch.zeros(3, dtype=torch.float64))
    relevance = _maps((2, 4, 4), seed=7).double()
    target = torch.tensor([2, 0])
    _, scores = perturbation_curve(_forward(model), x, relevance, target, patch_size=4, baseline="mean")
    means = x.mean(dim=(2, 3), keepdim=True).expand_as(x)  # one patch: the whole image, at once
    for i in range(2):
        for k, image in enumerate([x[i], means[i]]):
            assert float(scores[i, k]) == pytest.approx(float((w @ image.flatten()).softmax(0)[target[i]]))


def test_ties_keep_raster_order_and_ranks_cover_every_pixel_once():
    relevance = torch.tensor([[[2.0, 2.0, 1.0], [3.0, 2.0, 1.0], [0.0, 0.0, 1.0]]])
    ranks, n = pixel_ranks(relevance, 1, most_relevant_first=True)
    assert n == 9
    assert ranks[0].tolist() == [[1, 2, 4], [0, 3, 5], [7, 8, 6]]
    ranks, n = pixel_ranks(relevance, 2, most_relevant_first=False)  # 2 x 2 patches: sums 9, 2, 0, 1
    assert n == 4 and ranks[0].tolist() == [[3, 3, 2], [3, 3, 2], [0, 0, 1]]


def test_many_ties_keep_raster_order_where_an_unstable_sort_would_not():
    relevance = (torch.rand(1, 64, 64, generator=torch.Generator().manual_seed(30)) > 0.5).float()
    ranks, _ = pixel_ranks(relevance, 1, most_relevant_first=True)
    ones = relevance.flatten().nonzero()[:, 0]
    assert torch.equal(ranks.flatten()[ones], torch.arange(len(ones)))
    assert torch.equal(pixel_ranks(relevance, 1, True)[0], pixel_ranks(relevance, 1, most_relevant_first=True)[0])


def test_maps_at_another_resolution_are_summed_over_channels_and_resized_bilinearly():
    maps = torch.rand(2, 3, 4, 5, generator=torch.Generator().manual_seed(31))
    expected = torch.nn.functional.interpolate(
        maps.sum(1, keepdim=True), size=(8, 10), mode="bilinear", align_corners=False
    )
    torch.testing.assert_close(pixel_relevance(maps, (8, 10)), expected[:, 0])
    torch.testing.assert_close(pixel_relevance(maps, (4, 5)), maps.sum(1))


def _batch(model, x, maps, teacher_logits=None):
    """An EvalBatch as the evaluator builds it, with fixed maps for the model's explanations."""
    with torch.no_grad():
        logits = model(x)

    def explain(images, target, model=model):
        assert images is x
        return maps

    return EvalBatch(
        logits=logits, images=x, forward=_forward(model), explain=explain, model=model, teacher_logits=teacher_logits
    )


def test_deletion_metric_averages_the_curve_over_batches_and_processes():
    model = _model()
    x = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(8))
    maps = _maps((6, 1, 8, 8), seed=9)
    options = {"patch_size": 2, "steps": 4}
    whole = e2kd.get_metric("deletion", **options)
    whole.update(_batch(model, x, maps))
    first, second = e2kd.get_metric("deletion", **options), e2kd.get_metric("deletion", **options)
    first.update(_batch(model, x[:4], maps[:4]))
    second.update(_batch(model, x[4:], maps[4:]))
    first.merge(second.state())
    result, merged = whole.compute(), first.compute()
    assert merged["auc"] == pytest.approx(result["auc"])
    assert merged["curve"] == pytest.approx(result["curve"])
    fractions, scores = perturbation_curve(
        _forward(model), x, maps[:, 0], model(x).argmax(1), patch_size=2, patches_per_step=4
    )
    assert list(result["curve"]) == [f"{f:.6g}" for f in fractions.tolist()] == ["0", "0.25", "0.5", "0.75", "1"]
    assert list(result["curve"].values()) == pytest.approx(scores.mean(0).tolist())
    assert result["auc"] == pytest.approx(float(area_under(fractions, scores.mean(0))))
    assert e2kd.get_metric("deletion").compute() == {}


@pytest.mark.parametrize("name", ["deletion", "insertion"])
def test_the_curve_metrics_pass_every_option_on_and_average_in_float64(name):
    model = _model()
    x = torch.rand(4, 3, 6, 10, generator=torch.Generator().manual_seed(32))  # not square: 2 x 3 patches of 4 px
    maps = _maps((4, 2, 6, 10), seed=33)  # two channels: summed
    options = {
        "order": "least_relevant_first",
        "patch_size": 4,
        "patches_per_step": 2,
        "baseline": 0.5,
        "output": "logit",
    }
    metric = e2kd.get_metric(name, **options, chunk=8)
    metric.update(_batch(model, x, maps))
    fractions, scores = perturbation_curve(
        _forward(model),
        x,
        maps.sum(1),
        model(x).argmax(1),
        insertion=name == "insertion",
        most_relevant_first=False,
        patch_size=4,
        patches_per_step=2,
        baseline=0.5,
        output="logit",
    )
    result = metric.compute()
    assert list(result["curve"]) == ["0", "0.333333", "0.666667", "1"]
    assert list(result["curve"].values()) == (scores.double().sum(0) / 4).tolist()  # exactly: float64 sums
    assert result["auc"] == float(area_under(fractions, scores.double().sum(0) / 4))
    # steps: 6 patches (2 rows x 3 columns) in 3 steps of 2; steps=2 makes 2 steps of 3; the default
    # (32 steps) 6 steps of 1
    for steps, points in (({}, 7), ({"steps": 2}, 3)):
        by_steps = e2kd.get_metric(name, patch_size=4, **steps)
        by_steps.update(_batch(model, x, maps))
        assert len(by_steps.compute()["curve"]) == points


def test_merging_with_an_evaluation_that_saw_nothing_changes_nothing():
    model = _model()
    x = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(34))
    full = e2kd.get_metric("deletion", patch_size=4)
    full.update(_batch(model, x, _maps((3, 1, 8, 8))))
    empty = e2kd.get_metric("deletion", patch_size=4)
    empty.merge(full.state())
    assert empty.compute() == full.compute()
    full.merge(e2kd.get_metric("deletion", patch_size=4).state())
    assert full.compute() == empty.compute()


def test_what_the_report_and_e2kd_plugins_show_of_each_metric():
    from e2kd_plugins.metrics.faithfulness import Deletion, Road
    from e2kd_plugins.metrics.randomisation import ModelRandomisation

    assert Deletion(patch_size=3).options.patch_size == 3  # keyword options reach the options model
    assert ModelRandomisation(similarity="cosine", target="teacher").similarity.name == "cosine"
    assert ModelRandomisation(target="teacher").requires == {"model", "teacher"}
    assert e2kd.get_metric("deletion").detail() == "MoRF, 8 px patches"
    assert e2kd.get_metric("insertion", order="least_relevant_first", patch_size=2).detail() == "LeRF, 2 px patches"
    assert e2kd.get_metric("deletion").curve_labels() == (
        "share of patches removed",
        "probability of the explained class",
    )
    assert e2kd.get_metric("insertion", output="logit").curve_labels() == (
        "share of patches inserted",
        "logit of the explained class",
    )
    assert (
        e2kd.get_metric("road").detail() == "MoRF"
        and e2kd.get_metric("road", order="least_relevant_first").detail() == "LeRF"
    )
    assert e2kd.get_metric("road").curve_labels() == (
        "% of pixels removed and imputed",
        "share still predicted as the explained class",
    )
    randomisation = e2kd.get_metric("model_randomisation", order="independent", similarity="cosine")
    assert randomisation.detail() == "cosine, independent"
    assert randomisation.curve_labels() == ("layer randomised, from the top", "cosine to the trained model's maps")
    assert e2kd.get_metric("model_randomisation").curve_labels()[0] == "layer randomised, from the top (cumulative)"
    for cls, direction in (
        (Deletion, "as its order"),
        (Road, "as its order"),
        (ModelRandomisation, "opposite of its similarity"),
    ):
        assert cls.capabilities() == {"requires": ["model"], "higher_is_better": direction, "category": cls.category}
    assert (Deletion.category, Road.category, ModelRandomisation.category) == (
        "faithfulness",
        "faithfulness",
        "randomisation",
    )
    options = e2kd.get_metric("model_randomisation", similarity="cosine", similarity_options={"eps": 0.5})
    assert options.similarity.options.eps == 0.5


def test_directions_follow_the_order_and_the_explained_class_can_be_the_teachers():
    assert not e2kd.get_metric("deletion").higher_is_better
    assert e2kd.get_metric("insertion").higher_is_better
    assert e2kd.get_metric("deletion", order="least_relevant_first").higher_is_better
    assert not e2kd.get_metric("insertion", order="least_relevant_first").higher_is_better
    assert not e2kd.get_metric("road").higher_is_better
    assert e2kd.get_metric("road", order="least_relevant_first").higher_is_better
    assert not e2kd.get_metric("model_randomisation").higher_is_better
    assert e2kd.get_metric("model_randomisation", similarity="l2").higher_is_better
    assert e2kd.get_metric("deletion").requires == {"model"}
    assert e2kd.get_metric("deletion", target="teacher").requires == {"model", "teacher"}
    model = _model()
    x = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(10))
    maps = _maps((3, 1, 8, 8))
    teacher_logits = torch.eye(4)[[3, 2, 1]] * 5
    metric = e2kd.get_metric("deletion", target="teacher", patch_size=4, output="logit")
    metric.update(_batch(model, x, maps, teacher_logits))
    _, scores = perturbation_curve(
        _forward(model), x, maps[:, 0], torch.tensor([3, 2, 1]), patch_size=4, output="logit"
    )
    assert list(metric.compute()["curve"].values()) == pytest.approx(scores.mean(0).tolist())
    with pytest.raises(PluginError, match="patches_per_step or steps"):
        e2kd.get_metric("deletion", patches_per_step=2, steps=4)


# ---------------------------------------------------------------- ROAD


def test_linear_imputation_by_hand():
    """One removed corner pixel: the weighted mean of its three neighbours; two removed neighbours:
    a 2 x 2 system solved by hand."""
    x = torch.arange(16, dtype=torch.float64).view(1, 1, 4, 4) ** 1.5
    removed = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    removed[0, 0, 0, 0] = True
    corner = (x[0, 0, 0, 1] / 6 + x[0, 0, 1, 0] / 6 + x[0, 0, 1, 1] / 12) / (5 / 12)
    filled = linear_imputation(x, removed, tolerance=1e-12)
    assert float(filled[0, 0, 0, 0]) == pytest.approx(float(corner), rel=1e-10)
    assert torch.equal(filled[~removed], x[~removed])
    removed[0, 0, 0, 1] = True  # (0, 0) and (0, 1) both unknown, neighbours of each other (weight 1/6)
    v = x[0, 0]
    d0, d1 = 5 / 12, 8 / 12  # in-image neighbour weights of a corner and of an edge pixel
    k0 = v[1, 0] / 6 + v[1, 1] / 12
    k1 = v[0, 2] / 6 + v[1, 1] / 6 + v[1, 0] / 12 + v[1, 2] / 12
    a = torch.tensor([[d0, -1 / 6], [-1 / 6, d1]], dtype=torch.float64)
    expected = torch.linalg.solve(a, torch.stack([k0, k1]))
    filled = linear_imputation(x, removed, tolerance=1e-12)
    np.testing.assert_allclose(filled[0, 0, 0, :2].numpy(), expected.numpy(), rtol=1e-10)


@pytest.mark.parametrize(
    ("shape", "share"), [((3, 12, 10), 0.1), ((3, 12, 10), 0.5), ((1, 9, 13), 0.9), ((3, 8, 8), 0.99)]
)
def test_linear_imputation_equals_quantus_noisy_linear_imputation_without_noise(shape, share):
    from quantus.functions.perturb_func import noisy_linear_imputation

    x = torch.rand(2, *shape, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    relevance = _maps((2, shape[1] * shape[2]), seed=12)
    k = int(shape[1] * shape[2] * share)
    removed = torch.zeros(2, 1, shape[1] * shape[2], dtype=torch.bool)
    theirs = []
    for i in range(2):
        indices = relevance[i].argsort(descending=True)[:k]
        removed[i, 0, indices] = True
        theirs.append(noisy_linear_imputation(x[i].numpy(), indices.numpy(), noise=0.0))
    ours = linear_imputation(x, removed.view(2, 1, *shape[1:]))
    np.testing.assert_allclose(ours.numpy(), np.stack(theirs), atol=1e-5)


def _blob_mask(n, size, share, seed):
    """Removed pixels in smooth blobs (large holes: the hard case for an iterative solver)."""
    g = torch.Generator().manual_seed(seed)
    smooth = torch.nn.functional.avg_pool2d(torch.rand(n, 1, size, size, generator=g), 9, 1, 4)
    return smooth >= smooth.flatten(1).quantile(1 - share, dim=1).view(-1, 1, 1, 1)


def test_the_multigrid_preconditioner_converges_in_a_few_iterations_where_plain_cg_would_not():
    """Half of a 96 x 96 image removed in large blobs: the preconditioned solver reaches 1e-6 in at
    most 15 iterations (plain conjugate gradients needs hundreds); 3 iterations are not enough and
    say so in one warning naming the tolerance and the count, pointing at the caller."""
    x = torch.rand(2, 3, 96, 96, generator=torch.Generator().manual_seed(40))
    removed = _blob_mask(2, 96, 0.5, seed=41)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fast = linear_imputation(x, removed, max_iterations=15)
    with pytest.warns(RuntimeWarning, match=r"did not reach tolerance 1e-06 in 3 iterations") as caught:
        linear_imputation(x, removed, max_iterations=3)
    assert not caught[0].filename.endswith("imputation.py")  # the warning points at a caller
    exact = linear_imputation(x.double(), removed, tolerance=1e-12)
    assert (fast.double() - exact).abs().max() < 1e-5


def test_each_system_stops_at_its_own_tolerance():
    """An easy image (5 % removed, scattered) beside a hard one (90 % in blobs) scaled by 1e-4: each
    is solved to its own relative tolerance, not stopped once the batch's total residual is small
    (which the large image would dominate)."""
    g = torch.Generator().manual_seed(42)
    x = torch.rand(2, 1, 64, 64, generator=g, dtype=torch.float64) * torch.tensor([1.0, 1e-4]).view(2, 1, 1, 1)
    removed = torch.cat([torch.rand(1, 1, 64, 64, generator=g) < 0.05, _blob_mask(1, 64, 0.9, seed=43)])
    together = linear_imputation(x, removed, tolerance=1e-5)
    for i in range(2):
        alone = linear_imputation(x[i : i + 1], removed[i : i + 1], tolerance=1e-12)
        scale = x[i].abs().max()
        assert (together[i] - alone[0]).abs().max() / scale < 1e-4, i


def test_the_grid_transfers_are_each_others_transpose():
    from e2kd_plugins.metrics.imputation import _prolong, _restrict

    for h, w in ((8, 8), (7, 9)):
        coarse = torch.rand(2, 1, (h + 1) // 2, (w + 1) // 2, dtype=torch.float64)
        fine = torch.rand(2, 1, h, w, dtype=torch.float64)
        assert float((_prolong(coarse, (h, w)) * fine).sum()) == pytest.approx(float((coarse * _restrict(fine)).sum()))
    ones = _prolong(torch.ones(1, 1, 4, 4, dtype=torch.float64), (8, 8))[0, 0]
    assert torch.equal(ones[1:-1, 1:-1], torch.ones(6, 6, dtype=torch.float64))  # linear: constants kept inside
    assert ones[0, 0] == 0.75**2 and ones[0, 3] == 0.75  # zero outside the grid


def test_road_equals_quantus_without_noise_on_single_channel_images(monkeypatch):
    """Quantus' ROAD indexes the channel-broadcast map as if it had one channel (it fails on RGB
    images with one map channel), so the comparison runs on one-channel images."""
    g = torch.Generator().manual_seed(13)
    model = _linear(torch.randn(4, 100, generator=g, dtype=torch.float64), torch.zeros(4, dtype=torch.float64)).float()
    x = torch.rand(16, 1, 10, 10, generator=torch.Generator().manual_seed(14))
    maps = _maps((16, 1, 10, 10), seed=15)
    classes = model(x).argmax(1)
    percentages = [10.0, 30.0, 50.0, 70.0, 90.0]
    road = _quiet(quantus.ROAD, percentages=percentages, noise=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = road(model=model, x_batch=x.numpy(), y_batch=classes.numpy(), a_batch=maps.numpy(), device="cpu")
    kept = road_predictions(_forward(model), x, maps[:, 0], classes, percentages, noise=0.0, chunk=20)
    assert kept.float().mean(0).tolist() == pytest.approx([theirs[p] for p in percentages], abs=1e-9)
    assert 0 < kept.float().mean() < 1  # the comparison saw predictions change and stay
    monkeypatch.setattr(faithfulness, "IMPUTATION_BUDGET", 16 * 100 * 2)  # two percentages per solve
    assert torch.equal(road_predictions(_forward(model), x, maps[:, 0], classes, percentages, noise=0.0), kept)
    metric = e2kd.get_metric("road", percentages=percentages, noise=0.0)
    metric.update(_batch(model, x, maps))
    result = metric.compute()
    assert list(result["curve"]) == ["10", "30", "50", "70", "90"]
    assert list(result["curve"].values()) == pytest.approx([theirs[p] for p in percentages])
    assert result["mean"] == pytest.approx(sum(theirs.values()) / 5)


def test_road_noise_is_seeded_and_distributed_like_quantus():
    """Imputed values get N(0, noise^2) noise (Quantus draws it from numpy's global generator, so the
    draws cannot be the same): ours minus the noise-free imputation, over 20,000 values, against
    Quantus' the same way — a two-sample KS statistic below 0.02 (p ≈ 0.0005 for equal laws), while
    noise of 1.2 times the std is far above it."""
    from quantus.functions.perturb_func import noisy_linear_imputation
    from scipy.stats import ks_2samp

    x = torch.rand(1, 3, 100, 100, generator=torch.Generator().manual_seed(16), dtype=torch.float64)
    indices = torch.randperm(10_000, generator=torch.Generator().manual_seed(17))[:6_667]
    removed = torch.zeros(1, 1, 10_000, dtype=torch.bool)
    removed[0, 0, indices] = True
    removed = removed.view(1, 1, 100, 100)
    clean = noisy_linear_imputation(x[0].numpy(), indices.numpy(), noise=0.0)
    np.random.seed(0)
    theirs = (noisy_linear_imputation(x[0].numpy(), indices.numpy(), noise=0.05) - clean)[:, removed[0, 0].numpy()]

    def ours(seed, noise=0.05):
        model = nn.Identity()
        images = []
        road_predictions(
            lambda b: images.append(b) or torch.zeros(len(b), 2),
            x,
            removed[:, 0].double(),
            torch.zeros(1, dtype=torch.long),
            [66.67],
            noise=noise,
            generator=torch.Generator().manual_seed(seed),
            tolerance=1e-10,
        )
        del model
        return (images[0][0] - torch.as_tensor(clean))[removed[0].expand(3, -1, -1)].numpy()

    a, b = ours(0), ours(0)
    np.testing.assert_array_equal(a, b)
    draws = torch.randn((1, 3, 100, 100), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    np.testing.assert_allclose(a, (0.05 * draws)[0][removed[0].expand(3, -1, -1)].numpy(), atol=1e-9)
    assert not np.array_equal(a, ours(1))
    assert ks_2samp(a.ravel(), theirs.ravel()).statistic < 0.02
    assert ks_2samp(ours(0, 0.06).ravel(), theirs.ravel()).statistic > 0.04
    assert a.std() == pytest.approx(0.05, rel=0.02)


def test_road_by_hand_on_a_4x4_image_and_a_linear_model():
    """int(16 * 12.5 / 100) = 2 pixels go: the two most relevant, (0, 0) and (0, 1), imputed as the
    2 x 2 system above; the linear model's logits on the imputed image decide the prediction."""
    x = torch.arange(16, dtype=torch.float64).view(1, 1, 4, 4) ** 1.5 / 27
    relevance = torch.zeros(1, 4, 4, dtype=torch.float64)
    relevance[0, 0, 0], relevance[0, 0, 1] = 2.0, 1.0
    v = x[0, 0]
    a = torch.tensor([[5 / 12, -1 / 6], [-1 / 6, 8 / 12]], dtype=torch.float64)
    k = torch.stack([v[1, 0] / 6 + v[1, 1] / 12, v[0, 2] / 6 + v[1, 1] / 6 + v[1, 0] / 12 + v[1, 2] / 12])
    imputed = v.clone()
    imputed[0, :2] = torch.linalg.solve(a, k)
    w = torch.zeros(2, 16, dtype=torch.float64)
    w[0, 0] = w[0, 1] = 1.0  # class 0 reads the two removed pixels, class 1 a constant between before and after
    before, after = float(x.flatten()[:2].sum()), float(imputed.flatten()[:2].sum())
    threshold = (before + after) / 2
    model = _linear(w, torch.tensor([0.0, threshold], dtype=torch.float64))
    classes = model(x).argmax(1)
    assert classes.tolist() == [0 if before > threshold else 1]
    kept = road_predictions(_forward(model), x, relevance, classes, [12.5, 0.0], noise=0.0, tolerance=1e-12)
    assert kept.tolist() == [[False, True]]  # the imputed pixels move the logit across the threshold


def test_the_road_metric_draws_its_noise_from_one_seeded_stream_over_batches_and_passes_its_options_on():
    g = torch.Generator().manual_seed(35)
    model = _linear(torch.randn(3, 64, generator=g, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)).float()
    x = torch.rand(8, 1, 8, 8, generator=g)
    maps = _maps((8, 1, 8, 8), seed=36)
    options = {
        "percentages": [20.0, 50.0, 80.0],
        "order": "least_relevant_first",
        "noise": 2.0,
        "seed": 5,
        "tolerance": 1e-2,
    }
    metric = e2kd.get_metric("road", **options)
    metric.update(_batch(model, x[:4], maps[:4]))
    metric.update(_batch(model, x[4:], maps[4:]))
    stream = torch.Generator().manual_seed(5)
    kept = [
        road_predictions(
            _forward(model),
            x[s],
            maps[s, 0],
            model(x[s]).argmax(1),
            [20.0, 50.0, 80.0],
            most_relevant_first=False,
            noise=2.0,
            generator=stream,
            tolerance=1e-2,
        )
        for s in (slice(0, 4), slice(4, 8))
    ]
    expected = torch.cat(kept).double().mean(0).tolist()
    assert 0 < torch.cat(kept).double().mean() < 1  # the noise decides some predictions
    assert list(metric.compute()["curve"].values()) == expected
    assert metric.compute()["mean"] == pytest.approx(sum(expected) / 3)
    fresh = [
        road_predictions(
            _forward(model),
            x[:4],
            maps[:4, 0],
            model(x[:4]).argmax(1),
            [20.0, 50.0, 80.0],
            most_relevant_first=False,
            noise=2.0,
            generator=torch.Generator().manual_seed(5),
            tolerance=1e-2,
        )
        for _ in range(2)
    ]
    assert not torch.equal(torch.cat(fresh), torch.cat(kept))  # the second batch draws on, not from the start


def test_road_noise_defaults_to_one_hundredth():
    x = torch.rand(2, 1, 6, 6, generator=torch.Generator().manual_seed(45), dtype=torch.float64)
    relevance, classes = _maps((2, 6, 6), seed=46).double(), torch.zeros(2, dtype=torch.long)
    seen = {}
    for noise in (None, 0.01):
        images = []
        kwargs = {} if noise is None else {"noise": noise}
        road_predictions(
            lambda b, images=images: images.append(b) or torch.zeros(len(b), 2),
            x,
            relevance,
            classes,
            [50.0],
            generator=torch.Generator().manual_seed(1),
            **kwargs,
        )
        seen[noise] = images[0]
    assert torch.equal(seen[None], seen[0.01])


def test_road_removes_the_most_relevant_pixels_and_checks_percentages():
    x = torch.rand(2, 3, 6, 6, generator=torch.Generator().manual_seed(18))
    relevance = _maps((2, 6, 6), seed=19)
    seen = []

    def forward(images):
        seen.append(images.clone())
        return torch.zeros(len(images), 3)

    road_predictions(forward, x, relevance, torch.zeros(2, dtype=torch.long), [25.0, 50.0], noise=0.0, chunk=4)
    changed = (seen[0].view(2, 2, 3, 6, 6) != x).any(2)  # (percentage, sample, H, W)
    for p, count in enumerate([9, 18]):
        for i in range(2):
            top = relevance[i].flatten().argsort(descending=True)[:count]
            expected = torch.zeros(36, dtype=torch.bool)
            expected[top] = True
            assert torch.equal(changed[p, i].flatten(), expected)
    with pytest.raises(PluginError, match="percentages"):
        e2kd.get_metric("road", percentages=[100])


# ---------------------------------------------------------------- randomisation


def _gradient_batch(model, x):
    """An EvalBatch whose explanations are input gradients, of the model given per call."""
    return EvalBatch(
        logits=model(x).detach(),
        images=x,
        forward=_forward(model),
        explain=lambda images, target, model=model: input_gradient(model, images, target),
        model=model,
    )


def test_randomisation_by_hand_on_a_linear_model():
    """The gradient map of a linear model is the target's weight row: after re-initialising the one
    layer under seed s the map is that row of a fresh nn.Linear made under seed s, and the cosine
    with the trained row is computed by hand."""
    g = torch.Generator().manual_seed(20)
    w = torch.randn(3, 16, generator=g, dtype=torch.float64)
    model = _linear(w, torch.zeros(3, dtype=torch.float64))
    x = torch.rand(2, 1, 4, 4, generator=g, dtype=torch.float64)
    with torch.no_grad():
        classes = model(x).argmax(1)
    metric = e2kd.get_metric("model_randomisation", similarity="cosine", seed=7)
    metric.update(_gradient_batch(model, x))
    torch.manual_seed(7)
    fresh = nn.Linear(16, 3, dtype=torch.float64).weight.detach()
    expected = torch.nn.functional.cosine_similarity(fresh[classes], w[classes], dim=1).mean()
    result = metric.compute()
    assert result == {"mean": pytest.approx(float(expected)), "curve": {"1": pytest.approx(float(expected))}}
    assert torch.equal(model[1].weight, w)  # the evaluated model is untouched


def test_cascading_keeps_earlier_layers_random_and_independent_restores_them():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    assert [n for n, _ in randomisable_layers(model)] == ["2", "0"]
    cascading = [{k: v.clone() for k, v in m.state_dict().items()} for _, m in randomised_models(model, "cascading", 3)]
    independent = [
        {k: v.clone() for k, v in m.state_dict().items()} for _, m in randomised_models(model, "independent", 3)
    ]
    assert not torch.equal(cascading[0]["2.weight"], trained["2.weight"])
    assert torch.equal(cascading[0]["0.weight"], trained["0.weight"])
    assert torch.equal(cascading[1]["2.weight"], cascading[0]["2.weight"])  # still random
    assert not torch.equal(cascading[1]["0.weight"], trained["0.weight"])
    assert torch.equal(independent[1]["2.weight"], trained["2.weight"])  # restored
    assert torch.equal(independent[1]["0.weight"], cascading[1]["0.weight"])  # same seed, same draw
    assert all(torch.equal(v, trained[k]) for k, v in model.state_dict().items())
    state = torch.random.get_rng_state()
    list(randomised_models(model, "cascading", 3))
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's random stream is untouched
    with pytest.raises(ModelError) as refused:
        randomisable_layers(model, ["1"])
    assert str(refused.value) == (
        "model_randomisation: layers ['1'] are not modules with reset_parameters (some that are: 2, 0)"
    )
    wide = nn.Sequential(*[nn.Linear(2, 2) for _ in range(7)])
    with pytest.raises(ModelError, match=r"\(some that are: 6, 5, 4, 3, 2\)$"):
        randomisable_layers(wide, ["x"])
    assert [n for n, _ in randomisable_layers(model, ["0"])] == ["0"]


def test_randomisation_of_chosen_layers_and_its_mean():
    model = TinyCNN(num_classes=4, width=6).eval()
    x = torch.rand(5, 3, 8, 8, generator=torch.Generator().manual_seed(44))
    chosen = e2kd.get_metric("model_randomisation", layers=["fc", "stem.0"], similarity="cosine", seed=3)
    chosen.update(_gradient_batch(model, x))
    every = e2kd.get_metric("model_randomisation", similarity="cosine", seed=3)
    every.update(_gradient_batch(model, x))
    result, full = chosen.compute(), every.compute()
    assert list(result["curve"]) == ["fc", "stem.0"] and list(full["curve"]) == ["fc", "feat.0", "stem.0"]
    assert result["curve"]["fc"] == pytest.approx(full["curve"]["fc"])  # the first step is the same
    assert full["mean"] == pytest.approx(sum(full["curve"].values()) / 3)
    default = [m.state_dict() for _, m in randomised_models(model)]
    seeded = [m.state_dict() for _, m in randomised_models(model, "cascading", 0)]
    assert all(torch.equal(a[k], b[k]) for a, b in zip(default, seeded) for k in a)


@pytest.mark.parametrize("order", ["cascading", "independent"])
def test_randomisation_equals_quantus_mprt(order):
    """Quantus seeds torch with seed + 1 before each layer; ours with seed. (Quantus takes the maps'
    absolute values by default; the comparison keeps them signed, as ours does.) Softplus instead of
    ReLU: a randomised ReLU network's gradient can be zero everywhere, a constant map whose Spearman
    correlation is NaN in Quantus (scipy) and 0 here."""
    model = TinyCNN(num_classes=4, width=6, bn=True).eval()
    model.stem[2], model.feat[1] = nn.Softplus(), nn.Softplus()
    x = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(21))
    classes = model(x).argmax(1)
    mprt = _quiet(quantus.MPRT, layer_order="top_down" if order == "cascading" else "independent", seed=41, abs=False)

    def explain_func(model, inputs, targets, **kwargs):
        return input_gradient(model, torch.as_tensor(inputs), torch.as_tensor(targets)).detach().numpy()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = mprt(model=model, x_batch=x.numpy(), y_batch=classes.numpy(), explain_func=explain_func, device="cpu")
    metric = e2kd.get_metric("model_randomisation", order=order, seed=42)
    metric.update(_gradient_batch(model, x))
    curve = metric.compute()["curve"]
    layers = [n for n in theirs if n != "original"]
    assert list(curve) == ["fc", "feat.0", "stem.1", "stem.0"] and sorted(layers) == sorted(curve)
    for name in layers:
        assert curve[name] == pytest.approx(float(np.mean(theirs[name])), abs=1e-5)


def test_model_metrics_through_the_evaluator_run_the_evaluated_model():
    """evaluate() hands the metrics the evaluated model's forward and explanations: the deletion curve
    it reports equals the curve computed here from the model and the explainer directly."""
    model = _model()
    explainer = e2kd.get_explainer("gradcam", layer="feat", relu=False)
    x = torch.rand(5, 3, 8, 8, generator=torch.Generator().manual_seed(22))
    metrics = {"deletion": e2kd.get_metric("deletion", patch_size=2, steps=4)}
    values, skipped = evaluate(
        model, [{"image": x, "label": torch.zeros(5, dtype=torch.long)}], metrics, explainer=explainer
    )
    assert skipped == {}
    classes = model(x).argmax(1)
    maps = explainer.explain(model, x, classes)
    _, scores = perturbation_curve(_forward(model), x, maps.sum(1), classes, patch_size=2, patches_per_step=4)
    assert list(values["deletion"]["curve"].values()) == pytest.approx(scores.mean(0).tolist(), abs=1e-6)
    values, skipped = evaluate(model, [{"image": x}], {"deletion": e2kd.get_metric("deletion")})
    assert values == {} and skipped == {"deletion": "needs model"}
