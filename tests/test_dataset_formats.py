"""Datasets held in other formats: a Hugging Face ``datasets`` folder (save_to_disk, parquet) and
WebDataset tar shards, written by the libraries' own writers from the JPEGs of an image folder, give
that folder's samples — pixels, labels, k-shot draws — and train one epoch to the same losses."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from PIL import Image

from e2kd.config import load_config_dict
from e2kd.data import open_dataset
from e2kd.errors import ConfigError, DataError
from e2kd.experiment import train_teacher

CLASSES = ["cat", "dog", "fox"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """root/{train,val}/<class>/*.jpg: real JPEGs of different sizes (5 train, 2 val per class)."""
    root = tmp_path_factory.mktemp("folder")
    g = torch.Generator().manual_seed(0)
    for split, count in (("train", 5), ("val", 2)):
        for c, name in enumerate(CLASSES):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                h, w = 20 + 3 * i, 24 + 2 * c
                pixels = (torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()
                Image.fromarray(pixels).save(root / split / name / f"{i}.jpg", quality=90)
    return root


def _files(root: Path, split: str) -> list[tuple[Path, int]]:
    return open_dataset("image_folder", {"root": str(root), "image_size": 16}).files(split)


@pytest.fixture(scope="module")
def saved(folder, tmp_path_factory) -> Path:
    """The folder as a DatasetDict written by save_to_disk (image bytes embedded, ClassLabel names)."""
    import datasets

    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=CLASSES)})
    splits = {
        split: datasets.Dataset.from_dict(
            {
                "image": [{"bytes": p.read_bytes(), "path": None} for p, _ in _files(folder, split)],
                "label": [label for _, label in _files(folder, split)],
            },
            features=features,
        )
        for split in ("train", "val")
    }
    out = tmp_path_factory.mktemp("hf") / "saved"
    datasets.DatasetDict(splits).save_to_disk(str(out))
    for split, rows in splits.items():
        rows.to_parquet(str(out.parent / f"{split}.parquet"))
    return out


@pytest.fixture(scope="module")
def shards(folder, tmp_path_factory) -> Path:
    """The folder as WebDataset shards written by webdataset's TarWriter: train in two shards, val in one."""
    import webdataset

    out = tmp_path_factory.mktemp("wds")
    train = _files(folder, "train")
    for name, files in (("train-000", train[:8]), ("train-001", train[8:]), ("val-000", _files(folder, "val"))):
        with webdataset.TarWriter(str(out / f"{name}.tar")) as sink:
            for i, (path, label) in enumerate(files):
                sink.write({"__key__": f"{path.parent.name}/{path.stem}-{i}", "jpg": path.read_bytes(), "cls": label})
    return out


def _options(kind: str, folder: Path, saved: Path, shards: Path, **extra) -> dict:
    return {
        "image_folder": {"root": str(folder)},
        "hf_datasets": {"path": str(saved), "train_split": "train"},
        "parquet": {
            "data_files": {"train": [str(saved.parent / "train.parquet")], "val": [str(saved.parent / "val.parquet")]}
        },
        "webdataset": {
            "shards": {"train": str(shards / "train-{000..001}.tar"), "val": str(shards / "val-000.tar")},
            "class_names": CLASSES,
        },
    }[kind] | {"image_size": 16, **extra}


def _name(kind: str) -> str:
    return "hf_datasets" if kind == "parquet" else kind


@pytest.mark.parametrize("kind", ["hf_datasets", "parquet", "webdataset"])
@pytest.mark.parametrize("draw", [{}, {"shots": 3, "holdout_per_class": 1}])
def test_samples_equal_the_image_folders(folder, saved, shards, kind, draw):
    reference = open_dataset("image_folder", _options("image_folder", folder, saved, shards, **draw), seed=4)
    other = open_dataset(_name(kind), _options(kind, folder, saved, shards, **draw), seed=4)
    assert other.class_names() == CLASSES and other.splits() == reference.splits()
    assert other.eval_splits() == ("val",)
    for split in reference.splits():
        want, got = reference.samples(split), other.samples(split)
        assert len(got) == len(want) == {"train": 9 if draw else 15, "train_holdout": 3, "val": 6}[split]
        for i in range(len(want)):
            assert torch.equal(got[i]["image"], want[i]["image"]) and int(got[i]["label"]) == int(want[i]["label"])
    identity = other.identity("val")
    assert identity["split"] == "val" and identity != other.identity("train")
    assert identity.get("num_rows", identity.get("num_samples")) == 6
    other_seed = open_dataset(_name(kind), _options(kind, folder, saved, shards, **draw), seed=5)
    if draw:  # another seed draws other shots, and the identity (cache fingerprints) says so
        assert other_seed.identity("train") != other.identity("train")


@pytest.mark.parametrize("kind", ["hf_datasets", "webdataset"])
def test_one_epoch_trains_like_the_image_folder(folder, saved, shards, kind, tmp_path):
    losses = {}
    for name in ("image_folder", kind):
        config = load_config_dict(
            {
                "seed": 2,
                "data": {"name": name, "options": _options(name, folder, saved, shards, shots=4)},
                "model": {"name": "small_resnet", "options": {"widths": [4, 8]}},
                "train": {"epochs": 1, "batch_size": 4, "progress": False},
                "out_dir": str(tmp_path / name),
            }
        )
        results = train_teacher(config)
        with (tmp_path / name / "steps.csv").open() as handle:
            losses[name] = [float(r["loss"]) for r in csv.DictReader(handle)]
        losses[name + " val"] = results["splits"]["val"]["accuracy"]
    assert len(losses["image_folder"]) == 3 and losses[kind] == losses["image_folder"]
    assert losses[kind + " val"] == losses["image_folder val"]


def test_hf_mistakes_are_one_line(saved, tmp_path):
    with pytest.raises(
        ConfigError, match=r"data.options: Value error, give exactly one of path, data_files, hub \(got none\)"
    ):
        load_config_dict({"data": {"name": "hf_datasets", "options": {}}})
    with pytest.raises(
        DataError, match=r"split 'train' has no column 'img' \(columns: image, label\); set image_column"
    ):
        open_dataset("hf_datasets", {"path": str(saved), "image_column": "img"}).check()
    with pytest.raises(DataError, match=r"data.options.path: .*nowhere: folder not found"):
        open_dataset("hf_datasets", {"path": str(tmp_path / "nowhere")}).check()
    with pytest.raises(DataError, match=r"data.options.train_split: no split 'training' \(known: train, val\)"):
        open_dataset("hf_datasets", {"path": str(saved), "train_split": "training"}).check()


def test_webdataset_mistakes_are_one_line(shards, tmp_path):
    base = {"class_names": CLASSES, "image_size": 16}
    with pytest.raises(DataError, match=r"streams; e2kd reads shards at random"):
        open_dataset("webdataset", {**base, "shards": {"train": "pipe:curl -s http://x/{0..1}.tar"}}).check()
    with pytest.raises(DataError, match=r"shards.train: .*train-002.tar: shard not found \(1 of 3 missing\)"):
        open_dataset("webdataset", {**base, "shards": {"train": str(shards / "train-{000..002}.tar")}}).check()
    with pytest.raises(DataError, match=r"no pattern for the training split 'train' \(given: val\)"):
        open_dataset("webdataset", {**base, "shards": {"val": str(shards / "val-000.tar")}}).check()
    two = open_dataset(
        "webdataset", {**base, "class_names": ["a", "b"], "shards": {"train": str(shards / "train-001.tar")}}
    )
    with pytest.raises(DataError, match=r"train-001.tar: sample '.*' has label 2, outside 0..1"):
        two.samples("train")
    (tmp_path / "bad.tar").write_bytes(b"not a tar at all" * 40)
    with pytest.raises(DataError, match=r"bad.tar: not a readable uncompressed WebDataset shard"):
        open_dataset("webdataset", {**base, "shards": {"train": str(tmp_path / "bad.tar")}}).samples("train")


@pytest.mark.parametrize("kind", ["hf_datasets", "webdataset"])
def test_the_contract_kit_passes(folder, saved, shards, kind):
    from e2kd import testing

    testing.check_dataset(open_dataset(kind, _options(kind, folder, saved, shards, holdout_per_class=1, shots=2)))


def test_the_per_class_draw_by_hand():
    import numpy as np

    from e2kd.data.subsets import per_class_draw

    labels = [0, 1, 0, 1, 0, 1, 1]  # class 0 at 0, 2, 4; class 1 at 1, 3, 5, 6
    held, train = per_class_draw(labels, ["a", "b"], shots=1, holdout=2, seed=9, where="w")
    order0, order1 = np.random.default_rng([9, 0]).permutation(3), np.random.default_rng([9, 1]).permutation(4)
    zero, one = [0, 2, 4], [1, 3, 5, 6]
    assert held == sorted(zero[i] for i in order0[:2]) + sorted(one[i] for i in order1[:2])
    assert train == [zero[order0[2]], one[order1[2]]]
    assert per_class_draw(labels, ["a", "b"], shots=None, holdout=0, seed=9, where="w") == ([], [0, 2, 4, 1, 3, 5, 6])
    assert per_class_draw([0, 1], ["a", "b"], shots=None, holdout=0, seed=0, where="w") == ([], [0, 1])  # one each
    with pytest.raises(DataError, match=r"^w/b: 3 images, fewer than holdout_per_class \+ shots = 4; lower"):
        per_class_draw([0, 1, 1, 1, 0, 0, 0], ["a", "b"], shots=2, holdout=2, seed=0, where="w")
    with pytest.raises(DataError, match=r"^w/c: 0 images, fewer than holdout_per_class \+ shots = 1"):
        per_class_draw(labels, ["a", "b", "c"], shots=None, holdout=0, seed=0, where="w")


def test_hf_images_of_any_mode_or_undecoded_read_like_image_files(tmp_path):
    from e2kd.data.files import read_image
    from e2kd_plugins.datasets.hf_datasets import _pixels

    g = torch.Generator().manual_seed(1)
    for mode, channels in (("L", 1), ("RGBA", 4), ("P", 1)):
        array = (torch.rand(9, 7, channels, generator=g) * 255).to(torch.uint8).numpy().squeeze()
        image = Image.fromarray(array, "L" if channels == 1 else "RGBA").convert(mode)
        path = tmp_path / f"{mode}.png"
        image.save(path)
        want = read_image(path)
        assert want.shape == (3, 9, 7)
        with Image.open(path) as opened:
            assert torch.equal(_pixels(opened), want)
        assert torch.equal(_pixels({"bytes": path.read_bytes(), "path": None}), want)
        assert torch.equal(_pixels({"bytes": None, "path": str(path)}), want)


def test_an_hf_label_column_without_names_needs_class_names(tmp_path):
    import datasets

    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    rows = datasets.Dataset.from_dict({"image": [{"bytes": _jpeg(0), "path": None}], "label": [1]}, features=features)
    rows.save_to_disk(str(tmp_path / "plain"))
    with pytest.raises(DataError, match=r"^data.options: column 'label' is not a ClassLabel; give class_names$"):
        open_dataset("hf_datasets", {"path": str(tmp_path / "plain")})
    named = open_dataset("hf_datasets", {"path": str(tmp_path / "plain"), "class_names": ["a", "b"]})
    assert named.class_names() == ["a", "b"] and named.splits() == ("train",)


def _tar(path: Path, members: dict[str, bytes], mode: str = "w") -> Path:
    import io
    import tarfile

    with tarfile.open(path, mode) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def _jpeg(seed: int, mode: str = "RGB", fmt: str = "JPEG") -> bytes:
    import io

    pixels = (torch.rand(10, 12, 3, generator=torch.Generator().manual_seed(seed)) * 255).to(torch.uint8).numpy()
    out = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(out, fmt)
    return out.getvalue()


def test_webdataset_keys_follow_the_first_dot_and_partial_samples_are_skipped(tmp_path):
    from e2kd.data.files import read_image

    shard = _tar(
        tmp_path / "s.tar",
        {
            "dir/": None,  # a directory entry
            "a/b/0001.left.png": _jpeg(1, "L", "PNG"),  # key a/b/0001, extension left.png (grayscale)
            "a/b/0001.cls": b"1",
            "a/b/0002.jpg": _jpeg(2),  # no label: not a sample
            "README": b"no extension",
            "a/b/0003.jpg": _jpeg(3),
            "a/b/0003.cls": b" 0\n",
            "v1.2/0004.jpg": _jpeg(4),  # a dot in a folder's name is not the key's end
            "v1.2/0004.cls": b"1",
        },
    )
    dataset = open_dataset(
        "webdataset", {"shards": {"train": str(shard)}, "class_names": ["x", "y"], "image_keys": ["left.png", "jpg"]}
    )
    samples = dataset.samples("train")
    assert len(samples) == 3 and [int(samples[i]["label"]) for i in range(3)] == [1, 0, 1]
    (tmp_path / "left.png").write_bytes(_jpeg(1, "L", "PNG"))
    assert torch.equal(samples[0]["image"], read_image(tmp_path / "left.png"))  # grayscale made RGB, as files are
    identity = dataset.identity("train")
    assert identity["split"] == "train" and identity["num_samples"] == 3
    with pytest.raises(DataError, match=r"^webdataset: no split 'val' \(known: train\)$"):
        dataset.samples("val")
    _tar(shard, {f"a/b/{k}.{e}": d for k in ("0009", "0010", "0011") for e, d in (("jpg", _jpeg(1)), ("cls", b"0"))})
    rewritten = open_dataset("webdataset", {"shards": {"train": str(shard)}, "class_names": ["x", "y"]})
    assert rewritten.identity("train")["samples_sha256"] != identity["samples_sha256"]  # same count, other samples
    with pytest.raises(DataError, match=r"s.tar: no samples with an image \(png\) and a .cls label$"):
        open_dataset(
            "webdataset", {"shards": {"train": str(shard)}, "class_names": ["x", "y"], "image_keys": ["png"]}
        ).samples("train")


def test_webdataset_refuses_compressed_shards_and_names_an_undecodable_image(tmp_path):
    members = {"k.jpg": _jpeg(1), "k.cls": b"0", "m.jpg": b"\xff\xd8 not really a jpeg", "m.cls": b"1"}
    gz = _tar(tmp_path / "s.tar.gz", members, "w:gz")
    with pytest.raises(DataError, match=r"s.tar.gz: not a readable uncompressed WebDataset shard \(ReadError: "):
        open_dataset("webdataset", {"shards": {"train": str(gz)}, "class_names": ["x", "y"]}).samples("train")
    plain = _tar(tmp_path / "s.tar", members)
    samples = open_dataset("webdataset", {"shards": {"train": str(plain)}, "class_names": ["x", "y"]}).samples("train")
    assert samples[0]["image"].shape == (3, 10, 12)
    with pytest.raises(
        DataError, match=rf"^{plain} \(offset \d+\): unreadable or truncated image \(UnidentifiedImageError: "
    ):
        samples[1]
