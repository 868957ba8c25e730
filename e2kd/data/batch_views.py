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
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .augment import AUGMENTATIONS, EVAL_RESIZE_RATIO, boxes_to_masks
from .files import unreadable
from .prefetch import ReusedBuffers, loaded_ahead, on_device_ahead

#: torchvision's RandomResizedCrop defaults and its number of rejection-sampling attempts.
CROP_SCALE, CROP_RATIO, CROP_ATTEMPTS = (0.08, 1.0), (3 / 4, 4 / 3), 10
#: RGB weights of the grayscale image colour jitter blends with (torchvision's).
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)
#: The batch key of what the device view's host half hands its device half (sizes, draws, masks, boxes).
VIEW = "device_view"


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The generator of one epoch's augmentation draws (independent of the batch order's)."""
    state = np.random.SeedSequence([seed, epoch, 0x5EED]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & (2**63 - 1))


def _resized_crop_boxes(
    sizes: torch.Tensor,
    crop: torch.Tensor,
    offset: torch.Tensor,
    scale: tuple[float, float],
    ratio: tuple[float, float],
) -> torch.Tensor:
    """The boxes of :func:`resized_crop_boxes` from its uniforms: ``crop`` (N, attempts, 2) for the area
    share and the log aspect ratio of each attempt, ``offset`` (N, 2) for the position."""
    sizes, crop, offset = sizes.to(crop.device), crop.double(), offset.double()
    height, width = sizes[:, 0:1].double(), sizes[:, 1:2].double()
    share = crop[..., 0] * (scale[1] - scale[0]) + scale[0]
    low, high = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(crop[..., 1] * (high - low) + low)
    w = torch.round(torch.sqrt(height * width * share * aspect))
    h = torch.round(torch.sqrt(height * width * share / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.double().argmax(1, keepdim=True)  # the first attempt that fits (0 when none does)
    w, h, found = w.gather(1, first)[:, 0], h.gather(1, first)[:, 0], fits.any(1)
    height, width = height[:, 0], width[:, 0]
    # the fallback: the whole image, its aspect ratio clamped into [ratio[0], ratio[1]]
    in_ratio = width / height
    fw = torch.where(in_ratio > ratio[1], torch.round(height * ratio[1]), width)
    fh = torch.where(in_ratio < ratio[0], torch.round(width / ratio[0]), height)
    w, h = torch.where(found, w, fw), torch.where(found, h, fh)
    top = torch.where(
        found, torch.floor(offset[:, 0] * (height - h + 1)), torch.div(height - h, 2, rounding_mode="floor")
    )
    left = torch.where(
        found, torch.floor(offset[:, 1] * (width - w + 1)), torch.div(width - w, 2, rounding_mode="floor")
    )
    return torch.stack([left, top, w, h], 1)


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
    crop = torch.rand(n, CROP_ATTEMPTS, 2, generator=generator, dtype=torch.float64)
    offset = torch.rand(n, 2, generator=generator, dtype=torch.float64)
    return _resized_crop_boxes(sizes, crop, offset, scale, ratio)


def resized_size(sizes: torch.Tensor, short_side: int) -> torch.Tensor:
    """(N, 2) sizes after ``v2.Resize(short_side)``: the short side becomes ``short_side``, the long
    side ``int(short_side * long / short)``."""
    height, width = sizes[:, 0].double(), sizes[:, 1].double()
    short, long = torch.minimum(height, width), torch.maximum(height, width)
    new_long = torch.floor(short_side * long / short)
    return torch.stack(
        [torch.where(height <= width, short_side, new_long), torch.where(height <= width, new_long, short_side)], 1
    ).double()


def resize_crop_boxes(sizes: torch.Tensor, image_size: int, offset: torch.Tensor | None) -> torch.Tensor:
    """(N, 4) boxes in source pixels of "resize the short side to ``image_size``·256/224, then crop
    ``image_size``": centred (``offset`` None; the evaluation view) or at the uniform integer offset
    ``floor(offset · (room + 1))`` of ``v2.RandomCrop`` (``offset``: (N, 2) uniforms, rows then columns)."""
    resized = resized_size(sizes, round(image_size * EVAL_RESIZE_RATIO))
    room = resized - image_size  # (N, 2): rows, columns left over
    place = torch.round(room / 2.0) if offset is None else torch.floor(offset.double().to(room.device) * (room + 1))
    factor = resized / sizes.double()  # (N, 2) resized / source, per axis
    top, left = place[:, 0] / factor[:, 0], place[:, 1] / factor[:, 1]
    return torch.stack([left, top, image_size / factor[:, 1], image_size / factor[:, 0]], 1)


@dataclass
class Draws:
    """One epoch's random numbers of every sample, whatever its size: uniforms for the crop's attempts
    ``crop`` (N, 10, 2) and position ``offset`` (N, 2), for the flip ``flip`` (N,), and the colour
    jitter factors (N, 3) (brightness, contrast, saturation) with the order (N, 3) they apply in (None
    without jitter). :meth:`geometry` turns them into crop boxes once the images' sizes are known."""

    crop: torch.Tensor
    offset: torch.Tensor
    flip: torch.Tensor
    jitter: torch.Tensor | None = None
    order: torch.Tensor | None = None

    def take(self, index: torch.Tensor) -> Draws:
        """The draws of the samples ``index``."""
        return Draws(
            *(None if t is None else t[index] for t in (self.crop, self.offset, self.flip, self.jitter, self.order))
        )

    def geometry(self, sizes: torch.Tensor, kind: str, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(boxes (N, 4) ``(left, top, width, height)`` in source pixels, flips (N,)) of the training
        geometry ``kind`` for images of ``sizes`` (N, 2) (see :func:`e2kd.data.augment.geometric_transform`)."""
        if kind == "resized_crop_flip":
            boxes = _resized_crop_boxes(sizes, self.crop, self.offset, CROP_SCALE, CROP_RATIO)
        else:
            boxes = resize_crop_boxes(sizes, image_size, self.offset if kind == "flip_crop" else None)
        flips = self.flip < 0.5 if kind != "none" else torch.zeros_like(self.flip, dtype=torch.bool)
        return boxes, flips


def draw_epoch(n: int, color_jitter: float, generator: torch.Generator) -> Draws:
    """The random numbers of ``n`` samples for one epoch (:class:`Draws`)."""
    crop = torch.rand(n, CROP_ATTEMPTS, 2, generator=generator, dtype=torch.float64)
    offset = torch.rand(n, 2, generator=generator, dtype=torch.float64)
    flip = torch.rand(n, generator=generator)
    if color_jitter <= 0:
        return Draws(crop, offset, flip)
    low, high = max(0.0, 1 - color_jitter), 1 + color_jitter
    jitter = torch.rand(n, 3, generator=generator, dtype=torch.float64) * (high - low) + low
    order = torch.rand(n, 3, generator=generator).argsort(1)
    return Draws(crop, offset, flip, jitter.float(), order)


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
    images: torch.Tensor | list[torch.Tensor],
    sizes: torch.Tensor,
    boxes: torch.Tensor,
    flips: torch.Tensor,
    out: int,
    host: ReusedBuffers | None = None,
) -> torch.Tensor:
    """(N, 3, out, out) float images in [0, 1] from uint8 images (a padded canvas, or a list of images
    at their own sizes): the crop of each box resized bilinearly (antialias off), flipped where
    ``flips`` — :func:`sample_boxes` of the image; on the CPU in ``host``'s reused memory where given.

    On the CPU, whole-pixel boxes take a faster route: each crop is copied out channels-last and
    resized on its own by torch's uint8 kernel (vectorised for channels-last images only, twice as
    fast as on the strided crop), so no pixel outside a crop is touched and nothing is converted
    before the resize. Its values are those of torchvision's ``resized_crop`` of the uint8 image,
    within one uint8 level (1/255) of the float computation.
    """
    listed = isinstance(images, list)
    cpu = (images[0] if listed else images).device.type == "cpu"
    if cpu and bool((boxes == torch.round(boxes)).all()):
        shape = (len(images), 3, out, out)
        result = torch.empty(shape) if host is None else host.take(shape)
        for i, (left, top, width, height) in enumerate(boxes.long().tolist()):
            crop = images[i][None, :, top : top + height, left : left + width]
            crop = crop.contiguous(memory_format=torch.channels_last)
            resized = F.interpolate(crop, size=(out, out), mode="bilinear", align_corners=False)[0]
            result[i].copy_(resized.flip(-1) if flips[i] else resized).mul_(1 / 255)  # while in cache
        return result
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


def decode_images(
    blobs: list[torch.Tensor], device: torch.device, name: Callable[[int], str] | None = None
) -> list[torch.Tensor]:
    """(3, h, w) uint8 RGB images on ``device`` from encoded files (1-D uint8 tensors of their bytes):
    JPEGs decoded in one batched call on the device (nvJPEG on CUDA); a batch with a file that call
    cannot take (a PNG, a CMYK JPEG on some decoders) is decoded file by file, those on the CPU. A file
    nothing decodes is a one-line :class:`~e2kd.errors.DataError` naming it (``name(position)``)."""
    from torchvision.io import ImageReadMode, decode_image, decode_jpeg

    try:
        return list(decode_jpeg(blobs, mode=ImageReadMode.RGB, device=device))
    except RuntimeError:
        images = []
        for position, blob in enumerate(blobs):
            try:
                images.append(decode_jpeg(blob, mode=ImageReadMode.RGB, device=device))
            except RuntimeError:
                try:
                    images.append(decode_image(blob.cpu(), mode=ImageReadMode.RGB).to(device))
                except RuntimeError as exc:
                    where = name(position) if name is not None else f"image {position} of the batch"
                    raise unreadable(where, exc) from None
        return images


def sample_path(samples: Any, index: int) -> str:
    """The file of sample ``index`` of ``samples`` (through wrappers holding the samples as ``base``,
    ``samples`` or ``dataset``), or ``sample <index>`` when no file is known."""
    while not hasattr(samples, "paths"):
        inner = next((getattr(samples, a) for a in ("base", "samples", "dataset") if hasattr(samples, a)), None)
        if inner is None:
            return f"sample {index}"
        samples = inner
    return str(samples.paths[index])


class DeviceView:
    """The training view of uint8 samples of any size, applied per batch on the training device.

    ``samples[i]`` holds a uint8 ``image`` (3, h, w) — or, with ``encoded``, the bytes of its image
    file (1-D uint8), decoded on the device by :func:`decode_images` — and optionally a ``mask``
    (K, h, w), ``boxes`` + ``box_labels`` (rasterised into per-class masks after the geometry, as the
    item view does) and a replayed ``teacher_map`` (C, m, m) covering the whole image; other fields are
    collated as they are. :meth:`batches` is the batch source :func:`e2kd.train.fit` reads:
    ``threads`` background threads gather the next batches, which are copied to the device ahead of
    the step and decoded, cropped, flipped, jittered and converted there (on the CPU the threads do
    that work too, beside the step).
    """

    def __init__(
        self,
        samples: torch.utils.data.Dataset,
        *,
        kind: str,
        image_size: int,
        color_jitter: float = 0.0,
        num_classes: int = 0,
        seed: int = 0,
        threads: int = 2,
        encoded: bool = False,
    ) -> None:
        if kind not in AUGMENTATIONS:
            raise ValueError(f"unknown augmentation {kind!r} (known: {', '.join(AUGMENTATIONS)})")
        self.samples, self.kind, self.image_size, self.color_jitter = samples, kind, image_size, color_jitter
        self.num_classes, self.seed, self.threads, self.encoded = num_classes, seed, threads, encoded
        self._host_images = ReusedBuffers(keep=threads + 4)  # the batches ahead, the step's, the last one's

    def __len__(self) -> int:
        return len(self.samples)  # type: ignore[arg-type]

    def draws(self, epoch: int) -> Draws:
        """Every sample's random numbers in ``epoch``."""
        return draw_epoch(len(self), self.color_jitter, epoch_generator(self.seed, epoch))

    def collate(self, indices: list[int], draws: Draws, *, canvas: bool = True, pin: bool = False) -> dict:
        """The host batch of samples ``indices``: their uint8 images (a padded canvas to copy to a
        device, else a list of the images as they are; encoded files always as a list) and their draws."""
        items = [self.samples[i] for i in indices]
        images = [item["image"] for item in items]
        mine = draws.take(torch.tensor(indices, dtype=torch.long))
        view = {"crop": mine.crop, "offset": mine.offset, "flip": mine.flip}  # what finish needs, not the step
        view["index"] = torch.tensor(indices, dtype=torch.long)
        if mine.jitter is not None:
            view["jitter"], view["order"] = mine.jitter, mine.order
        if not self.encoded:
            view["size"] = torch.tensor([list(image.shape[-2:]) for image in images], dtype=torch.long)
        if "boxes" in items[0]:  # (boxes replace masks, as in the item view)
            view["boxes"] = [item["boxes"].as_subclass(torch.Tensor) for item in items]
            view["box_labels"] = [torch.as_tensor(item["box_labels"]) for item in items]
        elif "mask" in items[0]:
            view["mask"] = _canvas([torch.as_tensor(item["mask"]) for item in items], pin)
        batch: dict = {"image": _canvas(images, pin) if canvas and not self.encoded else images, VIEW: view}
        if "teacher_map" in items[0]:
            batch["teacher_map"] = torch.stack([item["teacher_map"] for item in items])
        skip = {"image", "mask", "boxes", "box_labels", "teacher_map"}
        rest = [{k: v for k, v in item.items() if k not in skip} for item in items]
        batch.update(torch.utils.data.default_collate(rest))
        return batch

    def finish(self, batch: dict) -> dict:
        """The training batch from a host batch on its device: images decoded (``encoded``), crops
        resized, flips, colour jitter, float images in [0, 1]; the teacher map and masks moved with
        the image."""
        out = {k: v for k, v in batch.items() if k != VIEW}
        view, images = batch[VIEW], batch["image"]
        if self.encoded:
            device = images[0].device
            index = view["index"].tolist()
            images = decode_images(images, device, lambda k: sample_path(self.samples, index[k]))
            sizes = torch.tensor([list(image.shape[-2:]) for image in images], dtype=torch.long, device=device)
        else:
            sizes = view["size"]
        draws = Draws(view["crop"], view["offset"], view["flip"], view.get("jitter"), view.get("order"))
        boxes, flips = draws.geometry(sizes, self.kind, self.image_size)
        out["image"] = resized_crops(images, sizes, boxes, flips, self.image_size, self._host_images)
        if draws.jitter is not None:
            out["image"] = jitter_colours(out["image"], draws.jitter, draws.order)
        if "teacher_map" in out:
            maps = out["teacher_map"].float()
            scale = torch.tensor(maps.shape[-2:], dtype=torch.float64, device=sizes.device) / sizes.double()
            in_map = boxes.double() * torch.stack([scale[:, 1], scale[:, 0], scale[:, 1], scale[:, 0]], 1)
            map_sizes = torch.tensor(maps.shape[-2:], device=sizes.device).expand(len(maps), 2)
            out["teacher_map"] = sample_boxes(maps, map_sizes, in_map, flips, self.image_size, clamp_to_box=False)
        if "mask" in view:
            out["mask"] = sample_boxes(view["mask"].float(), sizes, boxes, flips, self.image_size, mode="nearest")
        if "boxes" in view:
            size = (self.image_size, self.image_size)
            moved = zip(view["boxes"], view["box_labels"], boxes, flips, strict=True)
            out["mask"] = torch.stack(
                [
                    boxes_to_masks(move_boxes(b, box, bool(flip), self.image_size), labels, self.num_classes, size)
                    for b, labels, box, flip in moved
                ]
            )
        return out

    def batches(self, sampler, device: torch.device) -> Iterator[dict]:
        """The training batches of ``sampler``'s current epoch (its ``epoch`` and ``skip``) on ``device``."""
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
