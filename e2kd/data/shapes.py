"""Images of a foreground shape on a textured background, with the object's mask.

The class is the shape; the background texture can be made to correlate with it (a shortcut, as
land/water is in Waterbirds). Used by the ``synthetic`` dataset plugin and by the writers that put
such images into real on-disk formats (:mod:`e2kd.data.shape_formats`).
"""

from __future__ import annotations

import numpy as np

#: Bump when rendering changes, so caches made from older images are refused.
GENERATOR_VERSION = 1
SHAPES = ("square", "disk", "triangle", "cross", "ring", "diamond")
BACKGROUNDS = ("h-stripes", "v-stripes", "checker", "diagonal", "dots", "grid")


def _shape_mask(shape: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    r = np.sqrt(u * u + v * v)
    if shape == 0:
        return np.maximum(np.abs(u), np.abs(v)) <= 0.8
    if shape == 1:
        return r <= 1.0
    if shape == 2:
        return (v <= 0.8) & (np.abs(u) <= (v + 1.0) * 0.55)
    if shape == 3:
        return ((np.abs(u) <= 0.3) & (np.abs(v) <= 1.0)) | ((np.abs(v) <= 0.3) & (np.abs(u) <= 1.0))
    if shape == 4:
        return (r <= 1.0) & (r >= 0.55)
    if shape == 5:
        return np.abs(u) + np.abs(v) <= 1.0
    raise ValueError(f"shape index {shape} out of range")


def _background(kind: int, x: np.ndarray, y: np.ndarray, period: float, phase: float) -> np.ndarray:
    """A binary texture (H, W) in {0, 1}."""
    if kind == 0:
        t = (y + phase) / period
    elif kind == 1:
        t = (x + phase) / period
    elif kind == 2:
        return ((np.floor((x + phase) / period) + np.floor((y + phase) / period)) % 2).astype(np.float32)
    elif kind == 3:
        t = (x + y + phase) / period
    elif kind == 4:
        cx = (x + phase) % period - period / 2
        cy = (y + phase) % period - period / 2
        return (cx * cx + cy * cy <= (period / 3.2) ** 2).astype(np.float32)
    elif kind == 5:
        return (((x + phase) % period < 1.5) | ((y + phase) % period < 1.5)).astype(np.float32)
    else:
        raise ValueError(f"background index {kind} out of range")
    return (np.floor(t) % 2).astype(np.float32)


def render(label: int, background: int, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One image (3, H, W) in [0, 1] and its object mask (H, W)."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    period = rng.uniform(4.0, 7.0)
    texture = _background(background, x, y, period, rng.uniform(0, period))
    dark, light = rng.uniform(0.05, 0.3, 3), rng.uniform(0.35, 0.6, 3)
    image = dark[:, None, None] + (light - dark)[:, None, None] * texture[None]
    radius = rng.uniform(0.22, 0.32) * size
    cx, cy = rng.uniform(radius, size - radius, 2)
    mask = _shape_mask(label, (x - cx) / radius, (y - cy) / radius)
    colour = rng.uniform(0.65, 1.0, 3)
    image = np.where(mask[None], colour[:, None, None], image)
    image = image + rng.normal(0.0, 0.03, image.shape)
    return np.clip(image, 0.0, 1.0).astype(np.float32), mask.astype(np.float32)
