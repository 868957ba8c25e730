"""The data the built-in generators write, fixed: shapes, textures and every writer of real on-disk formats.

The synthetic shapes, the shape writers (:mod:`e2kd.data.shape_formats`) and the miniature writers
(:mod:`e2kd.data.miniature`) feed the tests, the demo and ``e2kd reproduce``; their output is part
of every cached fingerprint (``GENERATOR_VERSION``). A snapshot (``tests/data/generators.json``)
holds a digest per writer of everything it hands to the disk — each image's pixels before encoding
(so the JPEG codec's version does not matter), its save options, every text file and the returned
manifest. A deliberate change regenerates it with ``python -m tests.test_generators`` (and, when
rendering changed, bumps ``GENERATOR_VERSION``). The shape and texture rules are also checked by
hand at their boundaries.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from e2kd.data import miniature, shape_formats, shapes
from e2kd.data.shape_formats import _background_for, _pil, render_scene
from e2kd.data.shapes import GENERATOR_VERSION, _background, _shape_mask, render
from e2kd_plugins.datasets.synthetic import SyntheticShapes

SNAPSHOT = Path(__file__).parent / "data" / "generators.json"
_SAVE = Image.Image.save


class _Recorder:
    """Feeds a SHA-256 with what a writer saves: image pixels and save options, text files, the manifest."""

    def __init__(self, root: Path) -> None:
        self.root, self.digest = root, hashlib.sha256()

    def add(self, *parts: Any) -> None:
        for part in parts:
            self.digest.update(part if isinstance(part, bytes) else repr(part).encode())

    def image(self, image: Image.Image, path: Any, **options: Any) -> None:
        self.add(
            Path(path).relative_to(self.root).as_posix(),
            image.mode,
            image.size,
            sorted(options.items()),
            np.asarray(image).tobytes(),
        )

    def value(self, value: Any) -> None:
        """A manifest: arrays by their bytes (floats rounded to 1e-6), paths relative to the root."""
        if isinstance(value, dict):
            for k in sorted(value):
                self.add(k)
                self.value(value[k])
        elif isinstance(value, (list, tuple)):
            self.add(len(value))
            for v in value:
                self.value(v)
        elif isinstance(value, np.ndarray):
            self.add(value.dtype.str, value.shape, np.round(value.astype(np.float64) * 1e6).astype(np.int64).tobytes())
        elif isinstance(value, Path):
            self.add(value.relative_to(self.root).as_posix())
        else:
            self.add(type(value).__name__, value)

    def files(self) -> None:
        """Every folder and every text file under the root (CSV, XML annotations, image sets)."""
        for path in sorted(self.root.rglob("*")):
            if path.is_dir():
                self.add("folder", path.relative_to(self.root).as_posix())
            elif path.suffix in (".csv", ".xml", ".txt"):
                self.add(path.relative_to(self.root).as_posix(), path.read_bytes())


def _arrays(shapes: SyntheticShapes) -> dict[str, np.ndarray]:
    return {name: getattr(shapes, name).numpy() for name in ("images", "masks", "labels", "groups")}


def _writers() -> dict[str, Callable[[Path], Any]]:
    """Each case writes into a folder and returns its manifest; defaults are left as they are."""
    return {
        "render_every_shape_on_every_background": lambda root: [
            render(label, background, 20, np.random.default_rng(7 * label + background))
            for label in range(len(shapes.SHAPES))
            for background in range(len(shapes.BACKGROUNDS))
        ],
        "render_scene": lambda root: [
            render_scene(labels, 30, np.random.default_rng(1)) for labels in ([0], [2, 5], [1, 3, 4])
        ],
        "shapes_folder_defaults": lambda root: shape_formats.write_shapes_folder(root, {"train": 1, "val": 1}),
        "shapes_folder_biased": lambda root: shape_formats.write_shapes_folder(
            root, {"train": 3}, num_classes=3, size=24, bias=0.6, seed=4
        ),
        "shapes_waterbirds": lambda root: shape_formats.write_shapes_waterbirds(
            root, {"train": {(0, 0): 2, (1, 1): 1}, "val": {(0, 1): 1}}, size=24, seed=2
        ),
        "shapes_waterbirds_defaults": lambda root: shape_formats.write_shapes_waterbirds(root, {"train": {(1, 0): 1}}),
        "shapes_voc_defaults": lambda root: shape_formats.write_shapes_voc(root, {"trainval": 2}),
        "shapes_voc": lambda root: shape_formats.write_shapes_voc(
            root, {"trainval": 3, "test": 2}, num_classes=5, size=40, max_objects=3, year="2012", seed=3
        ),
        "synthetic_shapes": lambda root: [
            _arrays(SyntheticShapes(2, 3, 16, 0.5, seed=3, stream=1)),
            _arrays(SyntheticShapes(1, 5, 16, mismatched=True, seed=2)),
        ],
        "image_folder": lambda root: miniature.write_image_folder(root, ["b", "a"], {"train": 2, "val": 1}),
        "image_folder_sized": lambda root: miniature.write_image_folder(
            root, ["x", "y", "z"], {"train": 1}, size=20, seed=5, quality=70
        ),
        "waterbirds": lambda root: miniature.write_waterbirds(
            root, {"train": {(0, 0): 1, (1, 0): 1}, "test": {(1, 1): 2}}, metadata="meta.csv"
        ),
        "voc": lambda root: miniature.write_voc(
            root,
            {
                "train": [
                    {
                        "id": "a",
                        "width": 20,
                        "height": 14,
                        "objects": [("cat", (1, 2, 10, 12), False), ("dog", (3, 3, 5, 5), True)],
                    },
                    {"id": "b", "width": 9, "height": 11, "objects": []},
                ],
                "val": [{"id": "c", "width": 12, "height": 12, "objects": [("bird", (2, 2, 12, 12), 0)]}],
            },
            year="2010",
        ),
    }


def digest_of(name: str, root: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """The digest of what case ``name`` writes into ``root``."""
    recorder = _Recorder(root)
    monkeypatch.setattr(
        Image.Image, "save", lambda self, path, **kw: (recorder.image(self, path, **kw), _SAVE(self, path, **kw))[1]
    )
    manifest = _writers()[name](root)
    recorder.value(manifest)
    recorder.files()
    return recorder.digest.hexdigest()


@pytest.mark.parametrize("name", sorted(_writers()))
def test_generated_data_is_the_snapshot(name, tmp_path, monkeypatch):
    snapshot = json.loads(SNAPSHOT.read_text())
    assert snapshot["generator_version"] == GENERATOR_VERSION, (
        "GENERATOR_VERSION changed: regenerate the snapshot with python -m tests.test_generators"
    )
    assert digest_of(name, tmp_path, monkeypatch) == snapshot["digests"][name], (
        f"the data written by {name!r} changed. If that is deliberate, bump GENERATOR_VERSION "
        f"(e2kd/data/shapes.py) when rendering changed, and regenerate: python -m tests.test_generators"
    )


def test_the_digest_ignores_the_folder_and_sees_a_changed_pixel(tmp_path, monkeypatch):
    a = digest_of("shapes_folder_biased", tmp_path / "a", monkeypatch)
    monkeypatch.setattr(shape_formats, "render", lambda label, bg, size, rng: render(label, bg, size, rng)[::-1][::-1])
    assert digest_of("shapes_folder_biased", tmp_path / "b", monkeypatch) == a  # the same work, another folder
    monkeypatch.setattr(
        shape_formats,
        "render",
        lambda label, bg, size, rng: (render(label, bg, size, rng)[0] * 0.99, render(label, bg, size, rng)[1]),
    )
    assert digest_of("shapes_folder_biased", tmp_path / "c", monkeypatch) != a


# -- by hand, at the boundaries ---------------------------------------------------------------


@pytest.mark.parametrize(
    "shape, inside, outside",
    [
        (0, [(0.8, 0.8), (-0.8, 0.0), (0.0, -0.8)], [(0.81, 0.0), (0.0, 0.81)]),  # square: max(|u|, |v|) <= 0.8
        (1, [(1.0, 0.0), (0.6, -0.8)], [(0.75, 0.7), (1.01, 0.0)]),  # disk: r <= 1
        (2, [(0.0, 0.8), (0.55, 0.0), (-0.99, 0.8), (0.0, -1.0)], [(0.0, 0.81), (0.56, 0.0), (0.01, -1.0), (1.0, 0.8)]),
        (3, [(0.3, 1.0), (-1.0, -0.3), (0.0, 0.0)], [(0.31, 0.5), (0.5, 0.31), (1.01, 0.0), (0.0, -1.01)]),  # cross
        (4, [(1.0, 0.0), (0.0, -0.55), (0.6, 0.6)], [(0.0, 0.0), (0.5, 0.0), (1.01, 0.0), (0.8, 0.8)]),  # ring
        (5, [(0.5, 0.5), (-1.0, 0.0), (0.0, 1.0)], [(0.6, 0.5), (0.5, -0.6)]),  # diamond: |u| + |v| <= 1
    ],
    ids=list(shapes.SHAPES),
)
def test_shape_masks_by_hand(shape, inside, outside):
    u = np.array([p[0] for p in inside + outside], dtype=np.float64)
    v = np.array([p[1] for p in inside + outside], dtype=np.float64)
    assert _shape_mask(shape, u, v).tolist() == [True] * len(inside) + [False] * len(outside)


def test_out_of_range_shape_and_background_are_named():
    with pytest.raises(ValueError, match=r"^shape index 6 out of range$"):
        _shape_mask(6, np.zeros(1), np.zeros(1))
    with pytest.raises(ValueError, match=r"^background index 6 out of range$"):
        _background(6, np.zeros(1), np.zeros(1), 4.0, 0.0)


def test_background_textures_by_hand():
    y, x = np.mgrid[0:4, 0:8].astype(np.float64) + 0.5  # pixel centres
    period, phase = 2.0, 0.5  # bands two pixels wide, shifted by half a pixel
    band = lambda c: np.floor((c + phase) / period) % 2  # noqa: E731
    expected = {
        0: band(y),
        1: band(x),
        2: (np.floor((x + phase) / period) + np.floor((y + phase) / period)) % 2,
        3: np.floor((x + y + phase) / period) % 2,
    }
    for kind, want in expected.items():
        got = _background(kind, x, y, period, phase)
        assert got.dtype == np.float32 and np.array_equal(got, want), kind
    assert _background(1, x, y, 2.0, 0.5)[0].tolist() == [0, 1, 1, 0, 0, 1, 1, 0]  # (x + .5) / 2: .5, 1, 1.5, 2, ...
    assert _background(0, x, y, 2.0, 0.5)[:, 0].tolist() == [0, 1, 1, 0]
    assert _background(2, x, y, 2.0, 0.5)[:2, :3].tolist() == [[0, 1, 1], [1, 0, 0]]
    assert _background(3, x, y, 2.0, 0.5)[:2, :3].tolist() == [[0, 1, 1], [1, 1, 0]]  # x + y + .5: 1.5, 2.5, 3.5
    assert _background(3, x, y, 4.0, 1.0)[1, :4].tolist() == [0, 1, 1, 1]  # x + y + 1 over 4: 3, 4, 5, 6
    # dots: a disk of radius period / 3.2 around each cell's centre; grid: lines 1.5 px wide
    y, x = np.mgrid[0:8, 0:8].astype(np.float64) + 0.5
    dots = _background(4, x, y, 8.0, 0.0)
    centre = np.hypot(x - 4.0, y - 4.0) <= 2.5
    assert dots.dtype == np.float32 and np.array_equal(dots, centre.astype(np.float32)) and dots.sum() == 16
    shifted = _background(4, x, y, 8.0, 2.0)
    assert np.array_equal(shifted, (np.hypot((x + 2) % 8 - 4, (y + 2) % 8 - 4) <= 2.5).astype(np.float32))
    assert shifted[1, 1] == 1 and shifted[5, 5] == 0
    grid = _background(5, x, y, 4.0, 1.0)
    lines = ((x + 1) % 4 < 1.5) | ((y + 1) % 4 < 1.5)
    assert grid.dtype == np.float32 and np.array_equal(grid, lines.astype(np.float32))
    assert grid[3].tolist() == [1] * 8 and grid[1].tolist() == [0, 0, 0, 1, 0, 0, 0, 1]  # (c + 1) % 4 < 1.5


def test_render_keeps_its_ranges():
    rng = np.random.default_rng(0)
    for label in range(len(shapes.SHAPES)):
        image, mask = render(label, label, 32, rng)
        assert image.dtype == np.float32 and mask.dtype == np.float32 and image.shape == (3, 32, 32)
        assert 0 <= image.min() and image.max() <= 1 and set(np.unique(mask)) == {0.0, 1.0}
        inside, outside = image[:, mask > 0], image[:, mask == 0]
        assert inside.mean() > 0.6 and outside.mean() < 0.5  # a bright object on a darker texture


def test_pil_rounds_and_clips_to_bytes():
    image = np.array([-0.2, 0.0, 0.5 / 255, 1.5 / 255, 0.5, 1.0, 1.3], dtype=np.float64).reshape(1, 1, 7).repeat(3, 0)
    pixels = np.asarray(_pil(image))
    assert pixels.shape == (1, 7, 3) and pixels.dtype == np.uint8
    assert pixels[0, :, 0].tolist() == [0, 0, 0, 2, 128, 255, 255]  # round half to even, then clip


def test_background_for_follows_the_bias():
    rng = np.random.default_rng(0)
    assert all(_background_for(3, 1.0, 6, rng) == 3 for _ in range(50))
    drawn = [_background_for(3, 0.0, 6, rng) for _ in range(600)]
    assert set(drawn) == set(range(6)) and 60 < drawn.count(3) < 140
    half = [_background_for(2, 0.5, 4, rng) for _ in range(2000)]
    assert 0.55 < half.count(2) / 2000 < 0.7  # 0.5 + 0.5 / 4


def test_writers_add_to_a_folder_they_wrote_before(tmp_path):
    first = miniature.write_image_folder(tmp_path / "f", ["a"], {"train": 1}, size=8)
    again = miniature.write_image_folder(tmp_path / "f", ["a", "b"], {"train": 1, "val": 1}, size=8, seed=1)
    assert first["train"][0][0] == again["train"][0][0] and len(list((tmp_path / "f").rglob("*.jpg"))) == 4
    voc = {"train": [{"id": "x", "width": 8, "height": 8, "objects": []}]}
    miniature.write_voc(tmp_path / "v", voc)
    miniature.write_voc(tmp_path / "v", {"val": voc["train"]})
    assert sorted(p.name for p in (tmp_path / "v" / "VOCdevkit" / "VOC2007" / "ImageSets" / "Main").iterdir()) == [
        "train.txt",
        "val.txt",
    ]
    miniature.write_waterbirds(tmp_path / "w", {"train": {(0, 0): 1}}, size=8)
    miniature.write_waterbirds(tmp_path / "w", {"train": {(0, 0): 2}}, size=8, metadata="more.csv")
    shape_formats.write_shapes_voc(tmp_path / "s", {"train": 1}, size=16)
    shape_formats.write_shapes_voc(tmp_path / "s", {"val": 1}, size=16)
    assert (tmp_path / "s" / "VOCdevkit" / "VOC2007" / "ImageSets" / "Main" / "val.txt").is_file()


def test_writer_arguments_are_checked(tmp_path):
    for bad in (1, 7):
        with pytest.raises(ValueError, match=rf"^num_classes must be in \[2, 6\] \(got {bad}\)$"):
            shape_formats.write_shapes_folder(tmp_path, {"train": 1}, num_classes=bad)
    shape_formats.write_shapes_folder(tmp_path / "six", {"train": 1}, num_classes=6, size=12)
    shape_formats.write_shapes_folder(tmp_path / "two", {"train": 1}, num_classes=2, size=12)
    for classes, objects in ((1, 1), (7, 1), (3, 0), (3, 4)):
        with pytest.raises(ValueError, match=r"^need 2 <= num_classes <= 6 and 1 <= max_objects <= num_classes$"):
            shape_formats.write_shapes_voc(tmp_path, {"x": 1}, num_classes=classes, max_objects=objects)
    shape_formats.write_shapes_voc(tmp_path / "v", {"x": 1}, num_classes=6, max_objects=6, size=24)
    shape_formats.write_shapes_voc(tmp_path / "w", {"x": 1}, num_classes=2, max_objects=1, size=24)


def test_voc_boxes_are_the_masks_one_based_inclusive_bounds(tmp_path):
    manifest = shape_formats.write_shapes_voc(tmp_path, {"trainval": 4}, size=32, max_objects=3, seed=1)
    for entry in manifest["trainval"]:
        for _label, (x1, y1, x2, y2), mask in entry["objects"]:
            rows, cols = np.nonzero(mask)
            assert (x1, y1, x2, y2) == (cols.min() + 1, rows.min() + 1, cols.max() + 1, rows.max() + 1)
        masks = [m for _, _, m in entry["objects"]]
        assert sum(m.astype(int) for m in masks).max() == 1  # objects in separate columns never overlap


def main(argv: list[str]) -> int:
    """Regenerate the snapshot (a deliberate change of the generators)."""
    import tempfile

    monkeypatch = pytest.MonkeyPatch()
    digests = {}
    try:
        for name in sorted(_writers()):
            with tempfile.TemporaryDirectory() as root:
                digests[name] = digest_of(name, Path(root), monkeypatch)
            monkeypatch.undo()
    finally:
        monkeypatch.undo()
    SNAPSHOT.write_text(json.dumps({"generator_version": GENERATOR_VERSION, "digests": digests}, indent=1) + "\n")
    print(f"wrote {SNAPSHOT}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
