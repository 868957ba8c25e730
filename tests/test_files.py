"""Helpers of file-based datasets (``e2kd.data.files``) against values written by hand."""

from __future__ import annotations

import hashlib
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from e2kd.data.files import ImageFiles, drop_unreadable, files_digest, list_images, per_split, read_image
from e2kd.errors import DataError


def _png(path, value: int = 0, mode: str = "RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (3, 2), value if mode != "RGB" else (value, value, value)).save(path)
    return path


def test_list_images_filters_by_extension_at_any_depth_and_sorts(tmp_path):
    a, b = _png(tmp_path / "b.PNG"), _png(tmp_path / "sub" / "a.png")
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "folder.png").mkdir()  # a folder with an image's name is not a file
    _png(tmp_path / "c.jpg")
    assert list_images(tmp_path, ["png"]) == sorted([a, b])  # an extension without its dot, matched case-blind
    assert list_images(tmp_path, [".PNG", "JPG"]) == sorted([a, b, tmp_path / "c.jpg"])


def test_files_digest_is_the_sha256_of_the_relative_paths_one_per_line(tmp_path):
    paths = [tmp_path / "x" / "1.png", tmp_path / "2.png"]
    assert files_digest(paths, tmp_path) == hashlib.sha256(b"x/1.png\n2.png\n").hexdigest()
    assert files_digest(paths[::-1], tmp_path) != files_digest(paths, tmp_path)


def test_read_image_errors_name_the_file_and_the_cause(tmp_path):
    with pytest.raises(DataError, match=r"^/.*missing\.png: image file not found$"):
        read_image(tmp_path / "missing.png")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png at all")
    with pytest.raises(DataError, match=r"broken\.png: unreadable or truncated image \(UnidentifiedImageError: "):
        read_image(broken)


def test_read_image_converts_every_mode_to_rgb_uint8(tmp_path):
    gray = read_image(_png(tmp_path / "g.png", 7, "L"))
    assert gray.dtype == torch.uint8 and gray.shape == (3, 2, 3) and (gray == 7).all()
    rgb = _png(tmp_path / "rgb.png")
    Image.fromarray(np.arange(18, dtype=np.uint8).reshape(2, 3, 3)).save(rgb)
    assert torch.equal(read_image(rgb), torch.arange(18, dtype=torch.uint8).view(2, 3, 3).permute(2, 0, 1))


def test_drop_unreadable_keeps_the_good_indices_and_warns_once_naming_one(tmp_path):
    good = [_png(tmp_path / f"{i}.png") for i in range(3)]
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"junk")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert drop_unreadable([good[0], bad, good[1], bad, good[2]], progress=False) == [0, 2, 4]
    assert [str(w.message) for w in caught] == [f"e2kd: skipped 2 unreadable image(s), e.g. {bad}"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert drop_unreadable(good, progress=False) == [0, 1, 2]
    assert not caught


def test_image_files_need_one_label_and_field_entry_per_path(tmp_path):
    paths = [_png(tmp_path / "a.png", 1), _png(tmp_path / "b.png", 2)]
    files = ImageFiles(paths, torch.tensor([4, 5]), {"group": torch.tensor([0, 1])})
    item = files[1]
    assert len(files) == 2 and int(item["label"]) == 5 and int(item["group"]) == 1 and (item["image"] == 2).all()
    with pytest.raises(ValueError, match="^labels and every field need one entry per path$"):
        ImageFiles(paths, torch.tensor([4]))
    with pytest.raises(ValueError, match="one entry per path"):
        ImageFiles(paths, torch.tensor([4, 5]), {"group": torch.tensor([0])})


def test_per_split_memoises_per_split_and_seed():
    class Reader:
        seed = 0
        calls = 0

        @per_split
        def files(self, split):
            type(self).calls += 1
            return [split, self.seed, self.calls]

    r = Reader()
    assert r.files("train") == ["train", 0, 1] and r.files("train") == ["train", 0, 1]
    assert r.files("val") == ["val", 0, 2]
    r.seed = 1
    assert r.files("train") == ["train", 1, 3]
    assert Reader().files("train") == ["train", 0, 4]  # per instance
