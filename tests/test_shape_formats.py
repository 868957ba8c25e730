"""Shape images in the real on-disk formats, read back through the dataset plugins and checked
against what was written: labels, groups, object masks and boxes."""

import torch

import e2kd
from e2kd.data import split_view
from e2kd.data.shape_formats import write_shapes_folder, write_shapes_voc, write_shapes_waterbirds
from e2kd.data.shapes import SHAPES


def _object_contrast(image: torch.Tensor, mask) -> tuple[float, float]:
    """Mean brightness on the object and off it: objects are drawn in colours >= 0.65, textures <= 0.6."""
    mask = torch.as_tensor(mask, dtype=torch.bool)
    gray = image.mean(0)
    return gray[mask].mean().item(), gray[~mask].mean().item()


def test_folder_of_shapes_reads_back_with_its_labels_and_objects(tmp_path):
    manifest = write_shapes_folder(tmp_path, {"train": 3, "val": 2}, num_classes=3, size=32, bias=1.0, seed=0)
    data = e2kd.get_dataset("image_folder", root=str(tmp_path), image_size=32)
    assert data.class_names() == sorted(SHAPES[:3])
    train = split_view(data, "train", "eval")
    assert len(train) == 9
    by_path = {str(e["path"]): e for e in manifest["train"]}
    samples = data.samples("train")
    for i in range(len(train)):
        entry = by_path[str(samples.paths[i])]
        item = train[i]
        assert int(item["label"]) == entry["label"]
        assert SHAPES.index(data.class_names()[entry["label"]]) == entry["background"]  # bias 1: the class's own
        on, off = _object_contrast(item["image"], entry["mask"])
        assert on > 0.6 > off


def test_waterbirds_of_shapes_have_their_groups_and_objects(tmp_path):
    counts = {"train": {(0, 0): 3, (1, 1): 3, (0, 1): 1}, "val": {(1, 0): 1, (0, 0): 1}, "test": {(0, 1): 2, (1, 0): 2}}
    rows = write_shapes_waterbirds(tmp_path, counts, size=32, seed=1)
    data = e2kd.get_dataset("waterbirds", root=str(tmp_path), image_size=32)
    for split, code in (("train", 0), ("val", 1), ("test", 2)):
        written = [r for r in rows if r["split"] == code]
        view = split_view(data, split, "whole")
        assert len(view) == len(written)
        got = sorted(
            (int(view[i]["label"]), int(view[i]["group"]), bool(view[i]["in_distribution"])) for i in range(len(view))
        )
        assert got == sorted((r["y"], 2 * r["y"] + r["place"], r["y"] == r["place"]) for r in written)
    first = split_view(data, "train", "whole")[0]
    on, off = _object_contrast(first["image"], rows[0]["mask"])
    assert on > 0.6 > off


def test_voc_of_shapes_has_multi_hot_labels_and_boxes_around_the_objects(tmp_path):
    manifest = write_shapes_voc(tmp_path, {"trainval": 6, "test": 3}, num_classes=4, size=64, max_objects=2, seed=2)
    data = e2kd.get_dataset("voc", root=str(tmp_path), image_size=64, image_set="trainval", eval_image_sets=["test"])
    view = split_view(data, "trainval", "whole")
    assert len(view) == 6 and any(len(e["objects"]) == 2 for e in manifest["trainval"])
    for i, entry in enumerate(manifest["trainval"]):
        item = view[i]
        present = sorted(c for c, _, _ in entry["objects"])
        assert torch.nonzero(item["label"]).flatten().tolist() == present
        for c, (x1, y1, x2, y2), mask in entry["objects"]:
            box = item["mask"][c].bool()
            obj = torch.as_tensor(mask, dtype=torch.bool)
            assert (box & obj).sum() == obj.sum()  # the box covers the whole object
            assert box.sum() == (x2 - x1 + 1) * (y2 - y1 + 1)  # and is exactly its bounding box
            on, off = _object_contrast(item["image"], mask)
            assert on > 0.6
