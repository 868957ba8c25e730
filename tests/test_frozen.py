import copy
import json

import pytest
import torch
import torchvision.transforms.v2.functional as TF

import e2kd
from e2kd import frozen
from e2kd.cli import main
from e2kd.data.augment import make_view
from e2kd.distill import Distiller
from e2kd.errors import CacheError, StaleCacheError
from e2kd.frozen import FrozenTeacherDataset, TeacherCache, build_cache, make_fingerprint
from e2kd.models import build_model
from e2kd_plugins.datasets.synthetic import SyntheticShapes

from .conftest import TINY

TEACHER_REF = {"name": "small_resnet", "options": {"widths": [8, 16]}}


@pytest.fixture
def setup(tmp_path):
    torch.manual_seed(0)
    teacher = build_model(TEACHER_REF["name"], TEACHER_REF["options"], 4).eval()
    data = SyntheticShapes(2, num_classes=4, image_size=16, bias=0.5, seed=1)
    explainer = e2kd.get_explainer("gradcam")
    return teacher, data, explainer


def _build(root, teacher, data, explainer, dtype="float32", shard_size=3, batch_size=8, **kw):
    fp = make_fingerprint(teacher, TEACHER_REF, explainer, data.identity(), dtype)
    build_cache(
        root,
        teacher,
        explainer,
        data.images,
        fp,
        dtype=dtype,
        shard_size=shard_size,
        batch_size=batch_size,
        progress=False,
        **kw,
    )
    return fp


def test_a_cache_built_at_bf16_holds_the_maps_of_the_live_bf16_teacher(tmp_path, setup):
    """The cache runs the teacher under the runtime's autocast, as a live distillation does: its
    float32-stored maps equal the live bf16 teacher's to float32 rounding, and differ from them by
    far more when the teacher runs in float32 (which the cache did before)."""
    from e2kd.explaining import explained_forward
    from e2kd.runtime import Runtime

    teacher, data, explainer = setup
    images = torch.stack([data.images[i] for i in range(len(data))])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        live_logits, live_maps, _ = explained_forward(teacher, images, explainer)
    live_logits, live_maps = live_logits.float(), live_maps[:, 0].float()
    cached = {}
    for precision in ("bf16", "fp32"):
        fp = _build(tmp_path / precision, teacher, data, explainer, runtime=Runtime(torch.device("cpu"), precision))
        cache = TeacherCache.open(tmp_path / precision, fp)
        cached[precision] = [torch.stack(t) for t in zip(*(cache[i] for i in range(len(data))))]
    scale = live_maps.abs().max()  # (an untrained teacher's maps are small: compare relative to it)
    torch.testing.assert_close(cached["bf16"][0], live_logits, rtol=1e-6, atol=1e-6)
    assert (cached["bf16"][1] - live_maps).abs().max() <= 1e-6 * scale
    assert (cached["fp32"][1] - live_maps).abs().max() > 1e-3 * scale


@pytest.mark.parametrize("lam, feature_resolution", [(0.0, True), (1.0, False), (1.0, True)])
def test_identity_augmentation_frozen_equals_live_exactly(tmp_path, setup, lam, feature_resolution):
    """Bit for bit when both compare upsampled maps; at feature resolution the live teacher's map
    stays 4 x 4 while the replayed one is stored at 16 x 16, so the same value is summed in
    another order: equal to float32 rounding."""
    teacher, data, explainer = setup
    fp = _build(tmp_path / "cache", teacher, data, explainer, batch_size=len(data))
    cache = TeacherCache.open(tmp_path / "cache", fp)
    batch = torch.utils.data.default_collate([FrozenTeacherDataset(data, cache)[i] for i in range(len(data))])
    student = build_model("small_resnet", {"widths": [4, 8]}, 4)
    students = [student, copy.deepcopy(student)]
    sim = e2kd.get_similarity("cosine")
    kw = dict(explainer=explainer, similarity=sim, lam=lam, feature_resolution=feature_resolution)
    live = Distiller(teacher, students[0], **kw)(batch["image"], batch["label"])
    replay = Distiller(None, students[1], **kw)(
        batch["image"], batch["label"], teacher_logits=batch["teacher_logits"], teacher_maps=batch["teacher_map"]
    )
    exact = lam == 0 or not feature_resolution
    same = torch.equal if exact else (lambda a, b: torch.allclose(a, b, rtol=1e-5, atol=1e-7))
    for key in ("loss", "kd", "explanation"):
        assert same(live[key], replay[key]), key
    assert lam == 0 or live["explanation"] > 1e-3
    g_live = torch.autograd.grad(live["loss"], list(students[0].parameters()))
    g_replay = torch.autograd.grad(replay["loss"], list(students[1].parameters()))
    assert all(same(a, b) for a, b in zip(g_live, g_replay))


def test_float16_cache_is_close_to_float32(tmp_path, setup):
    teacher, data, explainer = setup
    fp32 = _build(tmp_path / "a", teacher, data, explainer, dtype="float32")
    fp16 = _build(tmp_path / "b", teacher, data, explainer, dtype="float16")
    a, b = TeacherCache.open(tmp_path / "a", fp32), TeacherCache.open(tmp_path / "b", fp16)
    for i in range(len(data)):
        for x, y in zip(a[i], b[i]):
            torch.testing.assert_close(y, x, rtol=2e-3, atol=1e-4)
    assert (tmp_path / "b" / "shard-00000.maps.npy").stat().st_size < (
        tmp_path / "a" / "shard-00000.maps.npy"
    ).stat().st_size


def _item(size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(3, size, size, generator=g)
    ramp = torch.linspace(0, 1, size)
    teacher_map = (ramp[None, :, None] * ramp[None, None, :] ** 2) + 0.1 * image[:1]  # asymmetric in x and y
    mask = (image[:1] > 0.5).float()
    return {"image": image, "teacher_map": teacher_map, "mask": mask, "label": torch.tensor(0)}


@pytest.mark.parametrize("kind", ["flip", "flip_crop", "resized_crop_flip"])
def test_map_channel_goes_through_the_image_geometry(kind):
    """A map that is a function of the image stays that function after augmentation."""
    augment = make_view("train", 16, augment=kind)
    for seed in range(8):
        item = _item(seed=seed)
        item["teacher_map"] = 2 * item["image"][1:2] - item["image"][:1]
        torch.manual_seed(seed)
        out = augment(item)
        torch.testing.assert_close(out["teacher_map"], 2 * out["image"][1:2] - out["image"][:1], atol=1e-5, rtol=0)
        if kind != "resized_crop_flip":  # pure index operations: the mask moves pixel for pixel
            assert torch.equal(out["mask"], (out["image"][:1] > 0.5).float())


def test_flip_crop_of_stored_map_equals_same_op_on_the_explanation():
    """Recover the crop offset and flip from the image, apply them to the map directly, compare."""
    augment = make_view("train", 16, augment="flip_crop")
    pad = 2
    for seed in range(6):
        item = _item(seed=seed)
        torch.manual_seed(seed)
        out = augment(item)
        padded_img = TF.pad(item["image"], [pad], padding_mode="reflect")
        padded_map = TF.pad(item["teacher_map"], [pad], padding_mode="reflect")
        found = 0
        for top in range(2 * pad + 1):
            for left in range(2 * pad + 1):
                for flip in (False, True):
                    img = TF.crop(padded_img, top, left, 16, 16)
                    img = TF.horizontal_flip(img) if flip else img
                    if torch.equal(img, out["image"]):
                        found += 1
                        expected = TF.crop(padded_map, top, left, 16, 16)
                        expected = TF.horizontal_flip(expected) if flip else expected
                        assert torch.equal(out["teacher_map"], expected)
        assert found == 1


def test_photometric_augmentation_leaves_the_map_alone():
    item = _item()
    torch.manual_seed(3)
    geometric = make_view("train", 16, augment="flip_crop")(item)
    torch.manual_seed(3)
    jittered = make_view("train", 16, augment="flip_crop", color_jitter=0.4)(item)
    assert torch.equal(jittered["teacher_map"], geometric["teacher_map"])
    assert not torch.equal(jittered["image"], geometric["image"])


def test_low_resolution_map_is_resized_to_the_image(tmp_path, setup):
    teacher, data, _ = setup
    explainer = e2kd.get_explainer("gradcam", upsample=False)
    fp = _build(tmp_path / "c", teacher, data, explainer)
    cache = TeacherCache.open(tmp_path / "c", fp)
    assert cache[0][1].shape == (1, 8, 8)
    item = FrozenTeacherDataset(data, cache)[0]
    expected = torch.nn.functional.interpolate(cache[0][1][None], size=(16, 16), mode="bilinear", align_corners=False)[
        0
    ]
    torch.testing.assert_close(item["teacher_map"], expected)


def test_stale_cache_names_what_changed(tmp_path, setup):
    teacher, data, explainer = setup
    fp = _build(tmp_path / "c", teacher, data, explainer)
    other = copy.deepcopy(teacher)
    with torch.no_grad():
        other.fc.bias[0] += 1e-3
    cases = [
        (make_fingerprint(other, TEACHER_REF, explainer, data.identity(), "float32"), "teacher.weights"),
        (
            make_fingerprint(
                teacher, TEACHER_REF, e2kd.get_explainer("gradcam", relu=False), data.identity(), "float32"
            ),
            "explainer.options.relu (True in the cache, False now)",
        ),
        (
            make_fingerprint(teacher, TEACHER_REF, explainer, {**data.identity(), "seed": 2}, "float32"),
            "dataset.seed (1 in the cache, 2 now)",
        ),
        (make_fingerprint(teacher, TEACHER_REF, explainer, data.identity(), "float16"), "preprocessing.storage_dtype"),
        (
            make_fingerprint(teacher, TEACHER_REF, explainer, data.identity(), "float32", "bf16"),
            "preprocessing.precision ('fp32' in the cache, 'bf16' now)",
        ),
    ]
    for current, expected in cases:
        with pytest.raises(StaleCacheError, match="made for another setting") as info:
            TeacherCache.open(tmp_path / "c", current)
        assert expected in str(info.value) and "\n" not in str(info.value)
        assert str(info.value).startswith(f"{tmp_path / 'c'}: cache was made for another setting: ")
    with pytest.raises(StaleCacheError) as info:  # several changes: each named, separated by "; "
        TeacherCache.open(tmp_path / "c", make_fingerprint(other, TEACHER_REF, explainer, data.identity(), "float16"))
    assert "setting: preprocessing.storage_dtype" in str(info.value) and "; teacher.weights" in str(info.value)
    with pytest.raises(StaleCacheError, match=f"^{tmp_path / 'c'}: cache was made for another setting: teacher"):
        build_cache(
            tmp_path / "c",
            other,
            explainer,
            data.images,
            cases[0][0],
            dtype="float32",
            shard_size=3,
            batch_size=8,
            progress=False,
        )
    assert TeacherCache.open(tmp_path / "c", fp)  # the refused rebuild left the cache intact


def test_the_weights_digest_of_a_bfloat16_teacher():
    """bfloat16 has no numpy type: its values are digested as float32; any weight change shows."""
    from e2kd.frozen import weights_digest

    model = build_model(TEACHER_REF["name"], TEACHER_REF["options"], 4)
    half = copy.deepcopy(model).to(torch.bfloat16)
    digest = weights_digest(half)
    with torch.no_grad():
        next(half.parameters()).view(-1)[0] += 1.0
    assert weights_digest(half) != digest != weights_digest(model)


def test_corrupt_truncated_and_missing_caches_are_refused(tmp_path, setup):
    teacher, data, explainer = setup
    fp = _build(tmp_path / "c", teacher, data, explainer)
    maps = tmp_path / "c" / "shard-00001.maps.npy"
    original = maps.read_bytes()
    damaged = bytearray(original)
    damaged[-1] ^= 0xFF
    maps.write_bytes(bytes(damaged))
    with pytest.raises(CacheError, match="shard-00001.maps.npy is corrupt"):
        TeacherCache.open(tmp_path / "c", fp)
    maps.write_bytes(original[:-10])
    with pytest.raises(CacheError, match="truncated"):
        TeacherCache.open(tmp_path / "c", fp)
    maps.unlink()
    with pytest.raises(CacheError, match="missing"):
        TeacherCache.open(tmp_path / "c", fp)
    with pytest.raises(CacheError, match="no teacher cache"):
        TeacherCache.open(tmp_path / "nowhere", fp)
    (tmp_path / "c" / "index.json").write_text("{not json")
    with pytest.raises(CacheError, match="unreadable cache index"):
        TeacherCache.open(tmp_path / "c", fp)


def test_force_rebuilds_a_stale_cache_and_a_changed_layout_is_refused(tmp_path, setup):
    teacher, data, explainer = setup
    _build(tmp_path / "c", teacher, data, explainer)
    other = copy.deepcopy(teacher)
    with torch.no_grad():
        other.fc.bias[0] += 1.0
    fp_other = _build(tmp_path / "c", other, data, explainer, force=True)  # deletes the stale cache, then builds
    cache = TeacherCache.open(tmp_path / "c", fp_other)
    with torch.no_grad():
        expected = other(data.images[:3])
    torch.testing.assert_close(torch.stack([cache[i][0] for i in range(3)]), expected, rtol=1e-5, atol=1e-5)
    for layout in ({"shard_size": 4}, {"dtype": "float16"}):  # same fingerprint, another layout
        fp = make_fingerprint(other, TEACHER_REF, explainer, data.identity(), "float32")
        with pytest.raises(CacheError, match="cache layout differs"):
            build_cache(
                tmp_path / "c",
                other,
                explainer,
                data.images,
                fp,
                progress=False,
                batch_size=8,
                **{"dtype": "float32", "shard_size": 3, **layout},
            )
    with pytest.raises(IndexError):
        cache[len(cache)]
    with pytest.raises(IndexError):
        cache[-1]
    with pytest.raises(CacheError, match=f"cache holds {len(data)} samples, the dataset {len(data) - 1}"):
        FrozenTeacherDataset(torch.utils.data.Subset(data, range(len(data) - 1)), cache)


def test_two_processes_build_the_same_cache_as_one(tmp_path, setup, monkeypatch):
    """Two ranks (threads here, torch.distributed.barrier replaced by a thread barrier) each compute
    every second shard into their own part file; the main one merges them: the files are those of
    a single-process build (7 samples in shards of 2: 4 shards, the last of one sample)."""
    import threading

    from e2kd.runtime import Runtime

    teacher, data, explainer = setup
    images = data.images[:7]
    fp = make_fingerprint(teacher, TEACHER_REF, explainer, data.identity(), "float32")
    build_cache(
        tmp_path / "one", teacher, explainer, images, fp, dtype="float32", shard_size=2, batch_size=8, progress=False
    )
    barrier = threading.Barrier(2, timeout=60)
    monkeypatch.setattr(torch.distributed, "barrier", lambda: barrier.wait())
    errors = []

    def rank(r):
        try:
            build_cache(
                tmp_path / "a" / "b" / "two",
                copy.deepcopy(teacher),
                explainer,
                images,
                fp,
                dtype="float32",
                shard_size=2,
                batch_size=8,
                progress=False,
                runtime=Runtime(torch.device("cpu"), rank=r, world_size=2),
            )
        except BaseException as exc:  # noqa: BLE001 (reported below)
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=rank, args=(r,)) for r in (1, 0)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    one, two = tmp_path / "one", tmp_path / "a" / "b" / "two"
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())  # part files removed
    assert json.loads((two / "index.json").read_text()) == json.loads((one / "index.json").read_text())
    for path in one.glob("*.npy"):
        assert (two / path.name).read_bytes() == path.read_bytes(), path.name
    cache = TeacherCache.open(two, fp)
    assert len(cache) == 7 and torch.equal(cache[6][0], TeacherCache.open(one, fp)[6][0])


def test_part_files_of_an_unfinished_build_are_read_with_care(tmp_path, setup):
    """A readable part of this build counts; a damaged one or one of another setting does not."""
    teacher, data, explainer = setup
    fp = _build(tmp_path / "c", teacher, data, explainer)
    entries = json.loads((tmp_path / "c" / "index.json").read_text())["shards"]
    (tmp_path / "c" / "index.part-0.json").write_text(json.dumps({"fingerprint": fp, "shards": {"0": entries["0"]}}))
    (tmp_path / "c" / "index.part-1.json").write_text("{damaged")
    (tmp_path / "c" / "index.part-2.json").write_text(json.dumps({"fingerprint": {"other": 1}, "shards": {"1": {}}}))
    (tmp_path / "c" / "index.part-3.json").write_text(json.dumps({"fingerprint": fp, "shards": {"2": entries["2"]}}))
    (tmp_path / "c" / "index.part-4.json").write_text(json.dumps({"fingerprint": fp}))  # nothing done yet
    assert frozen._parts(tmp_path / "c", fp) == {"0": entries["0"], "2": entries["2"]}
    for broken in ("[1, 2]", '{"fingerprint": {}}', '{"shards": {}}'):
        (tmp_path / "c" / "index.json").write_text(broken)
        with pytest.raises(CacheError, match="unreadable cache index"):
            TeacherCache.open(tmp_path / "c", fp)


def test_a_dataset_is_cached_like_its_images_and_a_corrupt_shard_is_recomputed(tmp_path, setup):
    """Images from a dataset (read shard by shard through a DataLoader) give the files of the same
    images as one tensor; a shard damaged in place (same size) is found by its checksum and
    recomputed on the next build; float16 storage is float16 on disk."""
    import numpy as np

    teacher, data, explainer = setup
    images = data.images[:7]

    class Items(torch.utils.data.Dataset):
        def __len__(self):
            return len(images)

        def __getitem__(self, i):
            return {"image": images[i], "label": 0}

    fp = make_fingerprint(teacher, TEACHER_REF, explainer, data.identity(), "float16")
    for name, source in (("tensor", images), ("dataset", Items())):
        build_cache(
            tmp_path / name, teacher, explainer, source, fp, dtype="float16", shard_size=3, batch_size=2, progress=False
        )
    for path in (tmp_path / "tensor").glob("*.npy"):
        assert (tmp_path / "dataset" / path.name).read_bytes() == path.read_bytes(), path.name
        assert np.load(path).dtype == np.float16
    lengths = [len(np.load(tmp_path / "tensor" / f"shard-{s:05d}.logits.npy")) for s in range(3)]
    assert lengths == [3, 3, 1]  # 7 samples in shards of 3
    maps = tmp_path / "tensor" / "shard-00001.maps.npy"
    original = maps.read_bytes()
    damaged = bytearray(original)
    damaged[-2] ^= 0x10
    maps.write_bytes(bytes(damaged))
    build_cache(
        tmp_path / "tensor", teacher, explainer, images, fp, dtype="float16", shard_size=3, batch_size=2, progress=False
    )
    assert maps.read_bytes() == original
    # an index that says complete but lacks a shard is refused
    index = json.loads((tmp_path / "tensor" / "index.json").read_text())
    del index["shards"]["2"]
    (tmp_path / "tensor" / "index.json").write_text(json.dumps(index))
    with pytest.raises(CacheError, match=r"cache is incomplete \(2/3 shards\)"):
        TeacherCache.open(tmp_path / "tensor", fp)


def test_cache_items_through_the_dataset_transform_and_the_fingerprint_hash(tmp_path, setup):
    teacher, data, explainer = setup
    fp = _build(tmp_path / "c", teacher, data, explainer)
    cache = TeacherCache.open(tmp_path / "c", fp)
    with pytest.raises(IndexError, match=f"^{len(cache)}$"):
        cache[len(cache)]
    seen = FrozenTeacherDataset(data, cache, transform=lambda item: {**item, "seen": True})
    item = seen[3]
    assert item["seen"] and torch.equal(item["teacher_logits"], cache[3][0])
    # the hash of a fingerprint does not depend on the order its keys were written in
    reordered = dict(reversed(list(fp.items())))
    assert frozen.fingerprint_hash(reordered) == frozen.fingerprint_hash(fp) != frozen.fingerprint_hash({**fp, "x": 1})


def test_interrupted_precompute_resumes_to_the_same_cache(tmp_path, setup, monkeypatch):
    teacher, data, explainer = setup
    _build(tmp_path / "straight", teacher, data, explainer)
    calls = {"n": 0}
    real = frozen._save_npy

    def killed_in_third_shard(path, array):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(path, array)

    monkeypatch.setattr(frozen, "_save_npy", killed_in_third_shard)
    with pytest.raises(KeyboardInterrupt):
        _build(tmp_path / "resumed", teacher, data, explainer)
    index = json.loads((tmp_path / "resumed" / "index.json").read_text())
    assert sorted(index["shards"]) == ["0", "1"] and not index["complete"]
    with pytest.raises(CacheError, match="incomplete"):
        TeacherCache.open(tmp_path / "resumed")
    monkeypatch.setattr(frozen, "_save_npy", real)
    computed = []
    real_outputs = frozen.explained_forward
    monkeypatch.setattr(
        frozen, "explained_forward", lambda t, x, e: computed.append(x.shape[0]) or real_outputs(t, x, e)
    )
    _build(tmp_path / "resumed", teacher, data, explainer)
    assert sum(computed) == len(data) - 6  # only the missing shards were computed
    straight = sorted(p.name for p in (tmp_path / "straight").iterdir())
    assert straight == sorted(p.name for p in (tmp_path / "resumed").iterdir())
    for name in straight:
        assert (tmp_path / "straight" / name).read_bytes() == (tmp_path / "resumed" / name).read_bytes(), name


def test_cli_precompute_then_frozen_distill(tmp_path, capsys):
    import yaml

    teacher_cfg = tmp_path / "t.yaml"
    teacher_cfg.write_text(yaml.safe_dump({**TINY, "out_dir": str(tmp_path / "teacher")}))
    assert main(["train-teacher", str(teacher_cfg)]) == 0
    cfg = {
        **TINY,
        "teacher": {**TINY["model"], "checkpoint": str(tmp_path / "teacher" / "model.pt")},
        "distill": {"lam": 1.0, "teacher_mode": "frozen", "cache_dir": str(tmp_path / "cache")},
        "out_dir": str(tmp_path / "student"),
    }
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(cfg))
    capsys.readouterr()
    assert main(["precompute", str(path)]) == 0
    assert "18 samples" in capsys.readouterr().out
    assert main(["distill", str(path)]) == 0
    metrics = json.loads((tmp_path / "student" / "metrics.json").read_text())
    assert metrics["history"][-1]["explanation"] > 0
    assert set(metrics["splits"]["test_ood"]) == {"accuracy", "agreement", "explanation_similarity"}
    # a different explainer setting with the same cache_dir is refused before training
    assert (
        main(["distill", str(path), "--set", "distill.explainer.options.relu=false", "--out", str(tmp_path / "s2")])
        == 2
    )
    err = capsys.readouterr().err
    assert "explainer.options.relu" in err and "precompute --force" in err
    assert main(["precompute", str(path), "--set", "distill.explainer.options.relu=false", "--force"]) == 0
