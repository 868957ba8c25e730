"""The paper's claims as miniatures: each claim's measures, the paper's numbers, its shape data in
the paper's on-disk formats and its teacher and student configs per seed, and the paper's full-size
setting where a real copy of its data can be given."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..data.shape_formats import write_shapes_folder, write_shapes_voc, write_shapes_waterbirds


@dataclass(frozen=True)
class Measure:
    """One quantity of a claim: where it is read in a run's metrics, and the paper's KD / e2KD values."""

    label: str
    split: str
    metric: str
    key: str | None = None  # a key inside a metric that returns several values
    paper: str = ""  # the paper's KD -> e2KD, as printed in the report
    towards_teacher: bool = False  # the value is -|student - teacher|: closer to the teacher is higher

    def read(self, results: dict[str, Any], teacher: dict[str, Any] | None = None) -> float:
        """The value in a student's results; with ``towards_teacher``, minus its distance to the same
        value in the ``teacher``'s results."""
        value = self.value_in(results)
        if self.towards_teacher:
            if teacher is None:
                raise ValueError(f"{self.label}: needs the teacher's results")
            return -abs(value - self.value_in(teacher))
        return value

    def value_in(self, results: dict[str, Any]) -> float:
        """The measured quantity in ``results`` (a run's metrics)."""
        value = results["splits"][self.split][self.metric]
        if self.key == "mean_shift":  # the curve's mean over the non-zero shifts
            shifted = [v for k, v in value.items() if k != "shift_0"]
            return statistics.fmean(shifted)
        return float(value[self.key] if self.key else value)


@dataclass(frozen=True)
class PaperSetting:
    """A claim at full size: the packaged paper config of its students, run on a real copy of ``dataset``."""

    dataset: str  # imagenet | waterbirds | voc: the folder option that switches it on
    config: str  # the students' config in e2kd/configs
    teacher: str  # what the teacher checkpoint is, for the message when it is missing
    teacher_config: str | None = None  # trains the teacher on the same folder when no checkpoint is given


@dataclass(frozen=True)
class Claim:
    key: str
    title: str
    measures: tuple[Measure, ...]
    variants: tuple[str, ...]  # student variants; the first is the baseline (KD), each other is compared with it
    build: Callable[
        [Path, float, int], dict[str, dict[str, Any]]
    ]  # (root, scale, seed) -> {"teacher": ..., variant: ...}
    write_data: Callable[[Path, float], None]
    paper: PaperSetting | None = None
    shares: str | None = None  # the claim whose folder (teacher, KD runs) this one reuses

    @property
    def root(self) -> str:
        return self.shares or self.key


#: The data line of a claim run on the built-in shape images.
MINIATURE = "shape images (miniature)"

#: The distill settings of each student variant (over the claim's config).
VARIANTS = {"KD": {"lam": 0.0}, "e2KD": {"lam": 1.0}, "e2KD frozen": {"lam": 1.0, "teacher_mode": "frozen"}}


def _epochs(scale: float, full: int) -> int:
    return max(1, round(full * scale))


CNN_TEACHER = {"name": "small_resnet", "options": {"widths": [16, 32, 64]}}
CNN_STUDENT = {"name": "small_resnet", "options": {"widths": [8, 16, 32]}}


#: Training of every miniature run: flips only (a random resized crop of a 32 px image loses the shape).
TRAIN = {"batch_size": 16, "lr": 3e-3, "progress": False, "augment": "flip"}


def _teacher(root: Path, data: dict, model: dict, scale: float, metrics: list, extra: dict | None = None) -> dict:
    return {
        "seed": 0,
        "data": data,
        "model": model,
        "out_dir": str(root / "teacher"),
        "train": {**TRAIN, "epochs": _epochs(scale, 30), "batch_size": 32, **(extra or {})},
        "eval": {"metrics": metrics},
    }


def _student(
    root: Path,
    name: str,
    seed: int,
    data: dict,
    teacher: dict,
    model: dict,
    scale: float,
    metrics: list,
    distill_options: dict,
    epochs: int = 40,
) -> dict:
    return {
        "seed": seed,
        "data": {**data, "seed": seed},
        "model": model,
        "teacher": {**teacher["model"], "checkpoint": str(root / "teacher" / "model.pt")},
        "distill": distill_options,
        "out_dir": str(root / f"{name.lower().replace(' ', '_')}_seed{seed}"),
        "train": {**TRAIN, "epochs": _epochs(scale, epochs)},
        "eval": {"metrics": metrics},
    }


GRADCAM = {"explainer": "gradcam", "similarity": "cosine"}


# -- 1 and 5: few data (ImageNet folder layout), live and frozen --------------------------------


def _few_data_data(root: Path, scale: float) -> None:
    per = max(8, round(60 * scale))
    write_shapes_folder(root / "data", {"train": per, "val": max(8, round(40 * scale))}, num_classes=4, size=32, seed=0)


#: Faithfulness of the few-data students (the claim ``faithfulness``): deletion and insertion of
#: 4-px patches of the 32-px images, 16 steps.
FAITHFULNESS_METRICS = [
    {"name": "deletion", "options": {"patch_size": 4, "steps": 16}},
    {"name": "insertion", "options": {"patch_size": 4, "steps": 16}},
]


def _few_data(root: Path, scale: float, seed: int) -> dict[str, dict]:
    data = {"name": "image_folder", "options": {"root": str(root / "data"), "image_size": 32}}
    teacher = _teacher(root, data, CNN_TEACHER, scale, ["accuracy"])
    few = {**data, "options": {**data["options"], "shots": 6}}
    metrics = ["accuracy", "agreement", *FAITHFULNESS_METRICS]
    return {
        "teacher": teacher,
        **{
            name: _student(
                root, name, seed, few, teacher, CNN_STUDENT, scale, metrics, {**GRADCAM, **VARIANTS[name]}, epochs=120
            )  # 24 images: 2 steps an epoch
            for name in ("KD", "e2KD", "e2KD frozen")
        },
    }


FEW_DATA = [
    Measure("accuracy", "val", "accuracy", paper="49.8 -> 54.9 (ImageNet, 50 shots, R34 -> R18)"),
    Measure("agreement", "val", "agreement", paper="55.5 -> 61.7"),
]


FAITHFULNESS = [
    Measure(
        "deletion AUC: −|student − teacher|",
        "val",
        "deletion",
        "auc",
        paper="not in the paper: does a student that copies the maps keep the teacher's faithfulness?",
        towards_teacher=True,
    ),
    Measure("insertion AUC: −|student − teacher|", "val", "insertion", "auc", paper="", towards_teacher=True),
]


# -- 2: a spurious background (Waterbirds layout) ------------------------------------------------


def _spurious_data(root: Path, scale: float) -> None:
    n = max(6, round(40 * scale))
    balanced = {g: n for g in ((0, 0), (0, 1), (1, 0), (1, 1))}
    write_shapes_waterbirds(
        root / "teacher_data",
        {"train": balanced, "val": {g: 2 for g in balanced}, "test": {g: 2 for g in balanced}},
        size=32,
        seed=0,
    )
    biased = {(0, 0): 16, (1, 1): 16, (0, 1): 1, (1, 0): 1}  # few images, 94 % of them in distribution
    write_shapes_waterbirds(
        root / "data",
        {"train": biased, "val": {g: max(4, n // 2) for g in balanced}, "test": {g: n for g in balanced}},
        size=32,
        seed=1,
    )


def _spurious(root: Path, scale: float, seed: int) -> dict[str, dict]:
    metrics = ["accuracy", "group_accuracy"]
    teacher = _teacher(
        root,
        {"name": "waterbirds", "options": {"root": str(root / "teacher_data"), "image_size": 32}},
        CNN_TEACHER,
        scale,
        metrics,
    )
    data = {"name": "waterbirds", "options": {"root": str(root / "data"), "image_size": 32}}
    return {
        "teacher": teacher,
        **{
            name: _student(root, name, seed, data, teacher, CNN_STUDENT, scale, metrics, {**GRADCAM, "lam": lam})
            for name, lam in (("KD", 0.0), ("e2KD", 1.0))
        },
    }


SPURIOUS = [
    Measure(
        "out-of-distribution accuracy",
        "test",
        "group_accuracy",
        "out_of_distribution",
        paper="31.1 -> 36.8 (Waterbirds-100, R50 -> R18, 700 epochs)",
    )
]


# -- 3: interpretability of a guided teacher (VOC layout) ---------------------------------------


def _voc_data(root: Path, scale: float) -> None:
    write_shapes_voc(
        root / "data",
        {"trainval": max(16, round(160 * scale)), "test": max(12, round(60 * scale))},
        num_classes=4,
        size=48,
        max_objects=2,
        seed=0,
    )


def _voc(root: Path, scale: float, seed: int) -> dict[str, dict]:
    data = {
        "name": "voc",
        "options": {"root": str(root / "data"), "image_size": 48, "image_set": "trainval", "eval_image_sets": ["test"]},
    }
    metrics = ["micro_f1", "epg"]
    teacher = _teacher(
        root,
        data,
        CNN_TEACHER,
        scale,
        metrics,
        {"guidance": {"loss": "energy", "weight": 0.05, "explainer": "gradcam"}},
    )
    return {
        "teacher": teacher,
        **{
            name: _student(root, name, seed, data, teacher, CNN_STUDENT, scale, metrics, {**GRADCAM, "lam": lam})
            for name, lam in (("KD", 0.0), ("e2KD", 1.0))
        },
    }


VOC = [
    Measure("EPG", "test", "epg", paper="60.1 -> 71.1 (VOC, EPG-guided B-cos R50 -> R18)"),
    Measure("micro-F1", "test", "micro_f1", paper="60.1 -> 67.6"),
]


# -- 4: CNN -> ViT, shift equivariance of explanations ------------------------------------------


def _vit_data(root: Path, scale: float) -> None:
    write_shapes_folder(root / "data", {"train": max(8, round(40 * scale)), "val": 8}, num_classes=3, size=32, seed=2)


def _vit(root: Path, scale: float, seed: int) -> dict[str, dict]:
    data = {"name": "image_folder", "options": {"root": str(root / "data"), "image_size": 32}}
    metrics = ["accuracy", {"name": "shift_equivariance", "options": {"max_shift": 8}}]
    teacher = _teacher(root, data, {"name": "bcos_small", "options": {"widths": [16, 32]}}, scale, metrics)
    vit = {
        "name": "bcos_vit_tiny",
        "options": {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2},
    }
    return {
        "teacher": teacher,
        **{
            name: _student(
                root,
                name,
                seed,
                data,
                teacher,
                vit,
                scale,
                metrics,
                {"explainer": "bcos", "similarity": "cosine", "lam": lam},
            )
            for name, lam in (("KD", 0.0), ("e2KD", 1.0))
        },
    }


VIT = [
    Measure(
        "shift equivariance (mean over 1-8 px)",
        "val",
        "shift_equivariance",
        "mean_shift",
        paper="a ViT student's explanations become shift-equivariant like its CNN teacher's (figure)",
    )
]


# -- beyond the paper: a 100 % spurious background ---------------------------------------------

BIAS100_VARIANTS = {  # name -> (Grad-CAM relu, explained classes)
    "e2KD positive top-1": (True, "top1"),
    "e2KD signed top-1": (False, "top1"),
    "e2KD positive all classes": (True, "all"),
    "e2KD signed all classes": (False, "all"),
}


def _bias100(root: Path, scale: float, seed: int) -> dict[str, dict]:
    test = {"num_classes": 4, "image_size": 32, "test_per_class": max(8, round(50 * scale))}
    teacher = _teacher(
        root,
        {"name": "synthetic", "options": {**test, "train_per_class": max(16, round(120 * scale)), "bias": 0.0}},
        CNN_TEACHER,
        scale,
        ["accuracy"],
    )
    data = {"name": "synthetic", "options": {**test, "train_per_class": 16, "bias": 1.0}}
    metrics = ["accuracy", "agreement"]
    configs = {
        "teacher": teacher,
        "KD": _student(root, "KD", seed, data, teacher, CNN_STUDENT, scale, metrics, {**GRADCAM, "lam": 0.0}),
    }
    for name, (relu, classes) in BIAS100_VARIANTS.items():
        configs[name] = _student(
            root,
            name,
            seed,
            data,
            teacher,
            CNN_STUDENT,
            scale,
            metrics,
            {
                "explainer": {"name": "gradcam", "options": {"relu": relu}},
                "similarity": "cosine",
                "lam": 1.0,
                "explain_classes": classes,
            },
        )
    return configs


BIAS100 = [
    Measure(
        "out-of-distribution accuracy",
        "test_ood",
        "accuracy",
        paper="not in the paper: every training background gives the class away",
    )
]


def _bias100_bcos(root: Path, scale: float, seed: int) -> dict[str, dict]:
    """The same data with B-cos networks, KD against e2KD on the input-level B-cos explanation."""
    configs = _bias100(root, scale, seed)
    teacher = {**configs["teacher"], "model": {"name": "bcos_small", "options": {"widths": [16, 32, 64]}}}
    student = {"name": "bcos_small", "options": {"widths": [8, 16, 32]}}
    data, metrics = configs["KD"]["data"], configs["KD"]["eval"]["metrics"]
    return {
        "teacher": teacher,
        **{
            name: _student(
                root,
                name,
                seed,
                {k: v for k, v in data.items() if k != "seed"},
                teacher,
                student,
                scale,
                metrics,
                {"explainer": "bcos", "similarity": "cosine", "lam": lam},
            )
            for name, lam in (("B-cos KD", 0.0), ("e2KD B-cos", 1.0))
        },
    }


IMAGENET_R34 = PaperSetting(
    "imagenet", "imagenet_50shot_r34_r18", "a timm/torchvision ResNet-34 with 1000 classes, e.g. resnet34-b627a593.pth"
)

CLAIMS = (
    Claim(
        "few_data",
        "With few data, e2KD students are more accurate and agree more with the teacher",
        tuple(FEW_DATA),
        ("KD", "e2KD"),
        _few_data,
        _few_data_data,
        IMAGENET_R34,
    ),
    Claim(
        "spurious",
        "Right for the right reasons under a spurious background",
        tuple(SPURIOUS),
        ("KD", "e2KD"),
        _spurious,
        _spurious_data,
        PaperSetting("waterbirds", "waterbirds100_r50_r18", "a ResNet-50 trained on unbiased Waterbirds"),
    ),
    Claim(
        "voc",
        "Students of a guided teacher keep its interpretability",
        tuple(VOC),
        ("KD", "e2KD"),
        _voc,
        _voc_data,
        PaperSetting(
            "voc", "voc_bcos_r50_r18", "an EPG-guided B-cos ResNet-50", teacher_config="voc_guided_teacher_bcos_r50"
        ),
    ),
    Claim(
        "cnn_to_vit",
        "A ViT student learns its CNN teacher's shift equivariance",
        tuple(VIT),
        ("KD", "e2KD"),
        _vit,
        _vit_data,
        PaperSetting("imagenet", "imagenet_bcos_densenet169_vit_tiny", "the B-cos-v2 densenet169 release file"),
    ),
    Claim(
        "frozen",
        "It works with explanations computed once (frozen teacher)",
        (
            Measure("accuracy", "val", "accuracy", paper="33.4 -> 38.7 (B-cos DN169 -> R18, frozen)"),
            Measure("agreement", "val", "agreement", paper="35.7 -> 41.7"),
        ),
        ("KD", "e2KD frozen"),
        _few_data,
        _few_data_data,
        IMAGENET_R34,
        shares="few_data",
    ),
    Claim(
        "faithfulness",
        "Beyond the paper: e2KD students keep the teacher's faithfulness (deletion / insertion AUC closer to its)",
        tuple(FAITHFULNESS),
        ("KD", "e2KD"),
        _few_data,
        _few_data_data,
        shares="few_data",
    ),
    Claim(
        "bias100",
        "Beyond the paper: a 100 % spurious background",
        tuple(BIAS100),
        ("KD", *BIAS100_VARIANTS),
        _bias100,
        lambda root, scale: (root / "data").mkdir(parents=True, exist_ok=True),
    ),
    Claim(
        "bias100_bcos",
        "Beyond the paper: a 100 % spurious background, B-cos networks",
        tuple(BIAS100),
        ("B-cos KD", "e2KD B-cos"),
        _bias100_bcos,
        lambda root, scale: (root / "data").mkdir(parents=True, exist_ok=True),
    ),
)
