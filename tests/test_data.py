import torch

from e2kd_plugins.datasets.synthetic import SyntheticShapes
from e2kd.data.augment import make_augment


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
    d = SyntheticShapes(4, num_classes=4, image_size=32, seed=0, transform=make_augment("flip_crop", 32))
    torch.manual_seed(0)
    for i in range(len(d)):
        item = d[i]
        plain = d.images[i]
        mask = item["mask"][0] > 0
        # the object colour is constant over the mask: the augmented image shows it where the mask says
        colour = plain[:, d.masks[i, 0] > 0].median(dim=1).values
        err = (item["image"][:, mask] - colour[:, None]).abs().max(0).values
        assert (err < 0.15).float().mean() > 0.95
