"""Dataset plugins on miniature trees in the real on-disk formats (JPEG/PNG files, metadata.csv, VOC XML)."""

import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2

import e2kd
from e2kd.config import load_config_dict
from e2kd.data import make_loader, open_dataset, split_view
from e2kd.data.augment import View, boxes_to_masks
from e2kd.data.files import read_image
from e2kd.data.miniature import random_image, write_image_folder, write_voc, write_waterbirds
from e2kd.errors import ConfigError, DataError

CLASSES = ["zebra", "apple", "mango"]  # sorted: apple 0, mango 1, zebra 2


@pytest.fixture
def folder(tmp_path):
    manifest = write_image_folder(tmp_path / "inet", CLASSES, {"train": 12, "val": 3}, seed=1)
    return tmp_path / "inet", manifest


def _folder(root, seed=0, **options):
    return open_dataset("image_folder", {"root": str(root), "image_size": 16, **options}, seed=seed)


def test_image_folder_class_order_labels_and_splits(folder):
    root, manifest = folder
    ds = _folder(root)
    assert ds.class_names() == ["apple", "mango", "zebra"]  # torchvision ImageFolder order
    assert ds.splits() == ("train", "val") and ds.eval_splits() == ("val",)
    val = ds.samples("val")
    assert len(val) == 9
    expected = {p.name: label for p, label in manifest["val"]}
    for i in range(len(val)):
        assert int(val[i]["label"]) == expected[val.paths[i].name]
    # the pixels are the file's: compare with a direct PIL decode
    item = val[4]
    direct = np.asarray(Image.open(val.paths[4]).convert("RGB"))
    assert torch.equal(item["image"], torch.from_numpy(direct.copy()).permute(2, 0, 1))
    # a test/ folder is a third split, evaluated by default
    write_image_folder(root, CLASSES, {"test": 1}, seed=2)
    with_test = _folder(root)
    assert with_test.splits() == ("train", "val", "test") and with_test.eval_splits() == ("val", "test")
    assert len(with_test.samples("test")) == 3


def test_shots_are_seeded_disjoint_from_holdout_and_nested(folder):
    root, _ = folder
    a = _folder(root, shots=4, holdout_per_class=3, seed=7)
    b = _folder(root, shots=4, holdout_per_class=3, seed=7)
    c = _folder(root, shots=4, holdout_per_class=3, seed=8)
    more = _folder(root, shots=6, holdout_per_class=3, seed=7)
    assert a.splits() == ("train", "train_holdout", "val")
    train, hold = a.files("train"), a.files("train_holdout")
    assert len(train) == 12 and len(hold) == 9
    for label in range(3):  # per class: 4 shots, 3 held out
        assert sum(lbl == label for _, lbl in train) == 4 and sum(lbl == label for _, lbl in hold) == 3
    assert not {p for p, _ in train} & {p for p, _ in hold}
    assert train == b.files("train") and hold == b.files("train_holdout")
    assert train != c.files("train")
    assert {p for p, _ in train} <= {p for p, _ in more.files("train")}  # 4-shot subset of the 6-shot one
    assert hold == more.files("train_holdout")  # the held-out split does not depend on shots
    assert a.identity("train") != c.identity("train") and a.identity("train") == b.identity("train")


def test_grayscale_palette_cmyk_and_png_become_rgb(tmp_path):
    root = tmp_path / "modes"
    for split in ("train", "val"):
        (root / split / "a").mkdir(parents=True)
    rgb = random_image(np.random.default_rng(0), 20, 10)
    rgb.convert("L").save(root / "train" / "a" / "gray.jpg")
    rgb.convert("P").save(root / "train" / "a" / "palette.png")
    rgb.convert("CMYK").save(root / "train" / "a" / "cmyk.jpg")
    rgb.convert("RGBA").save(root / "val" / "a" / "alpha.png")
    ds = _folder(root)
    for sample in (ds.samples("train")[i] for i in range(3)):
        assert sample["image"].shape == (3, 10, 20) and sample["image"].dtype == torch.uint8
    gray = read_image(root / "train" / "a" / "gray.jpg")
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])


def test_truncated_image_names_the_file_or_is_skipped_with_a_count(folder):
    root, manifest = folder
    bad = manifest["train"][5][0]
    bad.write_bytes(bad.read_bytes()[:200])
    ds = _folder(root)
    index = ds.samples("train").paths.index(bad)
    with pytest.raises(DataError, match=rf"{bad.name}: unreadable or truncated image.*skip_unreadable"):
        ds.samples("train")[index]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        skipping = _folder(root, skip_unreadable=True)
        assert len(skipping.samples("train")) == 35
    assert any("skipped 1 unreadable image(s)" in str(w.message) for w in caught)


def test_image_folder_errors_name_the_path_and_option(folder, tmp_path):
    root, _ = folder
    with pytest.raises(DataError, match=r"data.options.root: .*nowhere: folder not found"):
        _folder(tmp_path / "nowhere")
    (tmp_path / "only_train" / "train" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match=r"^data.options.root: .*only_train/val: folder not found"):
        _folder(tmp_path / "only_train")
    (tmp_path / "only_val" / "val" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match=r"^data.options.root: .*only_val/train: folder not found"):
        _folder(tmp_path / "only_val")
    with pytest.raises(DataError, match=r"12 images, fewer than holdout_per_class \+ shots = 20"):
        _folder(root, shots=10, holdout_per_class=10).files("train")
    (root / "empty" / "apple").mkdir(parents=True)
    with pytest.raises(DataError, match=r"empty: no images with extensions \.jpg, \.jpeg, "):
        _folder(root)._folder_files("empty")
    (root / "val" / "kiwi").mkdir()
    (root / "val" / "kiwi" / "x.jpg").write_bytes(b"")
    with pytest.raises(DataError, match=rf"val/kiwi: class folder not present in {root / 'train'}; "):
        _folder(root).samples("val")
    with pytest.raises(ConfigError, match=r"data.options.shot: unknown key; did you mean 'shots'"):
        load_config_dict({"data": {"name": "image_folder", "options": {"root": str(root), "shot": 5}}})
    with pytest.raises(ConfigError, match=r"data.name: unknown dataset 'imagefolder'; did you mean 'image_folder'"):
        load_config_dict({"data": {"name": "imagefolder"}})


def test_waterbirds_groups_splits_and_in_distribution(tmp_path):
    counts = {
        "train": {(0, 0): 3, (1, 1): 3, (0, 1): 1},
        "val": {(0, 0): 1, (0, 1): 1, (1, 0): 1, (1, 1): 1},
        "test": {(0, 1): 2, (1, 0): 2},
    }
    rows = write_waterbirds(tmp_path / "wb", counts, seed=2)
    ds = open_dataset("waterbirds", {"root": str(tmp_path / "wb"), "image_size": 16})
    assert ds.class_names() == ["landbird", "waterbird"] and ds.splits() == ("train", "val", "test")
    for split, code in (("train", 0), ("val", 1), ("test", 2)):
        mine = [r for r in rows if r["split"] == code]
        samples = ds.samples(split)
        assert len(samples) == len(mine)
        for i, r in enumerate(mine):
            item = samples[i]
            assert int(item["label"]) == r["y"] and int(item["group"]) == 2 * r["y"] + r["place"]
            assert bool(item["in_distribution"]) == (r["y"] == r["place"])
    # Waterbirds-100 is the same reader on another metadata file
    write_waterbirds(tmp_path / "wb", {"train": {(1, 1): 2}}, metadata="wb100.csv", seed=3)
    assert (
        len(open_dataset("waterbirds", {"root": str(tmp_path / "wb"), "metadata": "wb100.csv"}).samples("train")) == 2
    )


def test_waterbirds_metadata_errors(tmp_path):
    (tmp_path / "wb").mkdir()
    with pytest.raises(DataError, match=r"data.options.metadata: .*metadata.csv: file not found"):
        open_dataset("waterbirds", {"root": str(tmp_path / "wb")})
    (tmp_path / "wb" / "metadata.csv").write_text("img_filename,y,split\na.jpg,0,0\n")
    with pytest.raises(DataError, match=r"metadata.csv: missing column\(s\) place"):
        open_dataset("waterbirds", {"root": str(tmp_path / "wb")})
    (tmp_path / "wb" / "metadata.csv").write_text("img_filename,y,place,split\na.jpg,0,0,0\nb.jpg,2,0,0\n")
    with pytest.raises(DataError, match=r"metadata.csv, line 3: y and place must be 0 or 1"):
        open_dataset("waterbirds", {"root": str(tmp_path / "wb")})


VOC_IMAGES = {
    "train": [
        {
            "id": "000001",
            "width": 40,
            "height": 30,
            "objects": [
                ("dog", (1, 1, 20, 10), False),
                ("person", (11, 6, 40, 30), False),
                ("cat", (5, 5, 8, 8), True),
            ],
        },
        {"id": "000002", "width": 32, "height": 32, "objects": [("cat", (3, 3, 16, 16), False)]},
    ],
    "val": [{"id": "000003", "width": 24, "height": 36, "objects": [("bus", (2, 2, 20, 30), False)]}],
}


def test_voc_multi_hot_labels_boxes_and_difficult(tmp_path):
    write_voc(tmp_path / "voc", VOC_IMAGES)
    ds = open_dataset("voc", {"root": str(tmp_path / "voc"), "image_size": 16})
    names = ds.class_names()
    assert len(names) == 20 and ds.label_type == "multi" and ds.splits() == ("train", "val")
    item = ds.samples("train")[0]
    assert torch.nonzero(item["label"]).flatten().tolist() == sorted([names.index("dog"), names.index("person")])
    assert item["boxes"].tolist() == [[0, 0, 20, 10], [10, 5, 40, 30]]  # 1-based inclusive -> pixel edges
    assert item["box_labels"].tolist() == [names.index("dog"), names.index("person")]
    with_difficult = open_dataset("voc", {"root": str(tmp_path / "voc"), "difficult": True})
    assert with_difficult.samples("train")[0]["label"][names.index("cat")] == 1
    # root may also be VOCdevkit or VOC2007 itself
    for root in (tmp_path / "voc" / "VOCdevkit", tmp_path / "voc" / "VOCdevkit" / "VOC2007"):
        assert len(open_dataset("voc", {"root": str(root)}).samples("val")) == 1
    with pytest.raises(DataError, match=r"no VOC2012 folder"):
        open_dataset("voc", {"root": str(tmp_path / "voc"), "year": "2012"})
    with pytest.raises(DataError, match=r"ImageSets/Main/test.txt: file not found"):
        open_dataset("voc", {"root": str(tmp_path / "voc"), "eval_image_sets": ["test"]})
    (ds.year_dir / "Annotations" / "000002.xml").write_text(
        "<annotation><object><name>unicorn</name></object></annotation>"
    )
    with pytest.raises(DataError, match=r"000002.xml: unknown class 'unicorn'"):
        open_dataset("voc", {"root": str(tmp_path / "voc")}).samples("train")


def test_box_masks_follow_a_flip_and_crop(tmp_path):
    """The rasterised mask after flip + crop equals flipping and cropping the box by hand."""
    image = torch.rand(3, 30, 40)
    boxes = tv_tensors.BoundingBoxes(
        torch.tensor([[0.0, 0.0, 20.0, 10.0], [10.0, 5.0, 40.0, 30.0]]), format="XYXY", canvas_size=(30, 40)
    )
    item = {"image": image, "label": torch.zeros(3), "boxes": boxes, "box_labels": torch.tensor([0, 2])}
    flip_crop = View(v2.Compose([v2.RandomHorizontalFlip(p=1.0), v2.CenterCrop((20, 30))]), num_classes=3)
    out = flip_crop(item)
    assert torch.equal(out["image"], image.flip(-1)[:, 5:25, 5:35])
    # by hand: flipped x -> 40 - x; crop offset (top 5, left 5), clamp to 30 x 20
    expected = torch.zeros(3, 20, 30, dtype=torch.uint8)
    expected[0, 0:5, 15:30] = 1  # box 0: x 20..40 -> 15..35 (clamped 30), y 0..10 -> -5..5
    expected[2, 0:20, 0:25] = 1  # box 1: x 0..30 -> -5..25, y 5..30 -> 0..25 (clamped 20)
    assert torch.equal(out["mask"], expected)
    # the rasteriser alone: pixel centres inside [x1, x2) x [y1, y2)
    m = boxes_to_masks(torch.tensor([[0.4, 1.6, 2.5, 3.0]]), torch.tensor([1]), 2, (4, 4))
    assert m[1].tolist() == [[0, 0, 0, 0], [0, 0, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0]] and m[0].sum() == 0


def test_views_resize_and_centre_crop_real_images(folder):
    root, _ = folder
    ds = _folder(root)
    val = split_view(ds, "val", "eval")
    raw = ds.samples("val")[0]["image"]
    item = val[0]
    assert item["image"].shape == (3, 16, 16) and item["image"].dtype == torch.float32
    # eval view by hand: resize the short side to round(16 * 256 / 224) = 18, centre crop 16
    resized = v2.functional.resize(raw, 18, antialias=True)
    top, left = (resized.shape[1] - 16) // 2, (resized.shape[2] - 16) // 2
    expected = resized[:, top : top + 16, left : left + 16].float() / 255
    assert torch.allclose(item["image"], expected, atol=1e-6)
    whole = split_view(ds, "val", "whole")[0]["image"]
    assert torch.allclose(whole, v2.functional.resize(raw, [16, 16], antialias=True).float() / 255, atol=1e-6)
    torch.manual_seed(0)
    batch = next(iter(make_loader(split_view(ds, "train", "train"), 5)))
    assert batch["image"].shape == (5, 3, 16, 16) and batch["label"].shape == (5,)


def test_voc_batches_carry_per_class_masks(tmp_path):
    write_voc(tmp_path / "voc", VOC_IMAGES)
    ds = open_dataset("voc", {"root": str(tmp_path / "voc"), "image_size": 16})
    batch = next(iter(make_loader(split_view(ds, "train", "eval"), 2)))
    assert batch["mask"].shape == (2, 20, 16, 16) and batch["label"].shape == (2, 20)
    present = batch["mask"].flatten(2).amax(2) > 0
    assert torch.equal(present, batch["label"] > 0)  # a mask exactly for each present class here


def test_plugins_list_datasets_and_every_builtin_module_is_an_entry_point():
    import importlib.metadata as metadata
    import pkgutil

    import e2kd_plugins

    names = {i.name for i in e2kd.list_plugins("dataset")}
    assert {"synthetic", "image_folder", "waterbirds", "voc"} <= names
    points = {ep.value for ep in metadata.entry_points(group="e2kd") if ep.value.startswith("e2kd_plugins.")}
    with_hooks = set()
    for mod in pkgutil.walk_packages(e2kd_plugins.__path__, "e2kd_plugins."):
        module = __import__(mod.name, fromlist=["_"])
        if any(getattr(getattr(module, n, None), "e2kd_impl", None) for n in dir(module)):
            with_hooks.add(mod.name)
    assert with_hooks and with_hooks == points, (
        f"modules with hook implementations but no entry point: {with_hooks - points}"
    )


def test_a_bad_image_in_a_loader_worker_is_one_line_naming_the_file(folder, tmp_path, capsys):
    import yaml

    from e2kd.cli import main

    root, manifest = folder
    bad = manifest["train"][2][0]
    bad.write_bytes(bad.read_bytes()[:100])
    config = {
        "data": {"name": "image_folder", "options": {"root": str(root), "image_size": 16}, "num_workers": 2},
        "model": {"name": "small_resnet", "options": {"widths": [4]}},
        "train": {"epochs": 1, "batch_size": 36},
        "out_dir": str(tmp_path / "run"),
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    assert main(["train-teacher", str(tmp_path / "c.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"e2kd: error: {bad}: unreadable or truncated image")


def test_replayed_teacher_map_moves_with_a_real_sized_image():
    """Frozen teacher on file data: the map stored for the whole (squeezed) image, resized back to
    the image's own size, follows the random resized crop + flip of the image."""
    from e2kd.data.augment import make_view

    rng = np.random.default_rng(0)
    image = torch.from_numpy(np.array(random_image(rng, 40, 30))).permute(2, 0, 1)  # uint8 (3, 30, 40)
    whole = v2.functional.resize(image, [16, 16], antialias=True).float() / 255
    view = make_view("train", 16, fixed_size=False, augment="resized_crop_flip")
    torch.manual_seed(0)
    for _ in range(10):
        out = view({"image": image, "label": torch.tensor(0), "teacher_map": whole[:1]})
        assert out["image"].shape == (3, 16, 16) and out["teacher_map"].shape == (1, 16, 16)
        aligned = (out["teacher_map"][0] - out["image"][0]).abs().mean()
        mirrored = (out["teacher_map"][0].flip(-1) - out["image"][0]).abs().mean()
        assert aligned < 0.05 and aligned < 0.5 * mirrored


def _edit_csv(path, row, column, value):
    import csv

    rows = list(csv.DictReader(path.open()))
    rows[row][column] = str(value)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_dataset_identities_tell_splits_roots_and_labels_apart(tmp_path):
    """What a frozen-teacher cache is keyed by: a split, another copy of the tree, a changed label
    or background (the same files) or a moved box each give another identity; reopening the same
    tree gives the same one."""
    import shutil

    counts = {"train": {(0, 0): 2, (1, 1): 2}, "val": {(0, 1): 1, (1, 0): 1}}
    write_waterbirds(tmp_path / "wb", counts, seed=1)
    write_voc(tmp_path / "voc", VOC_IMAGES)
    write_image_folder(tmp_path / "folder", ["a", "b"], {"train": 2, "val": 1}, size=(16, 16), seed=0)
    trees = {"waterbirds": ("wb", {}), "voc": ("voc", {}), "image_folder": ("folder", {"image_size": 16})}
    for name, (folder, options) in trees.items():

        def identity(root, split="train", name=name, options=options):
            return open_dataset(name, {"root": str(root), **options}).identity(split)

        base = identity(tmp_path / folder)
        assert base == identity(tmp_path / folder)
        assert base["split"] == "train" and base != identity(tmp_path / folder, "val"), name
        shutil.copytree(tmp_path / folder, tmp_path / f"{folder}_copy")
        copy = identity(tmp_path / f"{folder}_copy")
        assert copy != base and copy["root"] != base["root"], name
    metadata = tmp_path / "wb" / "metadata.csv"
    before = open_dataset("waterbirds", {"root": str(tmp_path / "wb")}).identity("train")
    for column in ("y", "place"):
        _edit_csv(metadata, 0, column, 1)
        after = open_dataset("waterbirds", {"root": str(tmp_path / "wb")}).identity("train")
        assert after["labels_sha256"] != before["labels_sha256"] and after["files_sha256"] == before["files_sha256"]
        before = after
    annotation = tmp_path / "voc" / "VOCdevkit" / "VOC2007" / "Annotations" / "000002.xml"
    voc_before = open_dataset("voc", {"root": str(tmp_path / "voc")}).identity("train")
    annotation.write_text(annotation.read_text().replace("<xmax>16</xmax>", "<xmax>17</xmax>"))
    voc_after = open_dataset("voc", {"root": str(tmp_path / "voc")}).identity("train")
    assert voc_after["objects_sha256"] != voc_before["objects_sha256"]
    assert voc_after["files_sha256"] == voc_before["files_sha256"]
