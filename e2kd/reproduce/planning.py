"""The configs of a reproduce run: miniature ones, or the paper's settings on the real folders a user
gives (:class:`RealData`), with every teacher checkpoint loaded before anything trains."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..config import ExperimentConfig, load_config_dict, read_config_file
from ..errors import ConfigError
from .claims import CLAIMS, VARIANTS, Claim


@dataclass(frozen=True)
class RealData:
    """Real dataset folders (``{"imagenet": path, ...}``), teacher checkpoints by claim folder
    (``{"few_data": path}``), and ``--set`` overrides applied to every full-size run."""

    folders: dict[str, Path]
    teachers: dict[str, Path | str]
    overrides: tuple[str, ...] = ()


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
    from ..data import dataset_of
    from ..models import load_teacher

    checked = set()
    for claim, configs in planned:
        if claim.paper is None or claim.root not in real.teachers or claim.root in checked:
            continue
        student = next(c for name, c in next(iter(configs.values())).items() if name != "teacher")
        load_teacher(student, dataset_of(student))
        checked.add(claim.root)


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
