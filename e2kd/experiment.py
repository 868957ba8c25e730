"""Glue from a validated config to runs: train a teacher, distill a student, evaluate."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from .config import ExperimentConfig, dump_config, load_config, load_config_dict
from .data import SyntheticShapes
from .data.augment import make_augment
from .distill import Distiller
from .errors import CacheError, ConfigError, StaleCacheError
from .frozen import FrozenTeacherDataset, TeacherCache, build_cache, fingerprint_hash, make_fingerprint
from .evaluate import evaluate
from .models import build_model
from .registry import create
from .runs import atomic_torch_save, atomic_write_json, prepare_run_dir
from .train import fit, make_optimizer, make_schedule

EVAL_SPLITS = ("test_id", "test_ood")


def make_datasets(config: ExperimentConfig, *, augment: bool = True) -> dict[str, SyntheticShapes]:
    """train (augmented), test_id (same background bias) and test_ood (mismatched backgrounds)."""
    d = config.data
    common = dict(num_classes=d.num_classes, image_size=d.image_size, seed=d.seed)
    transform = make_augment(config.train.augment, d.image_size, config.train.color_jitter) if augment else None
    return {
        "train": SyntheticShapes(d.train_per_class, bias=d.bias, stream=0, transform=transform, **common),
        "test_id": SyntheticShapes(d.test_per_class, bias=d.bias, stream=1, **common),
        "test_ood": SyntheticShapes(d.test_per_class, mismatched=True, stream=2, **common),
    }


def _device(config: ExperimentConfig) -> torch.device:
    name = config.train.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def _train_loader(config: ExperimentConfig, dataset: SyntheticShapes) -> DataLoader:
    batch = min(config.train.batch_size, len(dataset))
    return DataLoader(dataset, batch_size=batch, shuffle=True, drop_last=len(dataset) >= 2 * batch)


def _eval_loader(dataset: SyntheticShapes, batch_size: int = 256) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=False)


def _progress(config: ExperimentConfig) -> bool:
    return config.train.progress and sys.stderr.isatty()


def _fit(config: ExperimentConfig, model: nn.Module, step, dataset: SyntheticShapes, out: Path, desc: str) -> list[dict]:
    loader = _train_loader(config, dataset)
    t = config.train
    optimizer = make_optimizer(model.parameters(), t.optimizer, t.lr, t.weight_decay)
    scheduler = make_schedule(optimizer, t.schedule, t.epochs * len(loader))
    return fit(model, step, loader, epochs=t.epochs, optimizer=optimizer, scheduler=scheduler,
               checkpoint=out / "checkpoint.pt", progress=_progress(config), desc=desc)


def finished_results(config: ExperimentConfig) -> dict[str, Any] | None:
    """The metrics of a finished run of exactly this config in ``config.out_dir``, else None."""
    out = Path(config.out_dir)
    files = [out / "config.yaml", out / "model.pt", out / "metrics.json"]
    if all(f.is_file() for f in files) and files[0].read_text() == dump_config(config):
        return json.loads(files[2].read_text())
    return None


def train_teacher(config: ExperimentConfig) -> dict[str, Any]:
    """Train ``config.model`` with cross-entropy on the configured data; returns metrics.

    A finished run of the same config is reused; an interrupted one resumes.
    """
    if (done := finished_results(config)) is not None:
        return done
    out = prepare_run_dir(config.out_dir, dump_config(config), config.seed)
    torch.manual_seed(config.seed)
    device = _device(config)
    data = make_datasets(config)
    model = build_model(config.model.name, config.model.options, config.data.num_classes, config.model.checkpoint).to(device)
    loss_fn = nn.CrossEntropyLoss()

    def step(batch):
        logits = model(batch["image"].to(device))
        return {"loss": loss_fn(logits, batch["label"].to(device))}

    history = _fit(config, model, step, data["train"], out, desc=f"teacher {out.name}")
    atomic_torch_save(model.state_dict(), out / "model.pt")
    return _finish(config, out, model, None, data, history)


def load_teacher(config: ExperimentConfig) -> nn.Module:
    if config.teacher is None:
        raise ConfigError("distillation needs a 'teacher' section (name, options, checkpoint)")
    if config.teacher.checkpoint is None:
        raise ConfigError("teacher.checkpoint: a trained teacher is required (run `e2kd train-teacher` first)")
    return build_model(config.teacher.name, config.teacher.options, config.data.num_classes, config.teacher.checkpoint)


def make_distiller(config: ExperimentConfig, teacher: nn.Module, student: nn.Module) -> Distiller:
    d = config.distill
    explains = d.lam > 0
    return Distiller(
        teacher, student,
        explainer=_explainer(config) if explains else None,
        similarity=create("similarity", d.similarity.name, d.similarity.options) if explains else None,
        temperature=d.temperature, lam=d.lam, ce_weight=d.ce_weight,
        explain_classes=d.explain_classes, top_k=d.top_k,
    )


def _explainer(config: ExperimentConfig):
    return create("explainer", config.distill.explainer.name, config.distill.explainer.options)


def prepare_cache(
    config: ExperimentConfig, teacher: nn.Module, train: SyntheticShapes | None = None, *, force: bool = False
) -> TeacherCache:
    """Build (or resume, or reuse) the frozen-teacher cache for ``config`` and open it verified.

    ``train`` is the un-augmented training set (made from ``config`` when not given).
    """
    d = config.distill
    explainer = _explainer(config)
    explainer.check_model(teacher)
    train = train if train is not None else make_datasets(config, augment=False)["train"]
    ref = {"name": config.teacher.name, "options": config.teacher.options}
    fingerprint = make_fingerprint(teacher, ref, explainer, train.identity(), d.cache_dtype)
    root = d.cache_dir or Path(config.teacher.checkpoint).parent / f"teacher-cache-{fingerprint_hash(fingerprint)[:12]}"
    if not force:
        try:
            return TeacherCache.open(root, fingerprint)
        except StaleCacheError:
            raise
        except CacheError:
            pass  # missing, incomplete or damaged: (re)build below, keeping the intact shards
    build_cache(root, teacher, explainer, train.images, fingerprint, dtype=d.cache_dtype, shard_size=d.shard_size,
                batch_size=config.train.batch_size, device=_device(config), progress=_progress(config), force=force)
    return TeacherCache.open(root, fingerprint)


def precompute(config: ExperimentConfig, *, force: bool = False) -> TeacherCache:
    """``e2kd precompute``: the frozen-teacher cache of ``config``'s training set."""
    return prepare_cache(config, load_teacher(config), force=force)


def distill(config: ExperimentConfig) -> dict[str, Any]:
    """Distill ``config.teacher`` into ``config.model``; returns metrics.

    A finished run of the same config is reused; an interrupted one resumes.
    """
    if (done := finished_results(config)) is not None:
        return done
    teacher = load_teacher(config)  # fail on a missing teacher before creating the run dir
    data = make_datasets(config)
    frozen = config.distill.teacher_mode == "frozen"
    cache = prepare_cache(config, teacher, data["train"].without_transform()) if frozen else None
    out = prepare_run_dir(config.out_dir, dump_config(config), config.seed)
    torch.manual_seed(config.seed)
    device = _device(config)
    student = build_model(config.model.name, config.model.options, config.data.num_classes, config.model.checkpoint)
    teacher, student = teacher.to(device), student.to(device)
    # a frozen teacher is replayed from the cache: the distiller gets no teacher model at all
    distiller = make_distiller(config, None if frozen else teacher, student)
    train = data["train"]
    if frozen:
        train = FrozenTeacherDataset(train.without_transform(), cache, train.transform)

    def step(batch):
        replay = {}
        if frozen:
            replay["teacher_logits"] = batch["teacher_logits"].to(device)
            replay["teacher_maps"] = batch["teacher_map"].to(device) if distiller.explains else None
        return distiller(batch["image"].to(device), batch["label"].to(device), **replay)

    history = _fit(config, student, step, train, out, desc=f"distill {out.name}")
    atomic_torch_save(student.state_dict(), out / "model.pt")
    return _finish(config, out, student, teacher, data, history)


def _finish(config, out, model, teacher, data, history) -> dict[str, Any]:
    results = evaluate_model(config, model, teacher, data)
    results["history"] = history
    atomic_write_json(out / "metrics.json", results)
    return results


def evaluate_model(config: ExperimentConfig, model: nn.Module, teacher: nn.Module | None, data: dict) -> dict[str, Any]:
    device = _device(config)
    ref = config.eval.explainer or config.distill.explainer
    explainer = create("explainer", ref.name, ref.options)
    results: dict[str, Any] = {"splits": {}, "skipped": {}}
    for split in EVAL_SPLITS:
        metrics = {m.name: create("metric", m.name, m.options) for m in config.eval.metrics}
        values, skipped = evaluate(model, _eval_loader(data[split]), metrics, teacher=teacher, explainer=explainer, device=device)
        results["splits"][split] = values
        results["skipped"].update(skipped)
    return results


@dataclass
class LoadedRun:
    """A finished run directory, loaded: its config, trained model and (if any) teacher."""

    path: Path
    config: ExperimentConfig
    model: nn.Module
    teacher: nn.Module | None

    @property
    def name(self) -> str:
        return self.path.name

    def datasets(self) -> dict[str, SyntheticShapes]:
        """train / test_id / test_ood, un-augmented."""
        return make_datasets(self.config, augment=False)

    def explainer(self):
        """The explainer the run evaluates with (eval.explainer, else distill.explainer)."""
        ref = self.config.eval.explainer or self.config.distill.explainer
        return create("explainer", ref.name, ref.options)


def load_run(run_dir: str | Path) -> LoadedRun:
    """Load a finished run (``config.yaml`` + ``model.pt``) for evaluation or a notebook."""
    run_dir = Path(run_dir)
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise ConfigError(f"{run_dir}: not a run directory (no config.yaml)")
    config = load_config(config_path)
    device = _device(config)
    model = build_model(config.model.name, config.model.options, config.data.num_classes, run_dir / "model.pt")
    teacher = load_teacher(config) if config.teacher is not None else None
    return LoadedRun(run_dir, config, model.to(device).eval(), teacher.to(device).eval() if teacher is not None else None)


def evaluate_run(run_dir: str | Path, metrics: list[str] | None = None) -> dict[str, Any]:
    """Re-evaluate a finished run (optionally with other metrics); rewrites its metrics.json."""
    run = load_run(run_dir)
    config = run.config
    if metrics:
        config = load_config_dict(config.model_dump(mode="json"), source=str(run.path / "config.yaml"),
                                  overrides=[f"eval.metrics=[{', '.join(metrics)}]"])
    results = evaluate_model(config, run.model, run.teacher, run.datasets())
    previous = run.path / "metrics.json"
    if previous.is_file():
        results["history"] = json.loads(previous.read_text()).get("history", [])
    atomic_write_json(previous, results)
    return results
