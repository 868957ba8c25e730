"""The decoded-image cache: the bytes it stores, its refusals (stale, corrupt, truncated, unfinished),
a killed build resuming to identical bytes, and training from it end to end."""

import csv
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from e2kd import hookimpl
from e2kd.cli import main
from e2kd.config import load_config_dict
from e2kd.data import open_dataset
from e2kd.data.decoded import (
    PIXELS,
    PROGRESS,
    DecodedCache,
    build_decoded,
    decoded_fingerprint,
    default_root,
    default_short_side,
)
from e2kd.data.files import read_image
from e2kd.data.miniature import write_image_folder, write_voc
from e2kd.errors import CacheError, ConfigError, StaleCacheError
from e2kd.experiment import distill, train_teacher

ROOT = Path(__file__).resolve().parent.parent
CLASSES = ["ant", "bee", "cat"]


@pytest.fixture
def folder(tmp_path):
    write_image_folder(tmp_path / "inet", CLASSES, {"train": 5, "val": 2}, size=(20, 44), seed=1)
    return tmp_path / "inet"


def _dataset(folder, **options):
    return open_dataset("image_folder", {"root": str(folder), "image_size": 16, **options})


def _build(root, dataset, short_side=18, **kwargs):
    fingerprint = decoded_fingerprint(dataset.identity("train"), short_side)
    build_decoded(root, dataset.samples("train"), fingerprint, short_side=short_side, progress=False, **kwargs)
    return fingerprint


def test_the_cache_holds_each_image_resized_as_torchvision_resizes_it(folder, tmp_path):
    dataset = _dataset(folder)
    fingerprint = _build(tmp_path / "c", dataset, chunk=4)
    cache = DecodedCache.open(tmp_path / "c", fingerprint)
    samples, raw = cache.samples(), dataset.samples("train")
    assert len(samples) == 15 and len(cache.index["chunks"]) == 4  # 4 + 4 + 4 + 3
    resize = v2.Resize(18, antialias=True)
    for i in range(15):
        expected = resize(read_image(raw.paths[i]))
        item = samples[i]
        assert item["image"].dtype == torch.uint8 and torch.equal(item["image"], expected), i
        assert int(item["label"]) == int(raw.labels[i]) and min(item["image"].shape[-2:]) == 18
        assert tuple(cache.sizes[i].tolist()) == tuple(expected.shape[-2:])
    assert {int(samples[i]["label"]) for i in range(15)} == {0, 1, 2}
    assert cache.index["fingerprint"]["short_side"] == 18
    assert cache.index["fingerprint"]["dataset"]["files_sha256"] == dataset.identity("train")["files_sha256"]
    assert (tmp_path / "c" / PIXELS).stat().st_size == sum(3 * h * w for h, w in cache.sizes.tolist())
    assert not (tmp_path / "c" / PROGRESS).exists() and not list((tmp_path / "c").glob("part-*"))


def test_a_cache_for_another_setting_is_refused_naming_the_difference(folder, tmp_path):
    _build(tmp_path / "c", _dataset(folder))
    with pytest.raises(StaleCacheError) as err:
        _build(tmp_path / "c", _dataset(folder), short_side=20)
    assert str(err.value) == (
        f"{tmp_path / 'c'}: decoded cache was made for another setting: short_side (18 in the cache, 20 now). "
        "Run `e2kd prepare CONFIG --force` to rebuild it, or set data.cache_dir elsewhere"
    )
    other = _dataset(folder, shots=2)
    with pytest.raises(StaleCacheError) as err:
        DecodedCache.open(tmp_path / "c", decoded_fingerprint(other.identity("train"), 18))
    assert str(err.value).startswith(f"{tmp_path / 'c'}: decoded cache was made for another setting: ")
    assert "now); dataset.options.shots (None in the cache, 2 now). Run" in str(err.value)  # every difference, "; "
    fingerprint = _build(tmp_path / "c", other, force=True)  # --force rebuilds it for the new setting
    assert len(DecodedCache.open(tmp_path / "c", fingerprint)) == 6


def test_a_damaged_cache_is_refused_in_one_line_and_rebuilt_by_force(folder, tmp_path):
    fingerprint = _build(tmp_path / "c", _dataset(folder), chunk=4)
    pixels = tmp_path / "c" / PIXELS
    good = pixels.read_bytes()
    data = bytearray(good)
    data[len(data) // 2] ^= 0xFF
    pixels.write_bytes(bytes(data))
    with pytest.raises(CacheError) as err:
        DecodedCache.open(tmp_path / "c", fingerprint)
    chunk = next(i for i, e in enumerate(_chunk_ends(tmp_path / "c")) if e > len(data) // 2)
    assert str(err.value) == (
        f"{pixels}: chunk {chunk} is corrupt (checksum mismatch); run `e2kd prepare CONFIG --force` to rebuild it"
    )
    pixels.write_bytes(good[:-5])
    with pytest.raises(CacheError, match=rf"truncated or resized \({len(good) - 5} bytes, expected {len(good)}\)"):
        DecodedCache.open(tmp_path / "c", fingerprint)
    _build(tmp_path / "c", _dataset(folder), force=True)
    assert pixels.read_bytes() == good
    (tmp_path / "c" / "samples.pt").write_bytes(b"junk")
    with pytest.raises(CacheError, match=r"samples.pt: missing or corrupt"):
        DecodedCache.open(tmp_path / "c", fingerprint)


def _chunk_ends(root):
    ends, total = [], 0
    for entry in json.loads((root / "index.json").read_text())["chunks"]:
        total += entry["bytes"]
        ends.append(total)
    return ends


class FailingAt(torch.utils.data.Dataset):
    """Samples that fail at ``fail_at`` (a kill in the middle of a build), counting the reads."""

    def __init__(self, samples, fail_at=None):
        self.samples, self.fail_at, self.reads = samples, fail_at, []

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        if i == self.fail_at:
            raise KeyboardInterrupt
        self.reads.append(i)
        return self.samples[i]


def test_a_killed_build_resumes_from_its_last_chunk_to_identical_bytes(folder, tmp_path):
    dataset = _dataset(folder)
    fingerprint = decoded_fingerprint(dataset.identity("train"), 18)
    build_decoded(tmp_path / "clean", dataset.samples("train"), fingerprint, short_side=18, progress=False, chunk=4)
    killed = FailingAt(dataset.samples("train"), fail_at=9)
    with pytest.raises(KeyboardInterrupt):
        build_decoded(tmp_path / "k", killed, fingerprint, short_side=18, progress=False, chunk=4)
    with pytest.raises(CacheError, match=r"an unfinished decoded cache here; run `e2kd prepare CONFIG` to build it"):
        DecodedCache.open(tmp_path / "k", fingerprint)
    assert json.loads((tmp_path / "k" / PROGRESS).read_text())["samples"] == 8
    with (tmp_path / "k" / PIXELS).open("ab") as handle:
        handle.write(b"half a chunk written when the kill came")
    resumed = FailingAt(dataset.samples("train"))
    build_decoded(tmp_path / "k", resumed, fingerprint, short_side=18, progress=False, chunk=4)
    assert resumed.reads == list(range(8, 15))  # the two whole chunks were not decoded again
    for name in (PIXELS, "samples.pt", "index.json"):
        assert (tmp_path / "k" / name).read_bytes() == (tmp_path / "clean" / name).read_bytes(), name
    killed.fail_at = 2
    other = decoded_fingerprint(dataset.identity("train"), 17)
    with pytest.raises(KeyboardInterrupt):
        build_decoded(tmp_path / "o", killed, fingerprint, short_side=18, progress=False, chunk=1)
    with pytest.raises(StaleCacheError) as err:  # an unfinished build of another setting is not mixed in
        build_decoded(tmp_path / "o", dataset.samples("train"), other, short_side=17, progress=False)
    assert str(err.value).startswith(
        f"{tmp_path / 'o'}: decoded cache was made for another setting: short_side (18 in the cache, 17 now)"
    )


def test_boxes_are_stored_scaled_with_their_image(tmp_path):
    objects = [("cat", (3, 5, 30, 20), 0), ("dog", (10, 2, 40, 25), 0)]
    train = [
        {"id": "a", "width": 48, "height": 32, "objects": objects},
        {"id": "c", "width": 30, "height": 30, "objects": objects[:1]},  # another number of boxes
    ]
    voc = write_voc(tmp_path, {"train": train, "val": [{"id": "b", "width": 20, "height": 20, "objects": objects[:1]}]})
    dataset = open_dataset("voc", {"root": str(voc), "image_size": 16})
    split = dataset.train_split
    fingerprint = decoded_fingerprint(dataset.identity(split), 16)
    build_decoded(tmp_path / "c", dataset.samples(split), fingerprint, short_side=16, progress=False)
    item = DecodedCache.open(tmp_path / "c", fingerprint).samples()[0]
    raw = dataset.samples(split)[0]
    expected = v2.Resize(16, antialias=True)({"image": raw["image"], "boxes": raw["boxes"]})
    assert item["image"].shape == (3, 16, 24) and tuple(item["boxes"].canvas_size) == (16, 24)
    assert item["boxes"].format == tv_tensors.BoundingBoxFormat.XYXY
    torch.testing.assert_close(item["boxes"].as_subclass(torch.Tensor), expected["boxes"].as_subclass(torch.Tensor))
    assert len(DecodedCache.open(tmp_path / "c", fingerprint).samples()[1]["boxes"]) == 1
    assert torch.equal(item["box_labels"], torch.as_tensor(raw["box_labels"]))
    assert torch.equal(item["label"], torch.as_tensor(raw["label"]))


def _config(folder, tmp_path, name, **data):
    return load_config_dict(
        {
            "data": {"name": "image_folder", "options": {"root": str(folder), "image_size": 16}, **data},
            "model": {"name": "small_resnet", "options": {"widths": [4, 8]}},
            "train": {"epochs": 2, "batch_size": 4, "progress": False, "color_jitter": 0.2},
            "out_dir": str(tmp_path / name),
        },
        source=f"{name}.yaml",
    )


def test_training_from_the_cache_builds_it_once_and_logs_its_data_wait(folder, tmp_path):
    config = _config(folder, tmp_path, "t", cache="decoded", cache_dir=str(tmp_path / "cache"))
    results = train_teacher(config)
    built = sorted((tmp_path / "cache").iterdir())  # the training split's cache and the evaluated split's
    assert [p.name.split("-")[2] for p in built] == ["train", "val"] and all(
        (p / "index.json").is_file() for p in built
    )
    assert 0 <= results["splits"]["val"]["accuracy"] <= 1
    steps = list(csv.DictReader((tmp_path / "t" / "steps.csv").open()))
    epochs = list(csv.DictReader((tmp_path / "t" / "epochs.csv").open()))
    assert len(steps) == 6 and all(float(r["data_wait_s"]) >= 0 for r in steps)
    assert all(0 < float(r["data_wait_share"]) < 1 for r in epochs)
    before = [(p / "index.json").stat().st_mtime_ns for p in built]
    train_teacher(config, rerun=True)
    assert [(p / "index.json").stat().st_mtime_ns for p in built] == before  # reused, not rebuilt
    plain = train_teacher(_config(folder, tmp_path, "p"))
    assert plain["history"] != results["history"]  # another view (the test tells the paths apart)


def test_prepare_writes_a_cache_per_split_and_names_them(folder, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("E2KD_CACHE_DIR", str(tmp_path / "home"))
    path = tmp_path / "p.yaml"
    path.write_text(json.dumps({"data": {"name": "image_folder", "options": {"root": str(folder), "image_size": 16}}}))
    assert main(["prepare", str(path)]) == 0
    dataset = _dataset(folder)
    lines = []
    for split, count in (("train", 15), ("val", 6)):
        root = default_root(decoded_fingerprint(dataset.identity(split), default_short_side(16)))
        assert root.parent == tmp_path / "home" and root.name.startswith(f"decoded-image_folder-{split}-")
        cache = DecodedCache.open(root)
        gib = cache.index["bytes"] / 2**30
        assert len(cache) == count
        lines.append(f"decoded cache of {split}: {root} ({count} images, short side 18 px, {gib:.2f} GiB)")
    lines.append("set data.cache: decoded to train and evaluate from them")
    assert capsys.readouterr().out == "\n".join(lines) + "\n"
    assert default_root(decoded_fingerprint({}, 8), tmp_path / "x").parent == tmp_path / "x"  # data.cache_dir


def test_evaluation_from_the_cache_equals_evaluation_from_the_files(folder, tmp_path):
    """The eval view of a cached image (stored at the eval resize) is the JPEG's, pixel for pixel: the
    same model gets the same metrics either way, and the evaluation split's cache is built on first use."""
    from e2kd.evaluate import evaluate_model
    from e2kd.experiment import _eval_samples
    from e2kd.plan import plan_run
    from e2kd.runtime import Runtime

    cached = _config(folder, tmp_path, "a", cache="decoded", cache_dir=str(tmp_path / "caches"))
    plain = _config(folder, tmp_path, "b")
    torch.manual_seed(0)
    model = __import__("e2kd").get_model_builder("small_resnet", widths=[4, 8]).build(3).eval()
    cpu = Runtime(torch.device("cpu"))
    plan = plan_run(cached, "evaluate")
    with_cache = evaluate_model(plan, model, None, runtime=cpu, samples_of=_eval_samples(plan, cpu))
    without = evaluate_model(plan_run(plain, "evaluate"), model, None, runtime=cpu)
    assert _eval_samples(plan_run(plain, "evaluate"), cpu) is None
    assert with_cache == without and 0 <= with_cache["splits"]["val"]["accuracy"] <= 1
    assert [p.name.split("-")[2] for p in sorted((tmp_path / "caches").iterdir())] == ["val"]
    samples = _eval_samples(plan, cpu)("val")
    raw = _dataset(folder).samples("val")
    view = __import__("e2kd.data", fromlist=["split_view"]).split_view
    a = view(plan.dataset, "val", "eval", samples=samples)[3]["image"]
    b = view(plan.dataset, "val", "eval", samples=raw)[3]["image"]
    assert torch.equal(a, b)


def test_prepare_refuses_a_dataset_stored_at_the_training_size(tmp_path, capsys):
    path = tmp_path / "s.yaml"
    path.write_text("data: {name: synthetic}\n")
    assert main(["prepare", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"e2kd: error: {path}: data.name: dataset 'synthetic' stores its images at the training size already, "
        "there is nothing to decode; prepare is for datasets of image files"
    ]
    with pytest.raises(ConfigError, match="data.cache: .* nothing to decode; use data.cache: none"):
        train_teacher(load_config_dict({"data": {"name": "synthetic", "cache": "decoded"}}))


def test_a_frozen_teacher_replays_onto_the_device_crops(folder, tmp_path):
    teacher = _config(folder, tmp_path, "teacher")
    train_teacher(teacher)
    config = load_config_dict(
        {
            **_config(folder, tmp_path, "s").model_dump(mode="json"),
            "data": {"name": "image_folder", "options": {"root": str(folder), "image_size": 16}, "cache": "decoded"},
            "teacher": {
                "name": "small_resnet",
                "options": {"widths": [4, 8]},
                "checkpoint": str(tmp_path / "teacher" / "model.pt"),
            },
            "distill": {"teacher_mode": "frozen"},
            "out_dir": str(tmp_path / "s"),
        }
    )
    results = distill(config)
    assert all(h["explanation"] > 0 for h in results["history"]) and results["splits"]["val"]["agreement"] >= 0


def test_a_third_party_dataset_trains_from_the_cache_unchanged(tmp_path, monkeypatch, fresh_registry):
    """The example plugin's ``csv_images`` dataset (written before the cache existed) trains with
    ``data.cache: decoded``."""
    path = ROOT / "examples" / "third_party_plugin" / "e2kd_attention_transfer" / "csv_images.py"
    spec = importlib.util.spec_from_file_location("example_csv_images", path)  # its file as it is
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # (pydantic resolves its annotations there)
    spec.loader.exec_module(module)
    CsvImages = module.CsvImages

    class Plugin:
        @hookimpl
        def register_datasets(self, register):
            register(CsvImages)

    fresh_registry.register_plugin(Plugin(), name="csv_only")
    manifest = write_image_folder(tmp_path / "img", CLASSES, {"train": 3, "test": 2}, size=(20, 30), seed=2)
    (tmp_path / "img" / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    for split, rows in manifest.items():
        lines = ["path,label"] + [f"{p.relative_to(tmp_path / 'img')},{CLASSES[y]}" for p, y in rows]
        (tmp_path / "img" / f"{split}.csv").write_text("\n".join(lines) + "\n")
    config = load_config_dict(
        {
            "data": {
                "name": "csv_images",
                "options": {"root": str(tmp_path / "img"), "image_size": 16},
                "cache": "decoded",
            },
            "model": {"name": "small_resnet", "options": {"widths": [4, 8]}},
            "train": {"epochs": 1, "batch_size": 3, "progress": False},
            "out_dir": str(tmp_path / "run"),
        }
    )
    results = train_teacher(config)
    assert set(results["splits"]) == {"test"} and len(results["history"]) == 1


# -- decoding on the training device (data.decode: device) ------------------------------------------------------------


def _encoded_folder(folder):
    """The folder's training files as bytes, one of them re-saved as a PNG (not a JPEG) first."""
    from PIL import Image

    dataset = _dataset(folder)
    files = dataset.samples("train")
    png = files.paths[4].with_suffix(".png")
    Image.open(files.paths[4]).convert("L").save(png)  # a grayscale PNG: decoded as RGB all the same
    files.paths[4].unlink()
    files.paths[4] = png
    Image.open(files.paths[9]).convert("L").save(files.paths[9], quality=90)  # a grayscale JPEG
    return files


def test_files_decoded_on_the_device_give_the_view_of_the_decoded_images(folder):
    """The device view of file bytes (decoded per batch: JPEGs in one call, the PNG file by file) equals
    the device view of the same images decoded first, draw for draw; the bytes are the files'."""
    from torchvision.io import ImageReadMode, decode_image

    from e2kd.data.batch_views import DeviceView, decode_images
    from e2kd.data.files import EncodedFiles

    files = _encoded_folder(folder)
    encoded = EncodedFiles(files)
    assert bytes(encoded[2]["image"].numpy()) == files.paths[2].read_bytes() and encoded[2]["label"] == files.labels[2]
    rgb = ImageReadMode.RGB
    decoded = [
        {"image": decode_image(encoded[i]["image"], mode=rgb), "label": files.labels[i]} for i in range(len(files))
    ]
    assert torch.equal(decoded[4]["image"], read_image(files.paths[4]))  # (PNG: lossless, as PIL reads it)
    gray = decode_images([encoded[9]["image"]], torch.device("cpu"))[0]
    assert gray.shape[0] == 3 and torch.equal(gray[0], gray[1]) and torch.equal(gray, decoded[9]["image"])
    common = {"kind": "resized_crop_flip", "image_size": 12, "color_jitter": 0.2, "seed": 7}
    on_device = DeviceView(encoded, encoded=True, **common)
    first = DeviceView(decoded, **common)
    draws = on_device.draws(1)
    indices = [4, 0, 9, 2]
    a = on_device.finish(on_device.collate(indices, draws, canvas=False))
    b = first.finish(first.collate(indices, draws, canvas=False))
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    alone = on_device.finish(on_device.collate([9], draws, canvas=False))  # one sample: the grayscale JPEG
    assert torch.equal(alone["image"][0], b["image"][2])
    blobs = [encoded[i]["image"] for i in indices]
    assert all(torch.equal(x, decoded[i]["image"]) for x, i in zip(decode_images(blobs, torch.device("cpu")), indices))


def test_a_file_nothing_decodes_is_one_line_naming_it(folder):
    from e2kd.data.batch_views import DeviceView
    from e2kd.data.files import EncodedFiles
    from e2kd.errors import DataError

    files = _dataset(folder).samples("train")
    files.paths[3].write_bytes(files.paths[3].read_bytes()[:40])
    view = DeviceView(EncodedFiles(files), encoded=True, kind="flip", image_size=12)
    with pytest.raises(DataError) as err:
        view.finish(view.collate([1, 3], view.draws(0), canvas=False))
    assert str(err.value).startswith(f"{files.paths[3]}: unreadable or truncated image (RuntimeError: ")
    assert str(err.value).endswith("; replace or remove it, or set data.options.skip_unreadable: true")
    assert "\n" not in str(err.value)
    from e2kd.data.batch_views import decode_images

    with pytest.raises(DataError, match=r"^image 1 of the batch: unreadable or truncated image"):  # (no names given)
        decode_images([EncodedFiles(files)[0]["image"], torch.zeros(10, dtype=torch.uint8)], torch.device("cpu"))


def test_training_with_device_decoding_and_its_refusals(folder, tmp_path):
    config = _config(folder, tmp_path, "t", decode="device")
    results = train_teacher(config)
    assert len(results["history"]) == 2 and 0 <= results["splits"]["val"]["accuracy"] <= 1
    assert len(list(csv.DictReader((tmp_path / "t" / "steps.csv").open()))) == 6
    with pytest.raises(ConfigError) as err:
        _config(folder, tmp_path, "x", decode="device", cache="decoded")
    assert "data.decode: device decodes files per batch, data.cache: decoded never decodes; pick one" in str(err.value)
    objects = [("cat", (3, 5, 30, 20), 0)]
    image = {"width": 40, "height": 30, "objects": objects}
    voc = write_voc(tmp_path / "voc", {"train": [{"id": "a", **image}], "val": [{"id": "b", **image}]})
    boxes = load_config_dict(
        {"data": {"name": "voc", "options": {"root": str(voc), "image_size": 16}, "decode": "device"}},
        source="v.yaml",
    )
    with pytest.raises(ConfigError) as err:
        train_teacher(boxes)
    assert str(err.value) == (
        "v.yaml: data.decode: device decodes image files, and dataset 'voc' does not read its samples from files "
        "one to one (e2kd.data.files.ImageFiles); use data.decode: cpu"
    )
    with pytest.raises(ConfigError, match=r"data.decode: dataset 'synthetic' .* use data.decode: cpu"):
        train_teacher(load_config_dict({"data": {"name": "synthetic", "decode": "device"}}))


class WithMasks(torch.utils.data.Dataset):
    """Float images (a dataset may give [0, 1] floats) of varying sizes with two-channel masks and a group."""

    def __init__(self):
        g = torch.Generator().manual_seed(3)
        self.items = []
        for i, (h, w) in enumerate([(20, 30), (36, 24), (18, 18)]):
            mask = torch.zeros(2, h, w, dtype=torch.uint8)
            mask[0, : h // 2], mask[1, :, w // 3 :] = 1, 1
            mask = mask.float() if i == 1 else mask  # (the API's masks are float; uint8 ones are kept too)
            image = torch.rand(3, h, w, generator=g)
            self.items.append(
                {"image": image, "mask": mask, "label": torch.tensor(i % 2), "group": torch.tensor(7 - i)}
            )

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def test_float_images_and_masks_are_stored_resized_with_their_image(tmp_path):
    """Float images are stored as round(255·x); masks (K channels) follow their image (nearest), stored
    after it in the same file, and read back at the stored size; other fields as they were."""
    samples = WithMasks()
    fingerprint = decoded_fingerprint({"dataset": "masks", "split": "train"}, 12)
    build_decoded(tmp_path / "c", samples, fingerprint, short_side=12, progress=False, chunk=2)
    cache = DecodedCache.open(tmp_path / "c", fingerprint)
    resize = v2.Resize(12, antialias=True)
    total = 0
    for i, raw in enumerate(samples.items):
        pixels = raw["image"].mul(255).round().to(torch.uint8)
        moved = resize({"image": tv_tensors.Image(pixels), "mask": tv_tensors.Mask(raw["mask"])})
        item = cache.samples()[i]
        assert torch.equal(item["image"], moved["image"].as_subclass(torch.Tensor)), i
        mask = moved["mask"].as_subclass(torch.Tensor).round().to(torch.uint8)
        assert item["mask"].dtype == torch.uint8 and torch.equal(item["mask"], mask) and item["mask"].shape[0] == 2
        assert 0 < item["mask"].float().mean() < 1
        assert int(item["group"]) == 7 - i and int(item["label"]) == i % 2 and "boxes" not in item
        total += 5 * item["image"].shape[-2] * item["image"].shape[-1]  # 3 colours + 2 mask channels
    assert (tmp_path / "c" / PIXELS).stat().st_size == total == cache.index["bytes"]
    with pytest.raises(IndexError):
        cache.samples()[3]


def test_the_default_folder_and_every_refusal_of_a_cache_in_one_line(folder, tmp_path, monkeypatch):
    fingerprint = decoded_fingerprint({"dataset": "image_folder", "split": "train", "x": 1}, 256)
    digest = __import__("hashlib").sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:12]
    monkeypatch.delenv("E2KD_CACHE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_root(fingerprint) == tmp_path / "home" / ".cache" / "e2kd" / f"decoded-image_folder-train-{digest}"
    monkeypatch.setenv("E2KD_CACHE_DIR", "~/elsewhere")
    assert default_root(fingerprint).parent == tmp_path / "home" / "elsewhere"
    assert default_root(decoded_fingerprint({}, 8)).name.startswith("decoded-data-split-")
    assert fingerprint == {
        "format": 1,
        "dataset": {"dataset": "image_folder", "split": "train", "x": 1},
        "short_side": 256,
        "resize": "torchvision v2.Resize(short_side, antialias=True) of uint8 RGB; masks nearest; boxes scaled",
    }
    root = tmp_path / "c"
    with pytest.raises(CacheError) as err:
        DecodedCache.open(root)
    assert str(err.value) == f"{root}: no decoded cache here; run `e2kd prepare CONFIG` to build it"
    fingerprint = _build(root, _dataset(folder))
    (root / PIXELS).unlink()
    with pytest.raises(CacheError) as err:
        DecodedCache.open(root, fingerprint)
    assert str(err.value) == (
        f"{root / PIXELS}: truncated or resized (missing); run `e2kd prepare CONFIG --force` to rebuild it"
    )
    (root / "index.json").write_text("{not json")
    with pytest.raises(CacheError) as err:
        DecodedCache.open(root, fingerprint)
    assert str(err.value) == (
        f"{root / 'index.json'}: unreadable; run `e2kd prepare CONFIG --force` to rebuild the decoded cache"
    )
    (root / "index.json").write_text('{"format": 1}')  # valid JSON, not an index
    with pytest.raises(CacheError, match="index.json: unreadable"):
        DecodedCache.open(root, fingerprint)
    empty = decoded_fingerprint({"dataset": "none"}, 8)
    build_decoded(tmp_path / "e", WithMasks().items[:0], empty, short_side=8, progress=False)
    assert len(DecodedCache.open(tmp_path / "e", empty)) == 0  # an empty split is a cache too
    one = decoded_fingerprint({"dataset": "one"}, 8)
    build_decoded(tmp_path / "o", WithMasks().items[:1], one, short_side=8, progress=False)
    (alone,) = DecodedCache.open(tmp_path / "o", one).samples()  # and a split of one sample
    assert int(alone["group"]) == 7 and int(alone["label"]) == 0 and alone["image"].shape == (3, 8, 12)


def test_only_the_main_process_hashes_the_cache_the_others_check_its_sizes(folder, tmp_path, monkeypatch):
    """Under torchrun every process opens the cache the main one built: the main process hashes every
    chunk, the others (process 1 of 2 here, its barriers stubbed) hash nothing but still refuse a
    truncated cache in one line."""
    from e2kd import experiment
    from e2kd.data import decoded as decoded_module
    from e2kd.plan import plan_run
    from e2kd.runtime import Runtime

    plan = plan_run(_config(folder, tmp_path, "m", cache="decoded", cache_dir=str(tmp_path / "cache")), "prepare")
    main, other = Runtime(torch.device("cpu")), Runtime(torch.device("cpu"), rank=1, world_size=2)
    monkeypatch.setattr(Runtime, "barrier", lambda self: None)
    experiment.prepare_decoded(plan, runtime=main)  # built
    hashed = []
    sha256 = decoded_module._sha256
    monkeypatch.setattr(decoded_module, "_sha256", lambda *args: hashed.append(args[1]) or sha256(*args))
    verified = experiment.prepare_decoded(plan, runtime=main)
    starts = [0]
    for chunk in verified.index["chunks"][:-1]:
        starts.append(starts[-1] + chunk["bytes"])
    assert hashed == starts and len(starts) >= 1
    hashed.clear()
    opened = experiment.prepare_decoded(plan, runtime=other)
    assert hashed == [] and torch.equal(opened.sizes, verified.sizes) and len(opened) == len(verified) > 0
    pixels = verified.root / PIXELS
    pixels.write_bytes(pixels.read_bytes()[:-1])
    with pytest.raises(CacheError, match="truncated or resized"):
        experiment.prepare_decoded(plan, runtime=other)
