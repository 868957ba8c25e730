"""The training view on the device: per-sample draws against torchvision's samplers and kernels,
alignment of maps, masks and boxes with the image, and draws that depend on (seed, epoch, index) alone."""

import math

import numpy as np
import pytest
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from e2kd.data.augment import eval_geometry
from e2kd.data.batch_views import (
    DeviceView,
    draw_epoch,
    epoch_generator,
    jitter_colours,
    resize_crop_boxes,
    resized_crop_boxes,
    resized_crops,
    sample_boxes,
)
from e2kd.data.prefetch import loaded_ahead, on_device_ahead
from e2kd.train import EpochBatches

from .test_accelerator import DEVICES


def ks_statistic(a: np.ndarray, b: np.ndarray) -> float:
    """The two-sample Kolmogorov-Smirnov statistic: the largest gap between the empirical CDFs."""
    grid = np.sort(np.concatenate([a, b]))
    cdf_a = np.searchsorted(np.sort(a), grid, side="right") / len(a)
    cdf_b = np.searchsorted(np.sort(b), grid, side="right") / len(b)
    return float(np.abs(cdf_a - cdf_b).max())


def torchvision_boxes(height: int, width: int, n: int, **options) -> torch.Tensor:
    """(n, 4) ``(left, top, width, height)`` drawn by ``v2.RandomResizedCrop``'s own sampler."""
    crop, image = v2.RandomResizedCrop(8, **options), torch.zeros(3, height, width)
    rows = []
    for _ in range(n):
        p = crop.make_params([image])
        rows.append([p["left"], p["top"], p["width"], p["height"]])
    return torch.tensor(rows, dtype=torch.float64)


FEATURES = {
    "area share": lambda b, h, w: b[:, 2] * b[:, 3] / (h * w),
    "log aspect ratio": lambda b, h, w: torch.log(b[:, 2] / b[:, 3]),
    "left": lambda b, h, w: b[:, 0],
    "top": lambda b, h, w: b[:, 1],
}


@pytest.mark.parametrize("height, width", [(256, 341), (40, 200)])  # (40, 200): the fallback crop is frequent
def test_resized_crop_draws_follow_torchvisions_sampler(height, width):
    """20,000 draws each; the KS statistic of every feature stays under the 0.1 % critical value
    1.95·sqrt(2/n) = 0.0195, and a sampler with another scale range is far above it (the test can fail)."""
    n, critical = 20_000, 1.95 * math.sqrt(2 / 20_000)
    torch.manual_seed(1)
    reference = torchvision_boxes(height, width, n)
    sizes = torch.tensor([[height, width]]).expand(n, 2)
    ours = resized_crop_boxes(sizes, torch.Generator().manual_seed(2))
    wrong = resized_crop_boxes(sizes, torch.Generator().manual_seed(2), scale=(0.35, 1.0))
    for name, feature in FEATURES.items():
        statistic = ks_statistic(feature(ours, height, width).numpy(), feature(reference, height, width).numpy())
        assert statistic < critical, (name, statistic)
    assert (
        ks_statistic(
            FEATURES["area share"](wrong, height, width).numpy(),
            FEATURES["area share"](reference, height, width).numpy(),
        )
        > 0.1
    )
    assert bool((ours == torch.round(ours)).all()) and bool((ours[:, 0] + ours[:, 2] <= width).all())
    assert bool((ours[:, 1] + ours[:, 3] <= height).all()) and bool((ours[:, 2:] > 0).all())


def test_the_fallback_crop_is_torchvisions_central_crop():
    """An image no attempt fits (1 × 100: every drawn crop is taller than 1 px or wider than allowed) gets
    the central crop with the aspect ratio clamped to 4/3, as torchvision's fallback gives it."""
    torch.manual_seed(0)
    reference = torchvision_boxes(1, 100, 50)
    ours = resized_crop_boxes(torch.tensor([[1, 100]]).expand(50, 2), torch.Generator().manual_seed(0))
    fallback = torch.tensor([49.0, 0.0, 1.0, 1.0])  # w = round(1 · 4/3) = 1, centred: (100 - 1) // 2 = 49
    assert bool((reference == fallback).all(1).any())  # torchvision lands there too
    assert bool((ours == fallback).all(1).any())
    fits = ~(ours == fallback).all(1)
    assert bool((ours[fits, 3] == 1).all())  # the draws that fit are one pixel high


def _random_images(sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    height, width = max(h for h, _ in sizes), max(w for _, w in sizes)
    canvas = torch.zeros(len(sizes), 3, height, width, dtype=torch.uint8)
    for i, (h, w) in enumerate(sizes):
        canvas[i, :, :h, :w] = torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)
    return canvas, torch.tensor(sizes)


@pytest.mark.parametrize("device", DEVICES)
def test_a_fixed_crop_equals_torchvisions_resized_crop_everywhere(device):
    """For whole-pixel boxes (every random resized crop) the batched grid-sample kernel equals
    ``v2.functional.resized_crop`` (bilinear, antialias off) of the float image within 2e-6 at every
    pixel, borders included; a flip is the exact mirror image."""
    canvas, sizes = _random_images([(60, 80), (50, 70), (64, 64)])
    boxes = torch.tensor([[5.0, 7.0, 40.0, 30.0], [10.0, 3.0, 50.0, 40.0], [0.0, 0.0, 64.0, 64.0]])
    flips = torch.tensor([False, True, False])
    batched = sample_boxes(canvas.to(device), sizes, boxes, flips, 32).mul_(1 / 255).cpu()
    for i in range(3):
        left, top, w, h = boxes[i].long().tolist()
        image = canvas[i, :, : sizes[i, 0], : sizes[i, 1]].float() / 255
        reference = TF.resized_crop(image, top, left, h, w, [32, 32], antialias=False)
        reference = reference.flip(-1) if flips[i] else reference
        torch.testing.assert_close(batched[i], reference, rtol=0, atol=2e-6)
    unflipped = sample_boxes(canvas.to(device), sizes, boxes, torch.zeros(3, dtype=torch.bool), 32).mul_(1 / 255)
    assert torch.equal(batched[1], unflipped[1].cpu().flip(-1)) and not torch.equal(batched[1], unflipped[1].cpu())
    if device != "cpu":  # on a device every box takes the batched kernel
        assert torch.equal(resized_crops(canvas.to(device), sizes, boxes, flips, 32).cpu(), batched)


@pytest.mark.parametrize("layout", ["channels-first", "channels-last (the decoded cache's)"])
def test_the_cpu_route_is_torchvisions_uint8_resized_crop(layout):
    """On the CPU, whole-pixel boxes of a list of images at their own sizes: exactly torchvision's
    ``resized_crop`` of the uint8 image (the same kernel), within one uint8 level of the float result,
    flips exact."""
    g = torch.Generator().manual_seed(4)
    sizes = [(60, 80), (50, 70), (64, 64)]
    images = []
    for h, w in sizes:
        pixels = torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).permute(2, 0, 1)
        images.append(pixels if layout.startswith("channels-last") else pixels.contiguous())
    boxes = torch.tensor([[5.0, 7.0, 40.0, 30.0], [10.0, 3.0, 13.0, 9.0], [0.0, 0.0, 64.0, 64.0]])
    flips = torch.tensor([False, True, False])
    out = resized_crops(images, torch.tensor(sizes), boxes, flips, 32)
    for i in range(3):
        left, top, w, h = boxes[i].long().tolist()
        exact = TF.resized_crop(images[i], top, left, h, w, [32, 32], antialias=False).float() / 255
        exact = exact.flip(-1) if flips[i] else exact
        torch.testing.assert_close(out[i], exact, rtol=0, atol=1e-7)
        reference = TF.resized_crop(images[i].float() / 255, top, left, h, w, [32, 32], antialias=False)
        reference = reference.flip(-1) if flips[i] else reference
        assert float((out[i] - reference).abs().max()) <= 1 / 255 + 1e-6
    unflipped = resized_crops(images, torch.tensor(sizes), boxes, torch.zeros(3, dtype=torch.bool), 32)
    assert torch.equal(out[1], unflipped[1].flip(-1)) and not torch.equal(out[1], unflipped[1])


def test_fractional_boxes_take_the_batched_kernel_with_the_same_coordinates():
    """A box in fractional pixels (a resize folded into the crop) samples at ``left + (i + .5)·w/out - .5``:
    a horizontal ramp image gives back exactly those coordinates inside the box."""
    ramp = torch.arange(200, dtype=torch.uint8).expand(3, 40, 200).clone()[None]
    box = torch.tensor([[20.25, 3.5, 150.5, 30.0]])
    out = resized_crops(ramp, torch.tensor([[40, 200]]), box, torch.tensor([False]), 16)[0, 0] * 255
    expected = 20.25 + (torch.arange(16) + 0.5) * 150.5 / 16 - 0.5
    torch.testing.assert_close(out[5], expected.float(), rtol=0, atol=2e-4)


def test_the_eval_geometry_of_a_cached_image_is_a_centre_crop_equal_to_the_eval_view():
    """A cached image has the eval view's short side already (256 for 224): the ``none`` geometry is then a
    whole-pixel centre crop, and equals the eval view (resize to 256 = identity, centre crop 224)."""
    canvas, sizes = _random_images([(256, 300), (331, 256)])
    boxes = resize_crop_boxes(sizes, 224, None)
    assert torch.equal(boxes, torch.tensor([[38.0, 16.0, 224.0, 224.0], [16.0, 54.0, 224.0, 224.0]]))
    out = resized_crops(canvas, sizes, boxes, torch.zeros(2, dtype=torch.bool), 224)
    for i in range(2):
        image = canvas[i, :, : sizes[i, 0], : sizes[i, 1]]
        torch.testing.assert_close(out[i], eval_geometry(224)(image).float() / 255, rtol=0, atol=1e-6)


def test_random_crops_of_flip_crop_cover_torchvisions_offsets():
    """``flip_crop`` on a cached image: ``v2.RandomCrop`` after the resize — offsets uniform over every
    position (each of the 33 × 77 reached, none outside)."""
    sizes = torch.tensor([[256, 300]]).expand(20_000, 2)
    boxes = resize_crop_boxes(sizes, 224, torch.rand(len(sizes), 2, generator=torch.Generator().manual_seed(0)))
    assert set(boxes[:, 1].long().tolist()) == set(range(33)) and set(boxes[:, 0].long().tolist()) == set(range(77))
    assert bool((boxes[:, 2:] == 224).all())


def _ramp_batch(sizes, map_side=8, threshold=30):
    """Images whose red channel is the column index and green the row index; a map (1, m, m) whose value
    at each map pixel is the image column coordinate of its centre; a mask of columns >= threshold; one box."""
    items = []
    for h, w in sizes:
        image = torch.stack(
            [
                torch.arange(w).expand(h, w),
                torch.arange(h)[:, None].expand(h, w),
                torch.zeros(h, w, dtype=torch.long),
            ]
        ).to(torch.uint8)
        column = (torch.arange(map_side) + 0.5) * w / map_side  # image x of each map pixel centre
        items.append(
            {
                "image": image,
                "label": torch.tensor(0),
                "teacher_map": column.expand(1, map_side, map_side).clone(),
                "mask": (torch.arange(w) >= threshold).to(torch.uint8).expand(1, h, w).clone(),
            }
        )
    return items


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def _source_columns(box, flip, out):
    """(out,) the source column each output column samples, by hand: ``left + (i + .5)·w/out - .5``,
    clamped to the crop's pixels, mirrored when flipped."""
    left, _, width, _ = box.double().tolist()
    columns = (left + (torch.arange(out, dtype=torch.float64) + 0.5) * width / out - 0.5).clamp(
        math.floor(left), math.ceil(left + width) - 1
    )
    return columns.flip(0) if flip else columns


def _source_rows(box, out):
    _, top, _, height = box.double().tolist()
    rows = top + (torch.arange(out, dtype=torch.float64) + 0.5) * height / out - 0.5
    return rows.clamp(math.floor(top), math.ceil(top + height) - 1)


def test_teacher_map_mask_and_boxes_stay_aligned_with_the_image_pixel_for_pixel():
    """Random resized crops + flips of ramp images (red = column index, green = row index), every output
    checked against the source coordinates computed by hand from the draws: the image holds them (to
    one uint8 level), the map sampled at the crop holds column + .5 (the image x of a pixel centre), the
    mask is the nearest source pixel's, box masks are exactly the pixels whose centres the box covers."""
    sizes = [(60, 90), (100, 70), (64, 64), (45, 120)]
    items = _ramp_batch(sizes)
    box = torch.tensor([[12.0, 9.0, 40.0, 33.0]])
    for item in items:
        item["boxes"] = tv_tensors.BoundingBoxes(box, format="XYXY", canvas_size=item["image"].shape[-2:])
        item["box_labels"] = torch.tensor([1])
    out = 24
    view = DeviceView(ListDataset(items), kind="resized_crop_flip", image_size=out, num_classes=2, seed=3)
    draws = view.draws(0)
    boxes, flips = draws.geometry(torch.tensor(sizes), "resized_crop_flip", out)
    assert bool(flips.any()) and not bool(flips.all())
    with_boxes = view.finish(view.collate([0, 1, 2, 3], draws))  # boxes take the "mask" key: check masks apart
    assert set(with_boxes) == {"image", "label", "teacher_map", "mask"}  # (no boxes or labels of boxes left)
    for item in items:
        item.pop("boxes"), item.pop("box_labels")
    batch = view.finish(view.collate([0, 1, 2, 3], draws))
    for i in range(4):
        x = _source_columns(boxes[i], bool(flips[i]), out)[None, :].expand(out, out).float()
        y = _source_rows(boxes[i], out)[:, None].expand(out, out).float()
        assert float((batch["image"][i, 0] * 255 - x).abs().max()) <= 1.0 + 1e-4
        assert float((batch["image"][i, 1] * 255 - y).abs().max()) <= 1.0 + 1e-4
        inner = (slice(1, -1), slice(1, -1))  # the map is not clamped to the crop: its edges differ
        torch.testing.assert_close(batch["teacher_map"][i, 0][inner], (x + 0.5)[inner], rtol=0, atol=2e-3)
        decided = (x - 29.5).abs() > 1e-3  # not exactly half-way between two source pixels
        assert torch.equal(batch["mask"][i, 0][decided], (x >= 29.5).float()[decided])
        centre_x, centre_y = x + 0.5, y + 0.5  # a crop pixel's centre in the source (unclamped inside)
        covered = (centre_x >= 12) & (centre_x < 40) & (centre_y >= 9) & (centre_y < 33)
        exact = torch.ones_like(covered)
        for edge, c in ((12, centre_x), (40, centre_x), (9, centre_y), (33, centre_y)):
            exact &= (c - edge).abs() > 1e-3
        exact[[0, -1], :] = False
        exact[:, [0, -1]] = False  # (the clamped edges of the crop)
        assert torch.equal(with_boxes["mask"][i, 1].bool()[exact], covered[exact]), i
        assert not with_boxes["mask"][i, 0].any()  # class 0 has no box
    assert 0 < batch["mask"].mean() < 1 and 0 < with_boxes["mask"][:, 1].float().mean() < 1


def test_colour_jitter_per_sample_equals_torchvisions_operations_in_each_samples_order():
    torch.manual_seed(0)
    images = torch.rand(4, 3, 6, 5)
    factors = torch.tensor([[0.7, 1.3, 0.9], [1.2, 0.6, 1.4], [1.0, 1.0, 1.0], [0.8, 0.8, 1.3]])
    order = torch.tensor([[0, 1, 2], [2, 0, 1], [1, 2, 0], [2, 1, 0]])
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation]
    out = jitter_colours(images, factors, order)
    for i in range(4):
        expected = images[i]
        for op in order[i].tolist():
            expected = ops[op](expected, float(factors[i, op]))
        torch.testing.assert_close(out[i], expected, rtol=0, atol=1e-6)
    swapped = jitter_colours(images, factors, order[:, [1, 0, 2]])
    assert not torch.allclose(swapped[0], out[0], atol=1e-3)  # the order matters (it is not ignored)


def test_jitter_factors_flips_and_orders_are_drawn_as_torchvision_draws_them():
    draws = draw_epoch(30_000, 0.4, torch.Generator().manual_seed(0))
    assert float(draws.jitter.min()) >= 0.6 and float(draws.jitter.max()) <= 1.4
    assert abs(float(draws.jitter.mean()) - 1.0) < 0.01 and abs(float(draws.jitter.std()) - 0.8 / math.sqrt(12)) < 0.01
    counts = torch.unique(draws.order, dim=0, return_counts=True)[1]
    assert len(counts) == 6 and int(counts.min()) > 4500  # every order, about equally often
    sizes = torch.tensor([[64, 64]]).expand(30_000, 2)
    assert abs(float(draws.geometry(sizes, "flip", 32)[1].float().mean()) - 0.5) < 0.01
    assert not draws.geometry(sizes, "none", 32)[1].any() and draw_epoch(10, 0.0, torch.Generator()).jitter is None


def test_the_same_draws_give_each_geometry_of_torchvision():
    """One set of uniforms, four geometries: the random resized crop equals :func:`resized_crop_boxes`
    of the same generator state; ``none``/``flip`` take the centre crop; ``flip_crop`` a random one."""
    sizes = torch.tensor([[256, 300], [300, 256], [256, 256]])
    draws = draw_epoch(3, 0.0, torch.Generator().manual_seed(5))
    rrc, _ = draws.geometry(sizes, "resized_crop_flip", 224)
    assert torch.equal(rrc, resized_crop_boxes(sizes, torch.Generator().manual_seed(5)))
    centre, _ = draws.geometry(sizes, "none", 224)
    assert torch.equal(centre, resize_crop_boxes(sizes, 224, None)) and torch.equal(
        centre[2], torch.tensor([16.0, 16, 224, 224])
    )
    random_crop, flips = draws.geometry(sizes, "flip_crop", 224)
    assert torch.equal(random_crop, resize_crop_boxes(sizes, 224, draws.offset)) and not torch.equal(
        random_crop, centre
    )
    assert torch.equal(flips, draws.flip < 0.5)


def _all_images(view, world, skip=0, epoch=0, batch_size=3):
    """{sample index: augmented image} over every process's share of an epoch."""
    seen = {}
    for rank in range(world):
        sampler = EpochBatches(len(view), batch_size, seed=5, rank=rank, world_size=world)
        sampler.set_epoch(epoch, skip=skip)
        for batch in view.batches(sampler, torch.device("cpu")):
            for i, image in zip(batch["index"].tolist(), batch["image"], strict=True):
                seen.setdefault(i, image)
    return seen


def test_draws_depend_on_seed_epoch_and_index_only_so_processes_and_resumes_agree():
    sizes = [(40 + 3 * i, 50 + 5 * i) for i in range(10)]
    items = [
        {"image": torch.randint(0, 256, (3, h, w), dtype=torch.uint8), "index": torch.tensor(i)}
        for i, (h, w) in enumerate(sizes)
    ]
    view = DeviceView(ListDataset(items), kind="resized_crop_flip", image_size=16, color_jitter=0.3, seed=1)
    one = _all_images(view, 1)
    two = _all_images(view, 2)
    common = one.keys() & two.keys()  # (one process drops its last partial batch, two do not)
    assert len(common) >= 8 and all(torch.equal(one[i], two[i]) for i in common)
    resumed = _all_images(view, 1, skip=1)
    assert resumed and all(torch.equal(one[i], resumed[i]) for i in resumed)
    next_epoch = _all_images(view, 1, epoch=1)
    reseeded = _all_images(
        DeviceView(ListDataset(items), kind="resized_crop_flip", image_size=16, color_jitter=0.3, seed=2),
        1,
    )
    assert not any(torch.equal(one[i], next_epoch[i]) for i in one if i in next_epoch)
    assert not any(torch.equal(one[i], reseeded[i]) for i in one if i in reseeded)


def test_epoch_generators_differ_by_seed_and_epoch():
    draws = {(s, e): torch.rand(4, generator=epoch_generator(s, e)) for s in (0, 1) for e in (0, 1)}
    assert len({tuple(v.tolist()) for v in draws.values()}) == 4
    assert torch.equal(torch.rand(4, generator=epoch_generator(1, 1)), draws[1, 1])


def test_draws_take_the_rows_of_the_indices():
    draws = draw_epoch(5, 0.3, torch.Generator().manual_seed(0))
    picked = draws.take(torch.tensor([3, 1]))
    for name in ("crop", "offset", "flip", "jitter", "order"):
        assert torch.equal(getattr(picked, name), getattr(draws, name)[[3, 1]]), name


def test_loaded_ahead_keeps_order_and_raises_at_the_failing_batch():
    calls = []

    def load(key):
        calls.append(key)
        if key == 3:
            raise ValueError("bad sample 3")
        return {"key": key}

    got = []
    with pytest.raises(ValueError, match="bad sample 3"):
        for batch in loaded_ahead(load, range(6), depth=2):
            got.append(batch["key"])
    assert got == [0, 1, 2] and max(calls) <= 5
    assert [b["key"] for b in loaded_ahead(lambda k: {"key": k}, range(7))] == list(range(7))


@pytest.mark.parametrize("device", DEVICES)
def test_batches_reach_the_device_unchanged_and_in_order(device):
    batches = [{"x": torch.full((2,), float(i)), "ids": [torch.tensor(i)], "name": "b"} for i in range(4)]
    moved = list(on_device_ahead(iter(batches), torch.device(device)))
    assert [float(b["x"][0]) for b in moved] == [0.0, 1.0, 2.0, 3.0]
    assert all(b["x"].device.type == torch.device(device).type and b["name"] == "b" for b in moved)
    assert [int(b["ids"][0]) for b in moved] == [0, 1, 2, 3]


def _torchvision_loop(height, width, crop, offset, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """``v2.RandomResizedCrop``'s sampling loop written out by hand, fed the given uniforms: ``crop``
    (attempts, 2) for the area share and log aspect ratio, ``offset`` (2,) for the row and column."""
    area = height * width
    for share_u, ratio_u in crop.tolist():
        target = area * (scale[0] + share_u * (scale[1] - scale[0]))
        aspect = math.exp(math.log(ratio[0]) + ratio_u * (math.log(ratio[1]) - math.log(ratio[0])))
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return [math.floor(offset[1] * (width - w + 1)), math.floor(offset[0] * (height - h + 1)), w, h]
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    return [(width - w) // 2, (height - h) // 2, w, h]


def test_resized_crop_boxes_follow_torchvisions_loop_for_the_same_uniforms():
    """Exact boxes for 2,000 random uniform sets over sizes that make every branch happen (crops that
    fit only at the first, a middle or no attempt; fallbacks of tall, wide and square images), and
    for uniforms chosen to land exactly on the boundaries (a crop as wide or as tall as the image)."""
    from e2kd.data.batch_views import _resized_crop_boxes

    g = torch.Generator().manual_seed(11)
    sizes = [[256, 341], [40, 200], [200, 40], [3, 3], [1, 100], [100, 1], [64, 64], [2, 7], [1, 1], [1, 2], [2, 1]]
    sizes = torch.tensor(sizes)  # (the last three: attempts of zero width or height happen)
    sizes = sizes[torch.randint(0, len(sizes), (2000,), generator=g)]
    crop = torch.rand(2000, 10, 2, generator=g, dtype=torch.float64)
    offset = torch.rand(2000, 2, generator=g, dtype=torch.float64)
    ours = _resized_crop_boxes(sizes, crop, offset, (0.08, 1.0), (3 / 4, 4 / 3))
    expected = [_torchvision_loop(int(h), int(w), crop[i], offset[i]) for i, (h, w) in enumerate(sizes.tolist())]
    assert ours.tolist() == expected
    # boundaries: the whole image at the first attempt (share 1, ratio = the image's) and offsets of 0 and ~1
    square = _resized_crop_boxes(
        torch.tensor([[64, 64], [64, 64]]),
        torch.tensor([[[1.0, 0.5]] * 10, [[1.0, 0.5]] * 10], dtype=torch.float64),
        torch.tensor([[0.0, 0.0], [0.999, 0.999]], dtype=torch.float64),
        (0.08, 1.0),
        (3 / 4, 4 / 3),
    )
    assert square.tolist() == [[0, 0, 64, 64], [0, 0, 64, 64]]


def test_resize_then_crop_boxes_of_images_not_at_the_eval_size_by_hand():
    """A 300 x 400 image, 224 px: resized to 256 x 341 (short side 256, long int(256 · 400 / 300)),
    centre crop at (16, 58) there; in source pixels every coordinate divided by its own axis' factor."""
    box = resize_crop_boxes(torch.tensor([[300, 400]]), 224, None)[0].tolist()
    fy, fx = 256 / 300, 341 / 400
    assert box == pytest.approx([58 / fx, 16 / fy, 224 / fx, 224 / fy])
    random_box = resize_crop_boxes(torch.tensor([[400, 300]]), 224, torch.tensor([[0.5, 0.25]]))[0].tolist()
    fy, fx = 341 / 400, 256 / 300
    assert random_box == pytest.approx([math.floor(0.25 * 33) / fx, math.floor(0.5 * 118) / fy, 224 / fx, 224 / fy])


def test_a_map_sampled_without_the_crop_clamp_keeps_its_edge_values():
    """The whole map (clamp to the image, not the crop): the corners of the output are the map's corners."""
    maps = torch.arange(16.0).view(1, 1, 4, 4)
    out = sample_boxes(
        maps, torch.tensor([[4, 4]]), torch.tensor([[0.0, 0.0, 4.0, 4.0]]), torch.tensor([False]), 8, clamp_to_box=False
    )
    assert out[0, 0, 0, 0] == 0 and out[0, 0, -1, -1] == 15 and out[0, 0, 0, -1] == 3 and out[0, 0, -1, 0] == 12


def test_boxes_moved_into_a_crop_by_hand():
    """A 40 x 30 crop at (10, 5) resized to 20 px: x scales by 0.5, y by 2/3; a box reaching outside the
    crop is clipped to it; flipped, x becomes 20 - x."""
    from e2kd.data.batch_views import move_boxes

    boxes = torch.tensor([[12.0, 8.0, 30.0, 20.0], [0.0, 0.0, 100.0, 100.0]])
    crop = torch.tensor([10.0, 5.0, 40.0, 30.0])
    moved = move_boxes(boxes, crop, False, 20)
    torch.testing.assert_close(moved, torch.tensor([[1.0, 2.0, 10.0, 10.0], [0.0, 0.0, 20.0, 20.0]]))
    flipped = move_boxes(boxes, crop, True, 20)
    torch.testing.assert_close(flipped, torch.tensor([[10.0, 2.0, 19.0, 10.0], [0.0, 0.0, 20.0, 20.0]]))


def test_the_file_of_a_sample_through_wrappers():
    from e2kd.data.batch_views import sample_path

    class Files:
        paths = ["a.jpg", "b.jpg"]

    class Wrapped:
        def __init__(self, attribute, inner):
            setattr(self, attribute, inner)

    assert sample_path(Files(), 1) == "b.jpg"
    for attribute in ("base", "samples", "dataset"):
        assert sample_path(Wrapped(attribute, Files()), 0) == "a.jpg"
    assert sample_path(Wrapped("base", Wrapped("samples", Files())), 1) == "b.jpg"
    assert sample_path(ListDataset([]), 3) == "sample 3"


def test_the_device_view_composes_crop_jitter_and_map_as_written_by_hand():
    """Non-square images, colour jitter, a two-channel map (image x and y of each map pixel's centre):
    the batch equals the crops of the draws' boxes, jittered with the draws' factors in their order,
    and the map reads each output pixel's source coordinates; a batch of one sample works too."""
    sizes = [(30, 50), (44, 26), (35, 35)]
    items = []
    g = torch.Generator().manual_seed(2)
    for h, w in sizes:
        x = (torch.arange(6) + 0.5) * w / 6
        y = (torch.arange(6) + 0.5) * h / 6
        column, row = x[None, :].expand(6, 6), y[:, None].expand(6, 6)
        image = torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)
        items.append({"image": image, "teacher_map": torch.stack([column, row]), "label": torch.tensor(1)})
    view = DeviceView(ListDataset(items), kind="resized_crop_flip", image_size=16, color_jitter=0.4, seed=4)
    draws = view.draws(2)
    batch = view.finish(view.collate([2, 0, 1], draws, canvas=False))
    mine = draws.take(torch.tensor([2, 0, 1]))
    size_rows = torch.tensor([sizes[i] for i in (2, 0, 1)])
    boxes, flips = mine.geometry(size_rows, "resized_crop_flip", 16)
    crops = resized_crops([items[i]["image"] for i in (2, 0, 1)], size_rows, boxes, flips, 16)
    torch.testing.assert_close(batch["image"], jitter_colours(crops, mine.jitter, mine.order), rtol=0, atol=1e-6)
    assert not torch.allclose(batch["image"], crops, atol=1e-3)  # the jitter was applied
    for k, (h, w) in enumerate(size_rows.tolist()):
        x = _source_columns(boxes[k], bool(flips[k]), 16)[None, :].expand(16, 16).float() + 0.5
        y = _source_rows(boxes[k], 16)[:, None].expand(16, 16).float() + 0.5
        # where the map is linear: between its outermost pixel centres, inside the crop's clamp
        inside = (x > w / 12) & (x < w - w / 12) & (y > h / 12) & (y < h - h / 12)
        inside[[0, -1], :] = False
        inside[:, [0, -1]] = False
        assert inside.sum() > 50
        torch.testing.assert_close(batch["teacher_map"][k, 0][inside], x[inside], rtol=0, atol=2e-3)
        torch.testing.assert_close(batch["teacher_map"][k, 1][inside], y[inside], rtol=0, atol=2e-3)
    one = view.finish(view.collate([1], draws))  # a batch of one sample, through a canvas
    torch.testing.assert_close(one["image"][0], batch["image"][2], rtol=0, atol=1 / 255 + 1e-6)
    assert one["label"].tolist() == [1]


def test_the_next_copy_is_issued_before_the_current_batch_is_handed_out():
    from e2kd.data.prefetch import one_ahead

    calls = []

    def issue(batch):
        calls.append(f"issue {batch['k']}")
        return batch

    def ready(batch):
        calls.append(f"ready {batch['k']}")
        return batch

    for batch in one_ahead(({"k": k} for k in range(3)), issue, ready):
        calls.append(f"step {batch['k']}")
    assert calls == [
        "issue 0",
        "ready 0",
        "issue 1",
        "step 0",
        "ready 1",
        "issue 2",
        "step 1",
        "ready 2",
        "step 2",
    ]
    assert list(one_ahead(iter([]), issue, ready)) == []


def test_boxes_beyond_the_image_read_its_last_row_and_column_without_the_crop_clamp():
    """A 4 x 8 image (wider than tall) in a 6 x 10 zero canvas, sampled over a box twice its size without
    the crop clamp: coordinates stop at the image's last row and column, never reaching the padding."""
    canvas = torch.zeros(1, 1, 6, 10)
    canvas[0, 0, :4, :8] = torch.arange(32.0).view(4, 8)
    box = torch.tensor([[0.0, 0.0, 16.0, 8.0]])
    out = sample_boxes(canvas, torch.tensor([[4, 8]]), box, torch.tensor([False]), 8, clamp_to_box=False)[0, 0]
    last_row = torch.tensor([24.5, 26.5, 28.5, 30.5, 31.0, 31.0, 31.0, 31.0])  # x = 0.5, 2.5, ..., then column 7
    torch.testing.assert_close(out[3:], last_row.expand(5, 8), rtol=0, atol=1e-4)
    torch.testing.assert_close(out[0, 4:], torch.full((4,), 7.0), rtol=0, atol=1e-4)


def test_the_fallback_of_a_square_image_is_the_whole_image():
    """Every attempt too wide (area share 1, aspect 1.2 > 1): the fallback keeps a square image whole."""
    from e2kd.data.batch_views import _resized_crop_boxes

    ratio_u = (math.log(1.2) - math.log(3 / 4)) / (math.log(4 / 3) - math.log(3 / 4))
    crop = torch.tensor([[[1.0, ratio_u]] * 10], dtype=torch.float64)
    box = _resized_crop_boxes(
        torch.tensor([[50, 50]]), crop, torch.zeros(1, 2, dtype=torch.float64), (0.08, 1.0), (3 / 4, 4 / 3)
    )
    assert box.tolist() == [[0, 0, 50, 50]] == [_torchvision_loop(50, 50, crop[0], [0.0, 0.0])]


def test_the_other_geometries_and_single_sample_batches_through_the_device_view():
    """``flip_crop`` and ``none`` on images not at the eval size (fractional boxes, the batched kernel) equal
    the crops of the draws' boxes; a one-sample batch gives that sample's view; an unknown kind is refused."""
    sizes = [(30, 50), (44, 26)]
    g = torch.Generator().manual_seed(5)
    items = [{"image": torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)} for h, w in sizes]
    for kind in ("flip_crop", "none"):
        view = DeviceView(ListDataset(items), kind=kind, image_size=12, seed=1)
        draws = view.draws(0)
        batch = view.finish(view.collate([0, 1], draws, canvas=False))
        boxes, flips = draws.geometry(torch.tensor(sizes), kind, 12)
        canvas = torch.zeros(2, 3, 44, 50, dtype=torch.uint8)
        for i, (h, w) in enumerate(sizes):
            canvas[i, :, :h, :w] = items[i]["image"]
        expected = sample_boxes(canvas, torch.tensor(sizes), boxes, flips, 12) / 255
        torch.testing.assert_close(batch["image"], expected, rtol=0, atol=1e-5)
        assert set(batch) == {"image"} and batch["image"].dtype == torch.float32
        one = view.finish(view.collate([1], draws, canvas=False))
        torch.testing.assert_close(one["image"][0], batch["image"][1], rtol=0, atol=1e-5)
    assert draws.geometry(torch.tensor(sizes), "none", 12)[1].dtype == torch.bool
    with pytest.raises(
        ValueError, match=r"unknown augmentation 'crop' \(known: none, flip, flip_crop, resized_crop_flip\)"
    ):
        DeviceView(ListDataset(items), kind="crop", image_size=12)


def test_a_fractional_box_of_an_image_given_in_a_list_takes_the_batched_kernel():
    ramp = torch.arange(200, dtype=torch.uint8).expand(3, 40, 200).clone()
    box = torch.tensor([[20.25, 3.5, 150.5, 30.0]])
    out = resized_crops([ramp], torch.tensor([[40, 200]]), box, torch.tensor([False]), 16)[0, 0] * 255
    expected = 20.25 + (torch.arange(16) + 0.5) * 150.5 / 16 - 0.5
    torch.testing.assert_close(out[5], expected.float(), rtol=0, atol=2e-4)
