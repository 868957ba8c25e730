"""The file datasets' one-line errors name the option to fix, and their readers' details by value:
VOC's difficult objects and boxes, the synthetic splits' sizes and backgrounds."""

from __future__ import annotations

import pytest
import torch

from e2kd.data.miniature import write_voc, write_waterbirds
from e2kd.data.voc_format import VOC_CLASSES
from e2kd.errors import DataError
from e2kd.registry import create


def _voc(root, **options):
    return create("dataset", "voc", {"root": str(root), "image_size": 16, **options})


def _write(root, objects_xml: dict[str, str] | None = None):
    base = write_voc(
        root,
        {
            "train": [
                {
                    "id": "a",
                    "width": 20,
                    "height": 16,
                    "objects": [("cat", (1, 1, 10, 8), True), ("dog", (3, 4, 20, 16), False)],
                },
                {"id": "b", "width": 12, "height": 12, "objects": [("bird", (2, 2, 12, 12), False)]},
            ],
            "val": [{"id": "c", "width": 12, "height": 12, "objects": [("cow", (1, 1, 4, 4), False)]}],
        },
    )
    for ident, xml in (objects_xml or {}).items():
        (base / "Annotations" / f"{ident}.xml").write_text(xml)
    return base


def test_voc_skips_difficult_objects_but_keeps_the_rest_of_the_image(tmp_path):
    _write(tmp_path)
    item = _voc(tmp_path).samples("train")[0]
    assert item["label"].tolist() == [float(c == "dog") for c in VOC_CLASSES]
    assert item["boxes"].dtype == torch.float32 and item["boxes"].tolist() == [[2.0, 3.0, 20.0, 16.0]]
    assert item["box_labels"].dtype == torch.int64 and item["box_labels"].tolist() == [VOC_CLASSES.index("dog")]
    both = _voc(tmp_path, difficult=True).samples("train")[0]
    assert both["box_labels"].tolist() == [VOC_CLASSES.index("cat"), VOC_CLASSES.index("dog")]
    assert both["boxes"].tolist() == [[0.0, 0.0, 10.0, 8.0], [2.0, 3.0, 20.0, 16.0]]  # 1-based inclusive -> edges


def test_voc_errors_name_the_file_and_the_option(tmp_path):
    with pytest.raises(DataError, match=r"^data.options.root: .*nowhere: folder not found$"):
        _voc(tmp_path / "nowhere").check()
    base = _write(tmp_path)
    (base / "JPEGImages").rename(base / "moved")
    with pytest.raises(DataError, match=r"^data.options.root: .*VOC2007/JPEGImages: folder not found$"):
        _voc(tmp_path).check()
    (base / "moved").rename(base / "JPEGImages")
    with pytest.raises(DataError, match=r"^data.options.image_set/eval_image_sets: .*Main/test.txt: file not found$"):
        _voc(tmp_path, image_set="train", eval_image_sets=["test"]).check()
    voc = _voc(tmp_path, image_set="train", eval_image_sets=["val"])
    with pytest.raises(DataError, match=r"^voc: no split 'trainval' \(known: train, val\)$"):
        voc.samples("trainval")
    (base / "ImageSets" / "Main" / "val.txt").unlink()
    with pytest.raises(DataError, match=r"^data.options.image_set/eval_image_sets: .*val.txt: file not found$"):
        _voc(tmp_path, image_set="train", eval_image_sets=["val"]).samples("val")


@pytest.mark.parametrize(
    "xml, message",
    [
        (None, r"a\.xml: annotation file not found$"),
        ("<annotation><object>", r"a\.xml: malformed XML \(no element found: line 1"),
        (
            "<annotation><object><name>unicorn</name></object></annotation>",
            r"a\.xml: unknown class 'unicorn' \(VOC classes: aeroplane, bicycle, bird, .*, train, tvmonitor\)$",
        ),
        ("<annotation><object><difficult>0</difficult></object></annotation>", r"a\.xml: unknown class ''"),
        (
            "<annotation><object><name>cat</name><bndbox><xmin>1</xmin></bndbox></object></annotation>",
            r"a\.xml: object 'cat' has no valid bndbox \(xmin, ymin, xmax, ymax\)$",
        ),
        ("<annotation><object><name>cat</name></object></annotation>", r"object 'cat' has no valid bndbox"),
    ],
    ids=["missing", "malformed", "unknown class", "no name", "half a box", "no box"],
)
def test_voc_annotation_errors_are_one_line_naming_the_file(tmp_path, xml, message):
    base = _write(tmp_path)
    if xml is None:
        (base / "Annotations" / "a.xml").unlink()
    else:
        (base / "Annotations" / "a.xml").write_text(xml)
    with pytest.raises(DataError, match=message) as caught:
        _voc(tmp_path, image_set="train", eval_image_sets=["val"]).samples("train")
    assert "\n" not in str(caught.value) and str(caught.value).startswith(str(base / "Annotations" / "a.xml"))


def test_voc_objects_without_a_difficult_tag_count_as_not_difficult(tmp_path):
    _write(
        tmp_path,
        {
            "b": "<annotation><object><name>bird</name><bndbox><xmin>2</xmin><ymin>2</ymin>"
            "<xmax>12</xmax><ymax>12</ymax></bndbox></object></annotation>"
        },
    )
    item = _voc(tmp_path, image_set="train", eval_image_sets=["val"]).samples("train")[1]
    assert item["box_labels"].tolist() == [VOC_CLASSES.index("bird")]


def test_waterbirds_root_errors_name_the_option(tmp_path):
    with pytest.raises(DataError, match=r"^data.options.root: .*nowhere: folder not found$"):
        create("dataset", "waterbirds", {"root": str(tmp_path / "nowhere"), "image_size": 16}).check()
    write_waterbirds(tmp_path, {"train": {(0, 0): 1}})
    waterbirds = create("dataset", "waterbirds", {"root": str(tmp_path), "image_size": 16})
    with pytest.raises(DataError, match=r"^waterbirds: no split 'holdout' \(known: train, val, test\)$"):
        waterbirds.samples("holdout")


def test_image_folder_labels_are_int64_class_indices(tmp_path):
    from e2kd.data.miniature import write_image_folder

    write_image_folder(tmp_path, ["b", "a"], {"train": 2, "val": 1}, size=16)
    samples = create("dataset", "image_folder", {"root": str(tmp_path), "image_size": 16}).samples("train")
    assert samples.labels.dtype == torch.int64 and samples.labels.tolist() == [0, 0, 1, 1]


def _synthetic(**options):
    return create(
        "dataset",
        "synthetic",
        {"num_classes": 3, "image_size": 16, "train_per_class": 4, "test_per_class": 2, **options},
    )


def test_synthetic_splits_have_their_sizes_streams_and_backgrounds():
    data = _synthetic(bias=1.0)
    train, test_id, test_ood = (data.samples(s) for s in ("train", "test_id", "test_ood"))
    assert (len(train), len(test_id), len(test_ood)) == (12, 6, 6)
    assert bool((train.groups == train.labels).all()) and bool((test_id.groups == test_id.labels).all())
    assert not bool((test_ood.groups == test_ood.labels).any())  # the biased set's out-of-distribution split
    assert data.identity("test_ood")["bias"] == 0.0 and data.identity("train")["bias"] == 1.0
    assert not torch.equal(train.images[:6], test_id.images)  # other streams, other samples
    assert data.identity("test_id") == {
        "kind": "synthetic_shapes",
        "generator_version": 1,
        "per_class": 2,
        "num_classes": 3,
        "image_size": 16,
        "bias": 1.0,
        "mismatched": False,
        "seed": 0,
        "stream": 1,
    }


def test_synthetic_items_go_through_their_transform():
    from e2kd_plugins.datasets.synthetic import SyntheticShapes

    shapes = SyntheticShapes(1, transform=lambda item: {**item, "image": item["image"] * 0})
    assert shapes[0]["image"].abs().sum() == 0 and shapes.images[0].abs().sum() > 0
    assert (len(shapes), shapes.image_size, shapes.bias, shapes.seed) == (4, 32, 0.0, 0)  # the defaults
    matched = sum(int(shapes[i]["group"]) == int(shapes[i]["label"]) for i in range(len(shapes)))
    assert shapes.matched_fraction == matched / len(shapes)
    assert SyntheticShapes(3, bias=1.0).matched_fraction == 1.0
