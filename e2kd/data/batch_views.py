"""The training view applied to a whole batch on the training device, each sample with its own draw.

Images arrive as uint8 at their stored sizes (a padded canvas plus each image's height and width);
the geometry is one crop box and one flip bit per sample, resampled to ``image_size`` × ``image_size``
bilinearly, then colour jitter and the conversion to float in [0, 1]. The same box moves a replayed
teacher map (which covers the whole image), masks (nearest) and boxes (their coordinates), so they
stay aligned with the image pixel for pixel.

Every draw is a function of ``(seed, epoch, sample index)`` alone: an epoch's parameters are drawn for
all samples at once from a generator seeded by ``(seed, epoch)`` and looked up by index. A run
resumed mid-epoch, and any number of processes, therefore see exactly the augmentation of one
uninterrupted process.

The geometry is torchvision's (``v2.RandomResizedCrop``, ``Resize`` + ``RandomCrop``/``CenterCrop``,
``RandomHorizontalFlip``) with two differences, both stated in docs/datasets.md: the resampling
is bilinear without antialiasing (the decoded cache stores images near the training resolution, so
crops shrink by little), and a crop box in fractional source pixels (a resize folded into the crop)
is resampled once instead of twice.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .augment import AUGMENTATIONS, EVAL_RESIZE_RATIO

#: torchvision's RandomResizedCrop defaults and its number of rejection-sampling attempts.
CROP_SCALE, CROP_RATIO, CROP_ATTEMPTS = (0.08, 1.0), (3 / 4, 4 / 3), 10
#: RGB weights of the grayscale image colour jitter blends with (torchvision's).
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The generator of one epoch's augmentation draws (independent of the batch order's)."""
    state = np.random.SeedSequence([seed, epoch, 0x5EED]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & (2**63 - 1))


def resized_crop_boxes(
    sizes: torch.Tensor,
    generator: torch.Generator,
    scale: tuple[float, float] = CROP_SCALE,
    ratio: tuple[float, float] = CROP_RATIO,
) -> torch.Tensor:
    """(N, 4) integer crop boxes ``(left, top, width, height)`` of ``v2.RandomResizedCrop`` for
    images of ``sizes`` (N, 2) = (height, width): up to ten attempts of area share ~ U(scale) and
    log aspect ratio ~ U(log ratio) that fit, at a uniform integer offset; else the central crop
    with the aspect ratio clamped into ``ratio``."""
    n = len(sizes)
    height, width = sizes[:, 0:1].double(), sizes[:, 1:2].double()
    area = height * width
    share = torch.rand(n, CROP_ATTEMPTS, generator=generator, dtype=torch.float64) * (scale[1] - scale[0]) + scale[0]
    low, high = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(torch.rand(n, CROP_ATTEMPTS, generator=generator, dtype=torch.float64) * (high - low) + low)
    w = torch.round(torch.sqrt(area * share * aspect))
    h = torch.round(torch.sqrt(area * share / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.double().argmax(1, keepdim=True)  # the first attempt that fits (0 when none does)
    w, h, found = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0], fits.any(1)
    height, width = height[:, 0], width[:, 0]
    # the fallback: the whole image, its aspect ratio clamped into [ratio[0], ratio[1]]
    in_ratio = width / height
    fw = torch.where(in_ratio > ratio[1], torch.round(height * ratio[1]), width)
    fh = torch.where(in_ratio < ratio[0], torch.round(width / ratio[0]), height)
    w, h = torch.where(found, w, fw), torch.where(found, h, fh)
    offsets = torch.rand(n, 2, generator=generator, dtype=torch.float64)
    top = torch.where(
        found, torch.floor(offsets[:, 0] * (height - h + 1)), torch.div(height - h, 2, rounding_mode="floor")
    )
    left = torch.where(
        found, torch.floor(offsets[:, 1] * (width - w + 1)), torch.div(width - w, 2, rounding_mode="floor")
    )
    return torch.stack([left, top, w, h], 1)


def resized_size(sizes: torch.Tensor, short_side: int) -> torch.Tensor:
    """(N, 2) sizes after ``v2.Resize(short_side)``: the short side becomes ``short_side``, the long
    side ``int(short_side * long / short)``."""
    height, width = sizes[:, 0].double(), sizes[:, 1].double()
    short, long = torch.minimum(height, width), torch.maximum(height, width)
    new_long = torch.floor(short_side * long / short)
    return torch.stack(
        [torch.where(height <= width, short_side, new_long), torch.where(height <= width, new_long, short_side)], 1
    ).double()


def resize_crop_boxes(sizes: torch.Tensor, image_size: int, generator: torch.Generator | None) -> torch.Tensor:
    """(N, 4) boxes in source pixels of "resize the short side to ``image_size``·256/224, then crop
    ``image_size``": centred (``generator`` None; the evaluation view) or at a uniform integer offset
    (``v2.RandomCrop``)."""
    resized = resized_size(sizes, round(image_size * EVAL_RESIZE_RATIO))
    room = resized - image_size  # (N, 2): rows, columns left over
    if generator is None:
        offset = torch.round(room / 2.0)
    else:
        offset = torch.floor(torch.rand(len(sizes), 2, generator=generator, dtype=torch.float64) * (room + 1))
    factor = resized / sizes.double()  # (N, 2) resized / source, per axis
    top, left = offset[:, 0] / factor[:, 0], offset[:, 1] / factor[:, 1]
    return torch.stack([left, top, image_size / factor[:, 1], image_size / factor[:, 0]], 1)


@dataclass
class Draws:
    """One epoch's augmentation of every sample: crop boxes (N, 4) ``(left, top, width, height)`` in
    source pixels, horizontal flips (N,), and colour-jitter factors (N, 3) (brightness, contrast,
    saturation) with the order (N, 3) they apply in (None without jitter)."""

    boxes: torch.Tensor
    flips: torch.Tensor
    jitter: torch.Tensor | None = None
    order: torch.Tensor | None = None

    def take(self, index: torch.Tensor) -> Draws:
        """The draws of the samples ``index``."""
        pick = (lambda t: t[index]) if len(index) else (lambda t: t[:0])
        return Draws(
            pick(self.boxes),
            pick(self.flips),
            None if self.jitter is None else pick(self.jitter),
            None if self.order is None else pick(self.order),
        )


def draw_epoch(
    sizes: torch.Tensor, kind: str, image_size: int, color_jitter: float, generator: torch.Generator
) -> Draws:
    """Every sample's training geometry of ``kind`` (for images of any size; see
    :func:`e2kd.data.augment.geometric_transform`) and its colour jitter."""
    if kind not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {kind!r} (known: {', '.join(AUGMENTATIONS)})")
    n = len(sizes)
    if kind == "resized_crop_flip":
        boxes = resized_crop_boxes(sizes, generator)
    else:
        boxes = resize_crop_boxes(sizes, image_size, generator if kind == "flip_crop" else None)
    flips = torch.rand(n, generator=generator) < 0.5 if kind != "none" else torch.zeros(n, dtype=torch.bool)
    if color_jitter <= 0:
        return Draws(boxes, flips)
    low, high = max(0.0, 1 - color_jitter), 1 + color_jitter
    jitter = torch.rand(n, 3, generator=generator, dtype=torch.float64) * (high - low) + low
    order = torch.rand(n, 3, generator=generator).argsort(1)
    return Draws(boxes, flips, jitter.float(), order)


def _axis(start: torch.Tensor, length: torch.Tensor, out: int, limit: torch.Tensor, clamp_to_box: bool) -> torch.Tensor:
    """(N, out) source pixel coordinates sampled along one axis (align_corners=False), clamped to the
    pixels the box covers (``clamp_to_box``: as resizing a crop does) and to ``[0, limit - 1]``."""
    steps = torch.arange(out, dtype=torch.float64, device=start.device) + 0.5
    coords = start[:, None] + steps[None] * (length / out)[:, None] - 0.5
    if clamp_to_box:
        coords = torch.maximum(coords, torch.floor(start)[:, None])
        coords = torch.minimum(coords, (torch.ceil(start + length) - 1)[:, None])
    return torch.minimum(coords.clamp_min(0), (limit - 1)[:, None].double())


def sample_boxes(
    canvas: torch.Tensor,
    sizes: torch.Tensor,
    boxes: torch.Tensor,
    flips: torch.Tensor,
    out: int,
    *,
    mode: str = "bilinear",
    clamp_to_box: bool = True,
) -> torch.Tensor:
    """(N, C, out, out): box ``boxes[i]`` of ``canvas[i]`` (images of ``sizes`` (N, 2) in the top-left
    corner of a padded canvas) resampled to ``out`` × ``out``, flipped where ``flips``.

    Bilinear sampling uses ``F.interpolate``'s coordinate map (align_corners=False); with
    ``clamp_to_box`` it equals resizing the cropped image, as ``v2.functional.resized_crop`` does.
    ``mode="nearest"`` picks the nearest source pixel of that coordinate (masks).
    """
    device = canvas.device
    boxes, sizes = boxes.to(device, torch.float64), sizes.to(device)
    xs = _axis(boxes[:, 0], boxes[:, 2], out, sizes[:, 1], clamp_to_box)
    ys = _axis(boxes[:, 1], boxes[:, 3], out, sizes[:, 0], clamp_to_box)
    xs = torch.where(flips.to(device)[:, None], xs.flip(1), xs)
    height, width = canvas.shape[-2:]
    gx = ((2 * xs + 1) / width - 1).float()
    gy = ((2 * ys + 1) / height - 1).float()
    grid = torch.stack([gx[:, None, :].expand(-1, out, -1), gy[:, :, None].expand(-1, -1, out)], -1)
    source = canvas if canvas.is_floating_point() else canvas.float()
    return F.grid_sample(source, grid, mode=mode, padding_mode="border", align_corners=False)


def _canvas(tensors: list[torch.Tensor], pin: bool = False) -> torch.Tensor:
    """(N, C, H, W): the tensors in the top-left corners of a zero canvas of the largest height and width."""
    channels = tensors[0].shape[0]
    height, width = max(t.shape[-2] for t in tensors), max(t.shape[-1] for t in tensors)
    canvas = torch.zeros(len(tensors), channels, height, width, dtype=tensors[0].dtype, pin_memory=pin)
    for i, t in enumerate(tensors):
        canvas[i, :, : t.shape[-2], : t.shape[-1]] = t
    return canvas


def resized_crops(
    images: torch.Tensor | list[torch.Tensor], sizes: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor, out: int
) -> torch.Tensor:
    """(N, 3, out, out) float images in [0, 1] from uint8 images (a padded canvas, or a list of images
    at their own sizes): the crop of each box resized bilinearly (antialias off), flipped where
    ``flips`` — :func:`sample_boxes` of the image.

    On the CPU, whole-pixel boxes take a faster route: each crop resized on its own by torch's uint8
    kernel (vectorised for channels-last images, as the decoded cache's are), so no pixel outside a
    crop is touched and nothing is converted before the resize. Its values are those of torchvision's
    ``resized_crop`` of the uint8 image, within one uint8 level (1/255) of the float computation.
    """
    listed = isinstance(images, list)
    cpu = (images[0] if listed else images).device.type == "cpu"
    if cpu and bool((boxes == torch.round(boxes)).all()):
        result = torch.empty(len(images), 3, out, out)
        for i, (left, top, width, height) in enumerate(boxes.long().tolist()):
            crop = images[i][:, top : top + height, left : left + width]
            resized = F.interpolate(crop[None], size=(out, out), mode="bilinear", align_corners=False)[0]
            result[i] = resized.flip(-1) if flips[i] else resized
        return result.mul_(1 / 255)
    canvas = _canvas(images) if listed else images
    return sample_boxes(canvas, sizes, boxes, flips, out).mul_(1 / 255)


def jitter_colours(images: torch.Tensor, factors: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """``v2.ColorJitter`` (brightness, contrast, saturation) of float images in [0, 1], each image with
    its own factors (N, 3) applied in its own order (N, 3) of the three operations."""
    images = images.float()
    weights = torch.tensor(GRAY_WEIGHTS, device=images.device).view(1, 3, 1, 1)
    factors, order = factors.to(images.device), order.to(images.device)
    for position in range(3):
        op = order[:, position].view(-1, 1, 1, 1)
        f = factors.gather(1, order[:, position : position + 1]).view(-1, 1, 1, 1)
        gray = (images * weights).sum(1, keepdim=True)
        target = torch.where(
            op == 0,
            torch.zeros_like(gray),
            torch.where(op == 1, gray.mean((2, 3), keepdim=True), gray),
        )
        images = (images * f + target * (1 - f)).clamp_(0, 1)
    return images


def move_boxes(boxes: torch.Tensor, box: torch.Tensor, flip: bool, out: int) -> torch.Tensor:
    """XYXY ``boxes`` (K, 4) of a source image in the coordinates of its crop ``box`` resized to
    ``out`` × ``out`` (and flipped), clipped to the crop."""
    left, top, width, height = box.double().tolist()
    b = boxes.double()
    x = ((b[:, 0::2] - left) * (out / width)).clamp(0, out)
    y = ((b[:, 1::2] - top) * (out / height)).clamp(0, out)
    if flip:
        x = out - x.flip(1)
    return torch.stack([x[:, 0], y[:, 0], x[:, 1], y[:, 1]], 1).float()


class DeviceView:
    """The training view of uint8 samples of any size, applied per batch on the training device.

    ``samples[i]`` holds a uint8 ``image`` (3, h, w) with ``sizes[i] = (h, w)``, and optionally a
    ``mask`` (K, h, w), ``boxes`` + ``box_labels`` (rasterised into per-class masks after the
    geometry, as the item view does) and a replayed ``teacher_map`` (C, m, m) covering the whole
    image; other fields are collated as they are. :meth:`batches` is the batch source
    :func:`e2kd.train.fit` reads: ``threads`` background threads gather the next batches, which are
    copied to the device ahead of the step and cropped, flipped, jittered and converted there (on the
    CPU the threads do that work too, beside the step).
    """

    def __init__(
        self,
        samples: torch.utils.data.Dataset,
        sizes: torch.Tensor,
        *,
        kind: str,
        image_size: int,
        color_jitter: float = 0.0,
        num_classes: int = 0,
        seed: int = 0,
        threads: int = 2,
    ) -> None:
        if len(sizes) != len(samples):  # type: ignore[arg-type]
            raise ValueError("one size per sample")
        if kind not in AUGMENTATIONS:
            raise ValueError(f"unknown augmentation {kind!r} (known: {', '.join(AUGMENTATIONS)})")
        self.samples, self.sizes = samples, sizes.long()
        self.kind, self.image_size, self.color_jitter = kind, image_size, color_jitter
        self.num_classes, self.seed, self.threads = num_classes, seed, threads

    def __len__(self) -> int:
        return len(self.sizes)

    def draws(self, epoch: int) -> Draws:
        """Every sample's augmentation in ``epoch``."""
        return draw_epoch(self.sizes, self.kind, self.image_size, self.color_jitter, epoch_generator(self.seed, epoch))

    def collate(self, indices: list[int], draws: Draws, *, canvas: bool = True, pin: bool = False) -> dict:
        """The host batch of samples ``indices``: their uint8 images (a padded canvas to copy to a
        device, else a list of the memory-mapped images as they are), their draws, boxes already
        rasterised into masks (geometry known, no pixels needed)."""
        from .augment import boxes_to_masks

        index = torch.tensor(indices, dtype=torch.long)
        items = [self.samples[i] for i in indices]
        mine = draws.take(index)
        batch: dict = {
            "image": _canvas([item["image"] for item in items], pin) if canvas else [item["image"] for item in items],
            "size": self.sizes[index],
            "boxes_": mine.boxes,
            "flips_": mine.flips,
        }
        if mine.jitter is not None:
            batch["jitter_"], batch["order_"] = mine.jitter, mine.order
        if "mask" in items[0] and "boxes" not in items[0]:  # (boxes replace masks, as in the item view)
            batch["mask_"] = _canvas([torch.as_tensor(item["mask"]) for item in items], pin)
        if "boxes" in items[0]:
            size = (self.image_size, self.image_size)
            batch["mask"] = torch.stack(
                [
                    boxes_to_masks(
                        move_boxes(item["boxes"].as_subclass(torch.Tensor), box, bool(flip), self.image_size),
                        item["box_labels"],
                        self.num_classes,
                        size,
                    )
                    for item, box, flip in zip(items, mine.boxes, mine.flips, strict=True)
                ]
            )
        if "teacher_map" in items[0]:
            batch["teacher_map"] = torch.stack([item["teacher_map"] for item in items])
        skip = {"image", "mask", "boxes", "box_labels", "teacher_map"}
        rest = [{k: v for k, v in item.items() if k not in skip} for item in items]
        batch.update(torch.utils.data.default_collate(rest))
        return batch

    def finish(self, batch: dict) -> dict:
        """The training batch from a host batch on the device: crops resized, flips, colour jitter,
        float images in [0, 1]; the teacher map and masks moved with the image."""
        out = dict(batch)
        sizes, boxes, flips = out.pop("size"), out.pop("boxes_"), out.pop("flips_")
        jitter, order = out.pop("jitter_", None), out.pop("order_", None)
        out["image"] = resized_crops(batch["image"], sizes, boxes, flips, self.image_size)
        if jitter is not None:
            out["image"] = jitter_colours(out["image"], jitter, order)
        if "teacher_map" in out:
            maps = out["teacher_map"].float()
            scale = torch.tensor(maps.shape[-2:], dtype=torch.float64, device=sizes.device) / sizes.double()
            in_map = boxes.double() * torch.stack([scale[:, 1], scale[:, 0], scale[:, 1], scale[:, 0]], 1)
            map_sizes = torch.tensor(maps.shape[-2:], device=sizes.device).expand(len(maps), 2)
            out["teacher_map"] = sample_boxes(maps, map_sizes, in_map, flips, self.image_size, clamp_to_box=False)
        if "mask_" in out:  # the samples' own masks (box masks were rasterised at the crop already)
            masks = out.pop("mask_")
            out["mask"] = sample_boxes(masks.float(), sizes, boxes, flips, self.image_size, mode="nearest")
        return out

    def batches(self, sampler, device: torch.device) -> Iterator[dict]:
        """The training batches of ``sampler``'s current epoch (its ``epoch`` and ``skip``) on ``device``."""
        from .prefetch import loaded_ahead, on_device_ahead

        draws = self.draws(sampler.epoch)
        if device.type == "cpu":  # the view itself runs in the loader threads, beside the step
            yield from loaded_ahead(
                lambda indices: self.finish(self.collate(indices, draws, canvas=False)), sampler, threads=self.threads
            )
            return
        host = loaded_ahead(
            lambda indices: self.collate(indices, draws, pin=device.type == "cuda"), sampler, threads=self.threads
        )
        for batch in on_device_ahead(host, device):
            yield self.finish(batch)
