"""The paper's example configs, each run end to end on a generated miniature tree of its data format.

Every command goes through: train-teacher (the config's teacher architecture), distill (live;
frozen too for ImageNet), precompute, evaluate, sweep, and the notebook API. Images are shrunk
to 32 px and training to one epoch; the code path is the full-size one.
"""

import json
from pathlib import Path

import pytest
import yaml

import e2kd
from e2kd.cli import main
from e2kd.data.miniature import write_image_folder, write_voc, write_waterbirds

from .test_datasets import VOC_IMAGES

CONFIGS = Path(__file__).resolve().parent.parent / "e2kd" / "configs"
SMALL = [
    "--set",
    "data.options.image_size=32",
    "--set",
    "train.epochs=1",
    "--set",
    "train.batch_size=4",
    "--set",
    "train.warmup_epochs=0",
]


def _tree(kind: str, root: Path) -> list[str]:
    """Write the miniature tree; returns the --set overrides that point the config at it."""
    if kind == "imagenet":
        write_image_folder(root, ["n01", "n02", "n03"], {"train": 5, "val": 2}, seed=0)
        return [
            "--set",
            f"data.options.root={root}",
            "--set",
            "data.options.shots=3",
            "--set",
            "data.options.holdout_per_class=1",
            "--set",
            "data.num_workers=2",
        ]
    if kind == "waterbirds":
        write_waterbirds(
            root,
            {
                "train": {(0, 0): 4, (1, 1): 4},
                "val": {(0, 1): 1, (1, 0): 1, (0, 0): 1, (1, 1): 1},
                "test": {(0, 1): 2, (1, 0): 2, (0, 0): 1, (1, 1): 1},
            },
            seed=1,
        )
        return ["--set", f"data.options.root={root}", "--set", "data.num_workers=0"]
    write_voc(root, {"trainval": VOC_IMAGES["train"], "test": VOC_IMAGES["val"]})
    return ["--set", f"data.options.root={root}", "--set", "data.num_workers=0"]


def _teacher_config(example: Path, tmp: Path) -> Path:
    """The example with its teacher architecture as the model, trained on the labels."""
    data = yaml.safe_load(example.read_text())
    teacher = data.pop("teacher")
    data["model"] = {k: v for k, v in teacher.items() if k != "checkpoint"}
    data["eval"] = {"metrics": ["micro_f1" if data["data"]["name"] == "voc" else "accuracy"]}
    path = tmp / "teacher.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.slow
@pytest.mark.parametrize(
    "kind, example",
    [
        ("imagenet", "imagenet_50shot_r34_r18.yaml"),
        ("waterbirds", "waterbirds100_r50_r18.yaml"),
        ("voc", "voc_bcos_r50_r18.yaml"),
    ],
)
def test_example_config_runs_every_command(kind, example, tmp_path, capsys):
    data = _tree(kind, tmp_path / "data")
    config = CONFIGS / example
    teacher_dir = tmp_path / "teacher"
    assert (
        main(["train-teacher", str(_teacher_config(config, tmp_path)), *SMALL, *data, "--out", str(teacher_dir)]) == 0
    )
    student = [str(config), *SMALL, *data, "--set", f"teacher.checkpoint={teacher_dir / 'model.pt'}"]
    assert main(["distill", *student, "--out", str(tmp_path / "e2kd")]) == 0
    metrics = json.loads((tmp_path / "e2kd" / "metrics.json").read_text())
    assert metrics["history"][0]["explanation"] > 0
    expected_splits = {"imagenet": {"val"}, "waterbirds": {"val", "test"}, "voc": {"test"}}[kind]
    assert set(metrics["splits"]) == expected_splits
    last = metrics["splits"][sorted(expected_splits)[0]]
    if kind == "waterbirds":
        groups = last["group_accuracy"]
        assert {"worst_group", "in_distribution", "out_of_distribution"} <= set(groups)
        assert {"y0_g0", "y0_g1", "y1_g2", "y1_g3"} <= set(groups)  # group = 2 y + place
    if kind == "voc":
        assert {"micro_f1", "epg", "explanation_iou", "agreement", "explanation_similarity"} <= set(last)
        assert metrics["skipped"] == {}
    if kind == "imagenet":
        frozen = [*student, "--set", "distill.teacher_mode=frozen"]
        assert main(["precompute", *frozen]) == 0
        assert "teacher cache:" in capsys.readouterr().out
        assert main(["distill", *frozen, "--out", str(tmp_path / "frozen")]) == 0
        assert (tmp_path / "frozen" / "model.pt").is_file()
    if kind == "waterbirds":
        assert main(["sweep", *student, "--grid", "distill.lam=0,1", "--out", str(tmp_path / "sweep")]) == 0
        assert (tmp_path / "sweep" / "sweep.csv").read_text().count("done") == 2
    if kind == "voc":
        assert main(["distill", *student, "--set", "distill.teacher_mode=frozen", "--out", str(tmp_path / "f")]) == 2
        assert "frozen caches the teacher's top-1 map" in capsys.readouterr().err
        assert not (tmp_path / "f").exists()

    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "e2kd"), "--out", str(tmp_path / "report")]) == 0
    assert (tmp_path / "report" / "explanations.png").is_file() and (tmp_path / "report" / "report.md").is_file()

    run = e2kd.load_run(tmp_path / "e2kd")
    assert (
        run.class_names == run.dataset.class_names()
        and len(run.class_names) == {"imagenet": 3, "waterbirds": 2, "voc": 20}[kind]
    )
    images, labels = e2kd.sample_images(run.split(sorted(expected_splits)[0]), n=2)
    maps = {"teacher": e2kd.explain(run.teacher, images, run.config.distill.explainer.name)}
    figure = e2kd.show(images, maps, labels=labels, class_names=run.class_names)
    assert images.shape[-1] == 32 and figure.axes


@pytest.mark.slow
def test_guided_voc_teacher_config_trains_through_the_boxes(tmp_path):
    """The VOC guided-teacher example on a miniature VOC tree: boxes become per-class masks through
    the training geometry and the energy term of every present class is trained."""
    data = _tree("voc", tmp_path / "data")
    config = CONFIGS / "voc_guided_teacher_bcos_r50.yaml"
    assert main(["train-teacher", str(config), *SMALL, *data, "--out", str(tmp_path / "teacher")]) == 0
    steps = (tmp_path / "teacher" / "steps.csv").read_text().splitlines()
    header, first = steps[0].split(","), steps[1].split(",")
    guidance = float(first[header.index("guidance")])
    assert 0 < guidance < 1  # an energy loss: a share of attribution outside the boxes
    metrics = json.loads((tmp_path / "teacher" / "metrics.json").read_text())
    assert {"micro_f1", "epg", "explanation_iou"} <= set(metrics["splits"]["test"])


@pytest.mark.slow
def test_cnn_to_vit_config_draws_the_shift_equivariance_curves(tmp_path):
    """B-cos DenseNet-169 (bcos-v2 layout) -> B-cos ViT on a miniature ImageNet tree: KD and e2KD
    students, then the report's shift-equivariance curves of teacher, KD and e2KD."""
    data = _tree("imagenet", tmp_path / "data")
    config = CONFIGS / "imagenet_bcos_densenet169_vit_tiny.yaml"
    assert (
        main(
            ["train-teacher", str(_teacher_config(config, tmp_path)), *SMALL, *data, "--out", str(tmp_path / "teacher")]
        )
        == 0
    )
    vit = ["--set", "model.options={img_size: 32, patch_size: 8, embed_dim: 24, depth: 2, num_heads: 2}"]
    student = [
        str(config),
        *SMALL,
        *data,
        *vit,
        "--set",
        f"teacher.checkpoint={tmp_path / 'teacher' / 'model.pt'}",
        "--set",
        "eval.metrics=[accuracy, {name: shift_equivariance, options: {max_shift: 16, step: 4}}]",
        "--set",
        "distill.explain_every=1",
    ]
    for name, lam in (("kd", 0), ("e2kd", 1)):
        assert main(["distill", *student, "--set", f"distill.lam={lam}", "--out", str(tmp_path / name)]) == 0
    assert json.loads((tmp_path / "e2kd" / "metrics.json").read_text())["history"][0]["explanation"] > 0
    assert (
        main(
            [
                "evaluate",
                str(tmp_path / "teacher"),
                str(tmp_path / "kd"),
                str(tmp_path / "e2kd"),
                "--metrics",
                "shift_equivariance",
                "--out",
                str(tmp_path / "report"),
            ]
        )
        == 0
    )
    assert (tmp_path / "report" / "shift.png").is_file()
    for run in ("teacher", "kd", "e2kd"):  # --metrics re-evaluates with the metric's default options (0..8 px)
        curve = json.loads((tmp_path / run / "metrics.json").read_text())["splits"]["val"]["shift_equivariance"]
        assert set(curve) == {f"shift_{t}" for t in range(9)} and all(abs(v) <= 1 + 1e-6 for v in curve.values()), run
