"""The views of a sample (``e2kd.data.augment``) checked by value: crops against the padded image,
the random-resized-crop's area read back from a coordinate image, antialiasing on an aliasing
pattern, box rasterisation at the pixel-centre boundaries, colour jitter against torchvision's own."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torchvision import tv_tensors
from torchvision.transforms import v2

from e2kd.data.augment import (
    AUGMENTATIONS,
    View,
    boxes_to_masks,
    eval_geometry,
    geometric_transform,
    make_view,
    resize_map,
    view_geometry,
)


def _numbered(size: int) -> torch.Tensor:
    """(3, size, size): every pixel a distinct value, different per channel."""
    n = torch.arange(3 * size * size, dtype=torch.float32).view(3, size, size)
    return n / n.max()


def _offsets(image: torch.Tensor, out: torch.Tensor, pad: int) -> set[tuple[int, int, bool]]:
    """Every (top, left, flipped) for which ``out`` is that crop of ``image`` reflect-padded by ``pad``."""
    size = image.shape[-1]
    padded = F.pad(image[None], (pad,) * 4, mode="reflect")[0]
    found = set()
    for top in range(2 * pad + 1):
        for left in range(2 * pad + 1):
            crop = padded[:, top : top + size, left : left + size]
            for flipped in (False, True):
                if torch.equal(crop.flip(-1) if flipped else crop, out):
                    found.add((top, left, flipped))
    return found


@pytest.mark.parametrize("size, pad", [(8, 1), (16, 2), (24, 3)])
def test_flip_crop_pads_an_eighth_by_reflection_and_takes_every_offset(size, pad):
    image = _numbered(size)
    transform = geometric_transform("flip_crop", size)  # fixed_size is the default
    seen = set()
    for seed in range(400):
        torch.manual_seed(seed)
        found = _offsets(image, transform(image), pad)
        assert len(found) == 1, f"seed {seed}: not one crop of the image padded by {pad}"
        seen |= found
    assert {(t, left) for t, left, _ in seen} == {(t, left) for t in range(2 * pad + 1) for left in range(2 * pad + 1)}
    assert {f for _, _, f in seen} == {False, True}


def test_flip_of_fixed_size_images_is_a_plain_horizontal_flip_half_the_time():
    image = _numbered(8)
    outs = []
    for seed in range(40):
        torch.manual_seed(seed)
        out = geometric_transform("flip", 8)(image)
        outs.append(torch.equal(out, image.flip(-1)))
        assert outs[-1] or torch.equal(out, image)
    assert 10 < sum(outs) < 30
    assert geometric_transform("none", 8) is None and view_geometry("eval", 8, fixed_size=True) is None
    assert view_geometry("whole", 8, fixed_size=True) is None


def _crop_box(out: torch.Tensor, size: int) -> tuple[float, float]:
    """(width, height) fractions of the source image a resized crop shows, read from a coordinate image."""
    xs, ys = out[0], out[1]
    return float(xs.max() - xs.min()) + 1 / size, float(ys.max() - ys.min()) + 1 / size


def _coordinates(size: int) -> torch.Tensor:
    c = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    return torch.stack([c[None, :].expand(size, size), c[:, None].expand(size, size), torch.zeros(size, size)])


def test_resized_crop_of_fixed_size_images_keeps_at_least_35_percent_of_the_area():
    size = 64
    transform = geometric_transform("resized_crop_flip", size)
    areas = []
    for seed in range(200):
        torch.manual_seed(seed)
        w, h = _crop_box(transform(_coordinates(size)), size)
        areas.append(w * h)
    assert min(areas) > 0.3, min(areas)  # scale (0.35, 1): no crop under 35 % (up to the pixel grid)
    assert max(areas) > 0.9 and sum(a < 0.5 for a in areas) > 20


def test_resized_crop_of_any_size_images_is_imagenets_8_to_100_percent():
    transform = geometric_transform("resized_crop_flip", 32, fixed_size=False)
    areas = []
    for seed in range(200):
        torch.manual_seed(seed)
        out = transform(_coordinates(96))
        assert out.shape == (3, 32, 32)
        w, h = _crop_box(out, 96)
        areas.append(w * h)
    assert min(areas) < 0.2 and min(areas) > 0.05


def _aliasing(source: int) -> torch.Tensor:
    """A checkerboard of period 2 at ``source`` px: sampled without antialiasing at a factor-3 step
    it stays black and white; antialiased it averages to grey."""
    board = ((torch.arange(source)[None, :] + torch.arange(source)[:, None]) % 2).float()
    return board[None].expand(3, source, source).contiguous()


@pytest.mark.parametrize(
    "make",
    [
        lambda: eval_geometry(8),
        lambda: view_geometry("whole", 8, fixed_size=False),
        lambda: geometric_transform("none", 8, fixed_size=False),
        lambda: geometric_transform("flip", 8, fixed_size=False),
        lambda: geometric_transform("flip_crop", 8, fixed_size=False),
        lambda: geometric_transform("resized_crop_flip", 8, fixed_size=False),
        lambda: geometric_transform("resized_crop_flip", 8),
    ],
    ids=["eval", "whole", "none", "flip", "flip_crop", "resized_crop_flip", "fixed resized_crop_flip"],
)
def test_every_resize_is_antialiased(make):
    image = _aliasing(27)
    spreads = []
    for seed in range(8):
        torch.manual_seed(seed)
        out = make()(image)
        assert out.shape[-2:] == (8, 8)
        spreads.append(float(out.std()))
    # aliased, the board stays black and white (std about 0.16 for every seed); antialiased, grey
    assert sum(spreads) / len(spreads) < 0.05, f"an aliased resize (stds {spreads}): antialias must be on"


def test_images_of_any_size_are_not_augmented_by_none_and_only_flipped_by_flip():
    image = _coordinates(40)[:, :, 3:37]
    plain = eval_geometry(16)(image)
    for seed in range(6):
        torch.manual_seed(seed)
        assert torch.equal(geometric_transform("none", 16, fixed_size=False)(image), plain)
        flipped = geometric_transform("flip", 16, fixed_size=False)(image)
        assert torch.equal(flipped, plain) or torch.equal(flipped, plain.flip(-1))


def test_eval_view_resizes_the_short_side_by_256_224_then_centre_crops():
    image = _coordinates(70)[:, :, 7:63]  # 70 x 56: short side 56
    out = eval_geometry(28)(image)  # short side to 32, centre crop 28 of 40 x 32
    assert out.shape == (3, 28, 28)
    w, h = _crop_box(out, 70)
    assert w == pytest.approx(28 / 32 * 56 / 70, abs=0.02) and h == pytest.approx(28 / 40, abs=0.02)
    crop = geometric_transform("flip_crop", 28, fixed_size=False)
    torch.manual_seed(0)
    out = crop(image)
    assert out.shape == (3, 28, 28) and _crop_box(out, 70)[1] == pytest.approx(28 / 40, abs=0.02)
    whole = view_geometry("whole", 28, fixed_size=False)(image)
    assert _crop_box(whole, 70)[1] == pytest.approx(1, abs=0.05)


def test_the_train_view_uses_the_augmentation_and_the_size_it_is_given():
    image = _numbered(16)
    torch.manual_seed(0)
    shown = view_geometry("train", 16, fixed_size=False, augment="flip_crop")(_coordinates(40))
    # images of any size: the short side resized to 16 * 256 / 224 first, so the crop shows 16 / 18 of it
    assert shown.shape == (3, 16, 16) and _crop_box(shown, 40)[1] == pytest.approx(16 / 18, abs=0.05)
    assert view_geometry("train", 16, fixed_size=True) is None  # augment defaults to none
    moved = 0
    for seed in range(6):
        torch.manual_seed(seed)
        out = view_geometry("train", 16, fixed_size=True, augment="flip_crop")(image)
        assert len(_offsets(image, out, 2)) == 1
        moved += not torch.equal(out, image)
    assert moved >= 4


def test_unknown_augmentation_and_view_are_named_with_the_known_ones():
    with pytest.raises(
        ValueError,
        match=r"^unknown augmentation 'jitter' \(known: none, flip, flip_crop, "
        r"resized_crop_flip\)$",
    ):
        geometric_transform("jitter", 8)
    with pytest.raises(ValueError, match=r"^unknown view 'test' \(known: train, eval, whole\)$"):
        view_geometry("test", 8, fixed_size=True)
    assert AUGMENTATIONS == ("none", "flip", "flip_crop", "resized_crop_flip")


def test_boxes_become_masks_by_pixel_centres_at_the_boundaries():
    # centres at 0.5, 1.5, ...: a box edge on a centre includes it on the low side, excludes it on the high side
    boxes = torch.tensor([[1.5, 0.5, 3.5, 2.5], [0.0, 3.0, 1.0, 4.0], [2.6, 2.6, 2.9, 2.9]])
    masks = boxes_to_masks(boxes, torch.tensor([2, 0, 2]), 3, (4, 5))
    assert masks.dtype == torch.uint8 and masks.shape == (3, 4, 5)
    want = torch.zeros(3, 4, 5, dtype=torch.uint8)
    want[2, 0:2, 1:3] = 1  # rows 0.5 and 1.5 (not 2.5), columns 1.5 and 2.5 (not 3.5)
    want[0, 3, 0] = 1
    assert torch.equal(masks, want)  # the third box holds no centre; class 1 has no box
    bounded = tv_tensors.BoundingBoxes(boxes[:1], format="XYXY", canvas_size=(4, 5))
    assert torch.equal(boxes_to_masks(bounded, torch.tensor([1]), 2, (4, 5))[1], want[2])
    empty = boxes_to_masks(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), 2, (3, 3))
    assert empty.dtype == torch.uint8 and empty.shape == (2, 3, 3) and not empty.any()


def test_resize_map_is_bilinear_without_corner_alignment():
    m = torch.tensor([[[0.0, 1.0], [2.0, 4.0]]])
    got = resize_map(m, (4, 4))
    torch.testing.assert_close(got[0, 0], torch.tensor([0.0, 0.25, 0.75, 1.0]))  # half-pixel centres
    assert resize_map(m.double(), (2, 2)).dtype == torch.float32
    assert torch.equal(resize_map(m, (2, 2)), m)


def test_a_uint8_image_with_a_map_is_scaled_by_255():
    image = torch.tensor([0, 51, 255], dtype=torch.uint8).repeat(3, 3, 1)  # (3, 3, 3)
    item = {"image": image, "teacher_map": torch.ones(1, 3, 3), "label": torch.tensor(0)}
    for view in (View(None), View(v2.RandomHorizontalFlip(p=0.0))):
        out = view(item)
        torch.testing.assert_close(out["image"][0, 0], torch.tensor([0.0, 0.2, 1.0]), rtol=0, atol=0)
    plain = View(None)({"image": image, "label": torch.tensor(0)})
    torch.testing.assert_close(plain["image"][0, 0], torch.tensor([0.0, 0.2, 1.0]), rtol=0, atol=0)


def test_colour_jitter_is_torchvisions_brightness_contrast_and_saturation_on_the_train_view_only():
    image = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(0))
    item = {"image": image, "label": torch.tensor(0)}
    torch.manual_seed(4)
    got = make_view("train", 8, color_jitter=0.4)(item)["image"]
    torch.manual_seed(4)
    want = v2.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4)(image)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not torch.equal(got, image)
    for view in ("eval", "whole"):
        assert torch.equal(make_view(view, 8, color_jitter=0.4)(item)["image"], image)
    assert make_view("train", 8).colour is None and View(None, 0.0).colour is None


def test_make_view_defaults_to_fixed_size_images_and_no_augmentation():
    view = make_view("train", 8)
    assert view.geometry is None and view.num_classes == 0
    assert isinstance(make_view("eval", 8, fixed_size=False).geometry, v2.Compose)
    image = _numbered(8)
    moved = 0
    for seed in range(6):
        torch.manual_seed(seed)
        out = make_view("train", 8, augment="flip_crop")({"image": image, "label": torch.tensor(0)})["image"]
        assert len(_offsets(image, out, 1)) == 1
        moved += not torch.equal(out, image)
    assert moved >= 4
    boxes = tv_tensors.BoundingBoxes(torch.tensor([[0.0, 0.0, 2.0, 2.0]]), format="XYXY", canvas_size=(8, 8))
    masked = make_view("train", 8, num_classes=3)(
        {"image": image, "label": torch.tensor(0), "boxes": boxes, "box_labels": torch.tensor([2])}
    )
    assert masked["mask"].shape == (3, 8, 8) and masked["mask"][2, :2, :2].all() and masked["mask"].sum() == 4
