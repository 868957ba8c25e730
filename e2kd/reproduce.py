"""``e2kd reproduce``: a miniature of each of the paper's claims, run and judged from its numbers.

Each claim is an experiment on shape images written in the on-disk format of the paper's data
(:mod:`e2kd.data.shape_formats`, read by the same dataset plugins as a real copy): a teacher, then
students distilled from it with KD and with e2KD for every seed, evaluated on held-out images.
For every measured quantity the report gives the paper's number, the mean ± std over seeds, the
paired difference e2KD − KD per seed, and a verdict computed by :func:`verdict` — never written by
hand. ``quick`` shrinks data and epochs (a smoke run: its verdicts are computed the same way but
say little).

Given a real copy of a dataset (:class:`RealData`), the claims on it run at full size instead: the
students are the paper's settings shipped in ``e2kd/configs`` (:class:`PaperSetting`) pointed at the
folder, distilled from the user's teacher checkpoint, and judged by the same rule.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import ExperimentConfig, load_config_dict, read_config_file
from .data.shape_formats import write_shapes_folder, write_shapes_voc, write_shapes_waterbirds
from .errors import ConfigError
from .experiment import distill, train_teacher
from .storage import atomic_write_json, atomic_write_text

#: How a verdict is reached from the paired differences e2KD − KD (one per seed).
RULE = (
    "holds here: the mean paired difference is positive, larger than its standard error, and at least two "
    "thirds of the seeds are positive; does not hold here: otherwise"
)


def verdict(differences: Sequence[float]) -> str:
    """``holds here`` when the mean of the paired differences is > 0 and above its standard error
    (sd / √n; not required of a single seed), and at least 2/3 of the differences are > 0."""
    if not differences:
        raise ValueError("no paired differences")
    n, mean = len(differences), statistics.fmean(differences)
    error = statistics.stdev(differences) / n**0.5 if n > 1 else 0.0
    positive = sum(d > 0 for d in differences)
    return "holds here" if mean > 0 and mean > error and 3 * positive >= 2 * n else "does not hold here"


@dataclass(frozen=True)
class Measure:
    """One quantity of a claim: where it is read in a run's metrics, and the paper's KD / e2KD values."""

    label: str
    split: str
    metric: str
    key: str | None = None  # a key inside a metric that returns several values
    paper: str = ""  # the paper's KD -> e2KD, as printed in the report

    def read(self, results: dict[str, Any]) -> float:
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


@dataclass(frozen=True)
class RealData:
    """Real dataset folders (``{"imagenet": path, ...}``), teacher checkpoints by claim folder
    (``{"few_data": path}``), and ``--set`` overrides applied to every full-size run."""

    folders: dict[str, Path]
    teachers: dict[str, Path]
    overrides: tuple[str, ...] = ()


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


def _few_data(root: Path, scale: float, seed: int) -> dict[str, dict]:
    data = {"name": "image_folder", "options": {"root": str(root / "data"), "image_size": 32}}
    teacher = _teacher(root, data, CNN_TEACHER, scale, ["accuracy"])
    few = {**data, "options": {**data["options"], "shots": 6}}
    metrics = ["accuracy", "agreement"]
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


def miniature_configs(
    claim: Claim, root: Path, seeds: Sequence[int], scale: float
) -> dict[int, dict[str, ExperimentConfig]]:
    """Write the claim's shape data (once) and validate its teacher and student configs per seed."""
    if not (root / "data").exists():
        claim.write_data(root, scale)
    return {
        seed: {
            name: load_config_dict(data, source=f"reproduce {claim.key} {name}")
            for name, data in claim.build(root, scale, seed).items()
        }
        for seed in seeds
    }


def paper_configs(
    claim: Claim, root: Path, seeds: Sequence[int], real: RealData
) -> dict[int, dict[str, ExperimentConfig]]:
    """The claim's paper settings on the real folder: per seed a student config per variant (and,
    without a teacher checkpoint, the teacher's training config); nothing runs here."""
    setting = claim.paper
    folder, teacher_file, overrides = real.folders[setting.dataset], real.teachers.get(claim.root), list(real.overrides)

    def config(name: str, where: Path, edit: Callable[[dict], None]) -> ExperimentConfig:
        data = read_config_file(name)
        data["data"]["options"]["root"] = str(folder)
        data["out_dir"] = str(where)
        edit(data)
        return load_config_dict(data, source=f"{name} ({claim.key} on {folder})", overrides=overrides)

    teacher = None
    if teacher_file is None:
        if setting.teacher_config is None:
            raise ConfigError(
                f"{claim.key} on --{setting.dataset} {folder} needs its teacher: --teacher "
                f"{claim.root}=FILE ({setting.teacher})"
            )
        teacher = config(setting.teacher_config, root / "teacher", lambda data: None)
        teacher_file = root / "teacher" / "model.pt"

    def student(variant: str, seed: int) -> Callable[[dict], None]:
        def edit(data: dict) -> None:
            data["seed"] = seed  # the data subset keeps the config's data.seed: every seed sees the same images
            data["teacher"]["checkpoint"] = str(teacher_file)
            data["distill"].update(VARIANTS[variant])

        return edit

    return {
        seed: {
            **({"teacher": teacher} if teacher else {}),
            **{
                v: config(setting.config, root / f"{v.lower().replace(' ', '_')}_seed{seed}", student(v, seed))
                for v in claim.variants
            },
        }
        for seed in seeds
    }


def check_teacher_files(planned: list[tuple[Claim, dict[int, dict[str, ExperimentConfig]]]], real: RealData) -> None:
    """Load every given teacher checkpoint into its architecture before anything trains: a file that
    does not fit fails now, with the checkpoint loader's one-line message."""
    from .data import dataset_of
    from .models import load_teacher

    checked = set()
    for claim, configs in planned:
        if claim.paper is None or claim.root not in real.teachers or claim.root in checked:
            continue
        student = next(c for name, c in next(iter(configs.values())).items() if name != "teacher")
        load_teacher(student, dataset_of(student))
        checked.add(claim.root)


def run_claim(
    claim: Claim, configs: dict[int, dict[str, ExperimentConfig]], log: Callable[[str], None], data: str = MINIATURE
) -> dict[str, Any]:
    """Teacher and students of one claim (``configs`` per seed); the paired rows of the report."""
    seeds = list(configs)
    teacher_config = configs[seeds[0]].get("teacher")
    teacher = train_teacher(teacher_config) if teacher_config is not None else {}
    values: dict[str, list[list[float]]] = {}
    curves: dict[str, list[dict[str, float]]] = {}  # shift-equivariance curves, for the figure
    for seed in seeds:
        for variant in claim.variants:
            log(f"[e2kd reproduce] {claim.key}: {variant}, seed {seed}")
            results = distill(configs[seed][variant])
            values.setdefault(variant, []).append([m.read(results) for m in claim.measures])
            for m in claim.measures:
                if m.key == "mean_shift":
                    curves.setdefault(variant, []).append(results["splits"][m.split][m.metric])
    base = claim.variants[0]
    rows = []
    for other in claim.variants[1:]:
        for i, measure in enumerate(claim.measures):
            kd = [v[i] for v in values[base]]
            e2 = [v[i] for v in values[other]]
            diffs = [b - a for a, b in zip(kd, e2)]
            rows.append(
                {
                    "measure": measure.label,
                    "paper": measure.paper,
                    "baseline": base,
                    "variant": other,
                    base: kd,
                    other: e2,
                    "differences": diffs,
                    "verdict": verdict(diffs),
                }
            )
    teacher_splits = teacher.get("splits", {})
    if curves:
        split = next(m.split for m in claim.measures if m.key == "mean_shift")
        if "shift_equivariance" in teacher_splits.get(split, {}):  # a given checkpoint has no run to read it from
            curves = {"teacher": [teacher_splits[split]["shift_equivariance"]], **curves}
    return {
        "key": claim.key,
        "title": claim.title,
        "variants": list(claim.variants),
        "rows": rows,
        "data": data,
        "teacher": {s: {k: v for k, v in m.items() if not isinstance(v, dict)} for s, m in teacher_splits.items()},
        "curves": curves,
    }


def _stat(values: list[float]) -> str:
    mean = 100 * statistics.fmean(values)
    return f"{mean:.1f} ± {100 * statistics.stdev(values):.1f}" if len(values) > 1 else f"{mean:.1f}"


def report(
    claims: list[dict[str, Any]], seeds: Sequence[int], quick: bool, seconds: float, overrides: Sequence[str] = ()
) -> str:
    """The Markdown report: one table row per measured quantity (values in percent)."""
    miniature = all(c.get("data", MINIATURE) == MINIATURE for c in claims)
    where = "on shape images in the paper's data formats" if miniature else "on the data listed per claim below"
    lines = [
        "# e2kd reproduce",
        "",
        f"{'Quick (smoke) run' if quick else 'Full run'} {where}; seeds "
        f"{', '.join(map(str, seeds))}; {seconds / 60:.1f} min. Values in percent, mean ± std over seeds; "
        f"Δ = e2KD − KD per seed (paired). Verdict rule: {RULE}.",
        "",
        "| claim | measure | paper (KD → e2KD) | KD | e2KD | Δ per seed | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for claim in claims:
        for row in claim["rows"]:
            base, other = row["baseline"], row["variant"]
            deltas = ", ".join(f"{100 * d:+.1f}" for d in row["differences"])
            lines.append(
                f"| {claim['title']} ({other} vs {base}) | {row['measure']} | {row['paper']} | "
                f"{_stat(row[base])} | {_stat(row[other])} | {deltas} | **{row['verdict']}** |"
            )
    lines += ["", "Data and teachers (the teacher is the same for every seed of a claim):", ""]
    for claim in claims:
        values = ", ".join(
            f"{split} {metric} {100 * value:.1f}"
            for split, metrics in claim.get("teacher", {}).items()
            for metric, value in metrics.items()
            if isinstance(value, (int, float))
        )
        data = claim.get("data", MINIATURE)
        lines.append(f"- {claim['key']}: {data}; teacher: {values or 'a given checkpoint (not evaluated here)'}")
    if overrides:
        lines += ["", f"Full-size runs with {' '.join(f'--set {o}' for o in overrides)}."]
    return "\n".join(lines) + "\n"


def figures(claims: list[dict[str, Any]], out: Path) -> list[Path]:
    """``reproduce.png``: every row's paired differences; ``shift.png``: the shift-equivariance
    curves (teacher, and each student variant's mean over seeds) where a claim measured them."""
    from .viz import plot_curves, plot_paired

    rows = [
        (
            f"{c['key']}: {r['measure']} ({r['variant']})"[:70],
            [100 * d for d in r["differences"]],
            r["verdict"] == "holds here",
        )
        for c in claims
        for r in c["rows"]
    ]
    paths = [
        plot_paired(
            rows,
            out / "reproduce.png",
            xlabel="e2KD − KD per seed (points); bar: mean, green: holds here",
            title="e2kd reproduce: paired differences",
        )
    ]
    for claim in claims:
        if claim.get("curves"):
            shifts = sorted(int(k.split("_")[1]) for k in next(iter(claim["curves"].values()))[0])
            lines = {
                name: (shifts, [statistics.fmean(c[f"shift_{t}"] for c in runs) for t in shifts])
                for name, runs in claim["curves"].items()
            }
            paths.append(
                plot_curves(
                    lines,
                    out / "shift.png",
                    xlabel="diagonal shift (px)",
                    ylabel="cosine on the overlap",
                    title=f"{claim['key']}: shift equivariance of explanations",
                )
            )
    return paths


def select_claims(
    names: Sequence[str] | None, real: RealData | None, log: Callable[[str], None] = print
) -> list[Claim]:
    """The claims to run: those named, else all miniatures, or with real folders the claims on them
    (skipping, with a message, one whose teacher checkpoint is missing and cannot be trained)."""
    known = {c.key: c for c in CLAIMS}
    unknown = [k for k in (names or []) if k not in known]
    if unknown:
        raise ConfigError(f"--claims: unknown claim {unknown[0]!r} (known: {', '.join(known)})")
    if names or not real:
        return [known[k] for k in (names or known)]
    chosen = []
    for claim in CLAIMS:
        setting = claim.paper
        if setting is None or setting.dataset not in real.folders:
            continue
        if claim.root not in real.teachers and setting.teacher_config is None:
            log(f"[e2kd reproduce] skipping {claim.key}: no teacher (--teacher {claim.root}=FILE: {setting.teacher})")
            continue
        chosen.append(claim)
    if not chosen:
        raise ConfigError(
            "nothing to run on the given folders: give the teachers with --teacher CLAIM=FILE "
            "(e.g. --teacher few_data=/models/resnet34.pth)"
        )
    return chosen


def run_reproduce(
    out_dir: str | Path = "reproduce_out",
    seeds: Sequence[int] = (0, 1, 2),
    *,
    quick: bool = False,
    claims: Sequence[str] | None = None,
    real: RealData | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the claims (all, those named, or those on the ``real`` folders); write ``reproduce.md``,
    ``reproduce.json`` and the figures in ``out_dir``. Every config is validated, and every given
    teacher checkpoint loaded, before the first run starts."""
    if len(seeds) < 1:
        raise ValueError("at least one seed")
    real = real or RealData({}, {})
    out, start = Path(out_dir), time.time()
    scale = 0.25 if quick else 1.0
    planned = []
    for claim in select_claims(claims, real if real.folders else None, log):
        setting = claim.paper
        if setting is not None and setting.dataset in real.folders:
            root = out / f"{claim.root}_{setting.dataset}"
            data = f"{setting.dataset} at {real.folders[setting.dataset]}, paper settings e2kd/configs/{setting.config}.yaml"
            planned.append((claim, paper_configs(claim, root, seeds, real), data))
        else:  # frozen reuses the few-data runs' teacher and KD
            planned.append((claim, miniature_configs(claim, out / claim.root, seeds, scale), MINIATURE))
    check_teacher_files([(claim, configs) for claim, configs, _ in planned], real)
    done = [run_claim(claim, configs, log, data) for claim, configs, data in planned]
    seconds = time.time() - start
    figures(done, out)
    text = report(done, seeds, quick, seconds, list(real.overrides))
    atomic_write_text(out / "reproduce.md", text)
    results = {
        "seeds": list(seeds),
        "quick": quick,
        "seconds": round(seconds, 1),
        "rule": RULE,
        "claims": done,
        "overrides": list(real.overrides),
    }
    atomic_write_json(out / "reproduce.json", results)
    log(text)
    return results
