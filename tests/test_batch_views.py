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
