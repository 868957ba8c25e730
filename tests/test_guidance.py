"""Guided teachers (Rao et al., ICCV 2023): the losses by hand, their gradient, annotated subsets,
the config's one-line errors, and guidance raising EPG on held-out masks."""

import json

import pytest
import torch
import yaml

import e2kd
from e2kd import hookimpl
from e2kd.cli import main
from e2kd.errors import PluginError
from e2kd.guidance import AnnotatedSamples, Guidance, class_masks, energy_loss, l1_loss
from e2kd.testing import TinyCNN, check_gradient

from .conftest import TINY
from .test_early_errors import _fails_with

#: A 4 x 4 map and a box over its top-left 2 x 2 quarter.
MAP = torch.tensor(
    [[1.0, 2.0, 0.0, -1.0], [3.0, 0.0, 0.0, 0.0], [0.0, 0.0, 4.0, 0.0], [0.0, -2.0, 0.0, 2.0]], dtype=torch.float64
)[None, None]
BOX = torch.zeros(1, 1, 4, 4)
BOX[..., :2, :2] = 1


def test_energy_loss_by_hand():
    # positive attribution 1 + 2 + 3 + 4 + 2 = 12, of which 1 + 2 + 3 = 6 inside the box
    assert energy_loss(MAP, BOX).item() == pytest.approx(1 - 6 / 12)
    assert energy_loss(torch.zeros(1, 1, 4, 4), BOX).item() == 1.0  # nothing positive: nothing inside


def test_l1_loss_by_hand():
    # A+ min-max normalised: A+ / 4; outside the box only 4 -> 1.0 and 2 -> 0.5; mean over 16 pixels
    assert l1_loss(MAP, BOX).item() == pytest.approx((1.0 + 0.5) / 16)
    assert l1_loss(MAP, torch.ones(1, 1, 4, 4)).item() == 0.0


def test_l1_loss_normalises_each_map_by_its_own_range():
    """Maps whose positive parts do not start at 0, with different ranges per map: the min-max
    normalisation is per map (over its pixels), by hand."""
    maps = torch.tensor([[1.0, 2.0, 3.0, 5.0], [10.0, 20.0, 30.0, 50.0]]).view(2, 1, 2, 2)
    masks = torch.tensor([1.0, 0.0, 0.0, 1.0]).view(1, 1, 2, 2).expand(2, 1, 2, 2)
    # map 1: (A - 1) / 4 -> [0, 0.25, 0.5, 1], outside the mask: 0.25 + 0.5; map 2: (A - 10) / 40, the same
    expected = (0.25 + 0.5) / 4
    assert l1_loss(maps, masks).tolist() == pytest.approx([expected, expected])
    shifted = maps.clone()
    shifted[1] = shifted[1] - 5  # [5, 15, 25, 45]: (A - 5) / 40 -> [0, 0.25, 0.5, 1]
    assert l1_loss(shifted, masks).tolist() == pytest.approx([expected, expected])


def test_guidance_defaults_to_the_energy_loss_and_names_the_known_losses():
    explainer = e2kd.get_explainer("gradcam")
    assert Guidance(explainer).loss is energy_loss and Guidance(explainer, "l1").loss is l1_loss
    with pytest.raises(ValueError, match=r"^guidance loss must be one of energy, l1 \(got 'dice'\)$"):
        Guidance(explainer, "dice")


def test_class_masks_pick_each_listed_class():
    masks = torch.arange(3.0)[None, :, None, None].expand(2, 3, 2, 2)  # class k's mask is filled with k
    got = class_masks(masks, torch.tensor([[2, 0], [1, 1]]))
    assert got[:, :, 0, 0].tolist() == [[2.0, 0.0], [1.0, 1.0]]
    single = torch.rand(2, 1, 2, 2)
    assert torch.equal(class_masks(single, torch.tensor([[1], [0]])), single)


def _batch(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 3, 8, 8, dtype=torch.float64, generator=g)
    masks = torch.zeros(n, 1, 8, 8, dtype=torch.float64)
    masks[..., 1:5, 2:6] = 1
    return images, torch.tensor([0, 2, 1][:n]), masks


@pytest.mark.parametrize("loss", ["energy", "l1"])
def test_guidance_gradient_matches_finite_differences(loss):
    torch.manual_seed(0)
    model = TinyCNN(width=4).double().eval()
    images, labels, masks = _batch()
    guidance = Guidance(e2kd.get_explainer("gradcam"), loss)
    term = lambda: guidance(model, model, images, labels, masks, torch.ones(3, dtype=torch.bool))[1]  # noqa: E731
    assert 0 < term().item() < 1
    check_gradient(term, list(model.parameters()), rel=1e-4, abs=1e-8)


def test_guidance_averages_over_annotated_images_only():
    torch.manual_seed(0)
    model = TinyCNN(width=4).double().eval()
    images, labels, masks = _batch()
    guidance = Guidance(e2kd.get_explainer("gradcam"), "energy")
    _, some = guidance(model, model, images, labels, masks, torch.tensor([True, False, True]))
    _, first = guidance(model, model, images[:1], labels[:1], masks[:1], torch.tensor([True]))
    _, third = guidance(model, model, images[2:], labels[2:], masks[2:], torch.tensor([True]))
    assert some.item() == pytest.approx((first.item() + third.item()) / 2, rel=1e-12)
    logits, none = guidance(model, model, images, labels, masks, torch.zeros(3, dtype=torch.bool))
    assert none.item() == 0.0 and torch.equal(logits, model(images))


def test_multi_label_guidance_is_the_mean_over_present_class_pairs():
    torch.manual_seed(0)
    model = TinyCNN(width=4, num_classes=3).double().eval()
    images = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    masks = torch.zeros(2, 3, 8, 8, dtype=torch.float64)
    masks[:, 0, :4], masks[:, 1, 4:], masks[:, 2, :, :4] = 1, 1, 1
    explainer = e2kd.get_explainer("gradcam")
    _, term = Guidance(explainer, "energy")(model, model, images, labels, masks, torch.ones(2, dtype=torch.bool))
    pairs = [(0, 0), (0, 2), (1, 1)]
    by_hand = [
        energy_loss(explainer.explain(model, images[i : i + 1], k), masks[i : i + 1, k : k + 1]).item()
        for i, k in pairs
    ]
    assert term.item() == pytest.approx(sum(by_hand) / 3, rel=1e-10)


def test_annotated_subset_is_seeded_and_sized():
    samples = [{"i": i} for i in range(10)]
    a, b = AnnotatedSamples(samples, 0.3, seed=1), AnnotatedSamples(samples, 0.3, seed=1)
    flags = [a[i]["annotated"] for i in range(10)]
    assert sum(flags) == 3 and flags == [b[i]["annotated"] for i in range(10)]
    assert flags != [AnnotatedSamples(samples, 0.3, seed=2)[i]["annotated"] for i in range(10)]
    assert a[4]["i"] == 4 and sum(AnnotatedSamples(samples, 0.01, seed=0)[i]["annotated"] for i in range(10)) == 1


def _config(tmp_path, guidance, **extra):
    cfg = {**TINY, "train": {**TINY["train"], "guidance": guidance}, "out_dir": str(tmp_path / "run"), **extra}
    path = tmp_path / "guided.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_config_errors_are_one_line(tmp_path, capsys):
    _fails_with(capsys, ["train-teacher", str(_config(tmp_path, {"loss": "dice"}))], "train.guidance.loss")
    _fails_with(
        capsys,
        ["train-teacher", str(_config(tmp_path, {"annotated_fraction": 0}))],
        "train.guidance.annotated_fraction",
    )
    _fails_with(
        capsys,
        ["train-teacher", str(_config(tmp_path, {"explainer": {"name": "gradcm"}}))],
        "train.guidance.explainer",
        "gradcam",
    )
    _fails_with(
        capsys,
        ["train-teacher", str(_config(tmp_path, {"explainer": {"name": "gradcam", "options": {"layer": "nope"}}}))],
        "train.guidance.explainer: gradcam: model",
        "no layer 'nope'",
    )
    assert not (tmp_path / "run").exists()  # refused before the run directory is made
    _fails_with(
        capsys,
        [
            "train-teacher",
            str(
                _config(
                    tmp_path,
                    {"explainer": {"name": "bcos"}},
                    model={"name": "bcos_small", "options": {"widths": [4, 6]}},
                )
            ),
        ],
        "guidance needs one-channel maps; explainer 'bcos' gives 6 channels (for bcos set contribution: true)",
    )
    teacher = {**TINY["model"], "checkpoint": str(tmp_path / "t.pt")}
    _fails_with(
        capsys,
        ["distill", str(_config(tmp_path, {}, teacher=teacher))],
        "train.guidance guides a model trained on labels",
    )


def test_a_dataset_without_masks_is_refused(tmp_path, capsys):
    from e2kd.data.miniature import write_image_folder

    write_image_folder(tmp_path / "folder", ["a", "b"], {"train": 2, "val": 1}, size=(16, 16), seed=0)
    path = _config(
        tmp_path, {}, data={"name": "image_folder", "options": {"root": str(tmp_path / "folder"), "image_size": 16}}
    )
    _fails_with(
        capsys, ["train-teacher", str(path)], "train.guidance: dataset 'image_folder' provides no masks or boxes"
    )


def test_a_non_differentiable_explainer_is_refused(tmp_path, capsys, fresh_registry):
    class Frozen(type(e2kd.get_explainer("gradcam"))):
        name = "frozen_cam"
        differentiable = False

    class Plugin:
        @hookimpl
        def register_explainers(self, register):
            register(Frozen)

    e2kd.register_plugin(Plugin(), name="frozen_cam")
    _fails_with(
        capsys,
        ["train-teacher", str(_config(tmp_path, {"explainer": {"name": "frozen_cam"}}))],
        "train.guidance.explainer: explainer 'frozen_cam' is not differentiable",
    )


def test_bcos_contribution_maps_guide_a_bcos_model():
    torch.manual_seed(0)
    model = e2kd.get_model_builder("bcos_small", widths=[4, 6]).build(3).double().eval()
    images, labels, masks = _batch()
    guidance = Guidance(e2kd.get_explainer("bcos", contribution=True), "energy")
    term = lambda: guidance(model, model, images, labels, masks, torch.ones(3, dtype=torch.bool))[1]  # noqa: E731
    check_gradient(term, [p for p in model.parameters() if p.requires_grad], rel=1e-4, abs=1e-10)
    with pytest.raises(PluginError, match="one-channel"):
        Guidance(e2kd.get_explainer("bcos"), "energy")(
            model, model, images, labels, masks, torch.ones(3, dtype=torch.bool)
        )


@pytest.mark.slow
def test_guidance_raises_epg_on_held_out_masks(tmp_path):
    """Same seed, same data (90% of backgrounds give the class away): the energy-guided teacher's
    Grad-CAM puts far more of its attribution on the object in the test images."""
    base = {
        "seed": 0,
        "data": {
            "name": "synthetic",
            "options": {"num_classes": 3, "image_size": 32, "train_per_class": 24, "test_per_class": 12, "bias": 0.9},
        },
        "model": {"name": "small_resnet", "options": {"widths": [8, 16]}},
        "train": {"epochs": 10, "batch_size": 16, "lr": 3e-3, "progress": False},
        "eval": {"metrics": [{"name": "accuracy"}, {"name": "epg"}]},
    }
    epg = {}
    for name, guidance in (("plain", None), ("guided", {"loss": "energy", "weight": 1.0})):
        cfg = {**base, "out_dir": str(tmp_path / name), "train": {**base["train"], "guidance": guidance}}
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
        assert main(["train-teacher", str(tmp_path / f"{name}.yaml")]) == 0
        splits = json.loads((tmp_path / name / "metrics.json").read_text())["splits"]
        epg[name] = {split: values["epg"] for split, values in splits.items()}
    for split in ("test_id", "test_ood"):
        assert epg["guided"][split] > epg["plain"][split] + 0.2, epg
    steps = (tmp_path / "guided" / "steps.csv").read_text().splitlines()
    assert "guidance" in steps[0]


def test_the_guidance_term_enters_the_loss_with_its_weight(tmp_path):
    """train-teacher's loss is CE + weight * guidance at every step (weight 2.5, not 1), both terms logged."""
    import csv

    path = _config(tmp_path, {"weight": 2.5})
    assert main(["train-teacher", str(path)]) == 0
    rows = list(csv.DictReader((tmp_path / "run" / "steps.csv").open()))
    assert rows and all(float(r["guidance"]) > 0 for r in rows)
    for r in rows:
        assert float(r["loss"]) == pytest.approx(float(r["ce"]) + 2.5 * float(r["guidance"]), rel=1e-5)


def test_a_guidance_step_moves_attribution_into_the_boxes():
    """One gradient step on the energy term alone raises the share of positive attribution inside the
    masks (the direction of the term), and a step against it lowers it."""
    torch.manual_seed(0)
    x = torch.rand(4, 3, 8, 8)
    labels = torch.tensor([0, 1, 2, 0])
    masks = torch.zeros(4, 1, 8, 8)
    masks[..., :, :3] = 1  # the left three columns: an asymmetric box
    annotated = torch.ones(4, dtype=torch.bool)
    explainer = e2kd.get_explainer("gradcam")

    def share(model):
        maps = torch.stack([explainer.explain(model, x[i : i + 1], int(labels[i]))[0] for i in range(4)])
        positive = maps.clamp(min=0)
        return float((positive * masks).sum() / positive.sum())

    shares = {}
    for sign in (1.0, -1.0):
        torch.manual_seed(0)
        model = TinyCNN(width=4)
        before = share(model)
        _, term = Guidance(explainer, "energy")(model, model, x, labels, masks, annotated)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        (sign * term).backward()
        optimizer.step()
        shares[sign] = share(model) - before
    assert shares[1.0] > 0 > shares[-1.0]
