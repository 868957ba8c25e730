import pytest
import torch

from e2kd.data.augment import make_view
from e2kd_plugins.datasets.synthetic import SyntheticShapes


def test_generation_is_deterministic_and_prefix_stable():
    a = SyntheticShapes(6, num_classes=3, image_size=24, bias=0.5, seed=3)
    b = SyntheticShapes(6, num_classes=3, image_size=24, bias=0.5, seed=3)
    c = SyntheticShapes(4, num_classes=3, image_size=24, bias=0.5, seed=3)
    assert torch.equal(a.images, b.images) and torch.equal(a.groups, b.groups)
    # sample i depends on (seed, stream, i) only
    assert torch.equal(a.images[:12], c.images)
    other_stream = SyntheticShapes(6, num_classes=3, image_size=24, bias=0.5, seed=3, stream=1)
    assert not torch.equal(a.images, other_stream.images)


def test_items_have_image_label_mask_group():
    d = SyntheticShapes(2, num_classes=4, image_size=32)
    item = d[5]
    assert item["image"].shape == (3, 32, 32) and item["mask"].shape == (1, 32, 32)
    assert item["label"].item() == 5 % 4
    assert 0.0 <= item["image"].min() and item["image"].max() <= 1.0
    assert set(d.labels.tolist()) == {0, 1, 2, 3}


def test_background_bias_strength():
    # P(background == class) = bias + (1 - bias) / K
    k = 4
    for bias in (0.0, 0.9, 1.0):
        d = SyntheticShapes(300, num_classes=k, image_size=16, bias=bias, seed=1)
        expected = bias + (1 - bias) / k
        assert abs(d.matched_fraction - expected) < 0.03, (bias, d.matched_fraction)
    ood = SyntheticShapes(100, num_classes=k, image_size=16, mismatched=True)
    assert ood.matched_fraction == 0.0
    assert set(ood.groups.tolist()) == set(range(k))


def test_mask_marks_the_object_pixels():
    d = SyntheticShapes(5, num_classes=4, image_size=32, seed=2)
    for i in range(len(d)):
        mask = d.masks[i, 0] > 0
        area = mask.float().mean().item()
        assert 0.03 < area < 0.5
        # object pixels are bright (colour channels >= 0.65 minus noise); background pixels are <= 0.6 plus noise
        inside = d.images[i][:, mask].max(0).values
        assert (inside > 0.55).float().mean() > 0.95


def test_joint_augmentation_keeps_mask_aligned():
    d = SyntheticShapes(4, num_classes=4, image_size=32, seed=0, transform=make_view("train", 32, augment="flip_crop"))
    torch.manual_seed(0)
    for i in range(len(d)):
        item = d[i]
        plain = d.images[i]
        mask = item["mask"][0] > 0
        # the object colour is constant over the mask: the augmented image shows it where the mask says
        colour = plain[:, d.masks[i, 0] > 0].median(dim=1).values
        err = (item["image"][:, mask] - colour[:, None]).abs().max(0).values
        assert (err < 0.15).float().mean() > 0.95


def test_synthetic_shapes_labels_backgrounds_and_bounds():
    """Labels cycle through the classes; bias 1 matches every background, mismatched never does,
    and a drawn background is each of the others; the constructor's bounds are inclusive."""
    from e2kd.data.shapes import SHAPES
    from e2kd_plugins.datasets.synthetic import SyntheticShapes

    data = SyntheticShapes(per_class=6, num_classes=3, image_size=16, bias=1.0, seed=2)
    assert data.labels.tolist() == [i % 3 for i in range(18)] and data.labels.dtype == torch.int64
    assert data.groups.tolist() == data.labels.tolist() and data.matched_fraction == 1.0
    item = data[4]
    assert int(item["label"]) == 1 and bool(item["in_distribution"]) and item["mask"].shape == (1, 16, 16)
    assert item["mask"].dtype == torch.float32 and item["group"].dtype == torch.int64
    odd = SyntheticShapes(per_class=30, num_classes=3, image_size=16, mismatched=True, seed=2)
    assert odd.matched_fraction == 0.0 and not any(bool(odd[i]["in_distribution"]) for i in range(6))
    # both other backgrounds occur for every class (the offset is drawn from 1..K-1, not fixed)
    for c in range(3):
        assert {int(g) for g, y in zip(odd.groups, odd.labels) if int(y) == c} == set(range(3)) - {c}
    free = SyntheticShapes(per_class=60, num_classes=3, image_size=16, bias=0.0, seed=2)
    assert 0.15 < free.matched_fraction < 0.55  # uniform over 3 types: about 1/3
    assert not torch.equal(SyntheticShapes(2, 3, 16, seed=0).images, SyntheticShapes(2, 3, 16, seed=1).images)
    assert not torch.equal(SyntheticShapes(2, 3, 16, stream=0).images, SyntheticShapes(2, 3, 16, stream=1).images)
    for ok in (
        dict(per_class=1, num_classes=2, image_size=16, bias=0.0),
        dict(per_class=1, num_classes=len(SHAPES), image_size=16, bias=1.0),
    ):
        SyntheticShapes(**ok)
    for bad, message in (
        (dict(num_classes=1), rf"^num_classes must be in \[2, {len(SHAPES)}\] \(got 1\)$"),
        (dict(num_classes=len(SHAPES) + 1), r"^num_classes must be in"),
        (dict(bias=1.01), r"^bias must be in \[0, 1\] \(got 1.01\)$"),
        (dict(bias=-0.1), r"^bias must be in"),
        (dict(per_class=0), r"^per_class must be >= 1 and image_size >= 16 \(got 0, 16\)$"),
        (dict(image_size=15), r"\(got 1, 15\)$"),
    ):
        with pytest.raises(ValueError, match=message):
            SyntheticShapes(**{"per_class": 1, "image_size": 16, **bad})
