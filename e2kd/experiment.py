"""Recipes from a validated config to runs: train a teacher, precompute, distill.

Data comes from the dataset seam (:mod:`e2kd.data`), the device from :mod:`e2kd.runtime`, the
loop from :mod:`e2kd.train`, evaluation from :mod:`e2kd.evaluate`, run directories and loading
them from :mod:`e2kd.runs`; each recipe here is the short sequence that joins them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from .api import Dataset
from .config import ExperimentConfig, PluginRef
from .data import ViewDataset, dataset_of, make_loader, split_view
from .distill import Distiller, label_loss
from .errors import CacheError, ConfigError, ModelError, StaleCacheError
from .evaluate import evaluate_model
from .frozen import FrozenTeacherDataset, TeacherCache, build_cache, fingerprint_hash, make_fingerprint
from .models import build_from, load_teacher
from .registry import create
from .runs import atomic_torch_save, atomic_write_json, finished_results, prepare_run_dir
from .runtime import device_of, progress_enabled
from .train import fit, make_optimizer, make_schedule


def train_view(config: ExperimentConfig, dataset: Dataset, samples=None) -> ViewDataset:
    t = config.train
    return split_view(dataset, dataset.train_split, "train", augment=t.augment, color_jitter=t.color_jitter,
                      samples=samples)


def _fit(config: ExperimentConfig, model: nn.Module, step, data: ViewDataset, out: Path, desc: str) -> list[dict]:
    t = config.train
    loader = make_loader(data, t.batch_size, shuffle=True, num_workers=config.data.num_workers, device=device_of(config))
    optimizer = make_optimizer(model.parameters(), t.optimizer, t.lr, t.weight_decay)
    scheduler = make_schedule(optimizer, t.schedule, t.epochs * len(loader), t.warmup_epochs * len(loader))
    return fit(model, step, loader, epochs=t.epochs, optimizer=optimizer, scheduler=scheduler,
               checkpoint=out / "checkpoint.pt", progress=progress_enabled(config), desc=desc)


def train_teacher(config: ExperimentConfig) -> dict[str, Any]:
    """Train ``config.model`` on the labels (cross-entropy, or BCE for multi-label data).

    A finished run of the same config is reused; an interrupted one resumes.
    """
    if (done := finished_results(config)) is not None:
        return done
    dataset = dataset_of(config)
    out = prepare_run_dir(config)
    torch.manual_seed(config.seed)
    device = device_of(config)
    model = build_from(config.model, dataset, config.model.checkpoint).to(device)

    def step(batch):
        return {"loss": label_loss(model(batch["image"].to(device)), batch["label"].to(device))}

    history = _fit(config, model, step, train_view(config, dataset), out, desc=f"teacher {out.name}")
    atomic_torch_save(model.state_dict(), out / "model.pt")
    return _finish(config, out, model, None, dataset, history)


def resolved_distill(config: ExperimentConfig, dataset: Dataset | None) -> dict[str, Any]:
    """The KD kind and explained classes, ``auto`` resolved from the dataset's label type
    (single-label without a dataset)."""
    d, multi = config.distill, dataset is not None and dataset.label_type == "multi"
    kd = d.kd if d.kd != "auto" else ("binary" if multi else "softmax")
    classes = d.explain_classes if d.explain_classes != "auto" else ("positive" if multi else "top1")
    if d.teacher_mode == "frozen" and classes != "top1" and d.lam > 0:
        raise ConfigError(f"{config.source}: distill.teacher_mode: frozen caches the teacher's top-1 map, but this multi-label "
                          f"data explains {classes!r} classes; set distill.explain_classes: top1 or teacher_mode: live")
    return {"kd": kd, "explain_classes": classes}


def make_distiller(config: ExperimentConfig, teacher: nn.Module | None, student: nn.Module,
                   dataset: Dataset | None = None) -> Distiller:
    d = config.distill
    explains = d.lam > 0
    return Distiller(
        teacher, student,
        explainer=_create("explainer", d.explainer) if explains else None,
        similarity=_create("similarity", d.similarity) if explains else None,
        temperature=d.temperature, lam=d.lam, ce_weight=d.ce_weight, top_k=d.top_k,
        **resolved_distill(config, dataset),
    )


def check_models(config: ExperimentConfig, teacher: nn.Module, student: nn.Module) -> None:
    """The explainer accepts both models (e.g. has the layer); a one-line error naming the config
    file, the field and whether the teacher or the student is the problem."""
    d = config.distill
    if d.lam == 0:
        return
    explainer = _create("explainer", d.explainer)
    for role, ref, model in (("teacher", config.teacher, teacher), ("student", config.model, student)):
        try:
            explainer.check_model(model)
        except ModelError as exc:
            raise ConfigError(f"{config.source}: distill.explainer: the {role} ({ref.name}) does not fit: {exc}") from None


def _create(kind: str, ref: PluginRef):
    return create(kind, ref.name, ref.options)


def prepare_cache(config: ExperimentConfig, teacher: nn.Module, dataset: Dataset, *, force: bool = False) -> TeacherCache:
    """Build (or resume, or reuse) the frozen-teacher cache for ``config`` and open it verified.

    The teacher sees each training image once, whole (the ``whole`` view), keyed by sample index.
    """
    d = config.distill
    explainer = _create("explainer", d.explainer)
    explainer.check_model(teacher)
    split = dataset.train_split
    ref = {"name": config.teacher.name, "options": config.teacher.options}
    identity = {**dataset.identity(split), "view": "whole", "image_size": dataset.image_size}
    fingerprint = make_fingerprint(teacher, ref, explainer, identity, d.cache_dtype)
    root = d.cache_dir or Path(config.teacher.checkpoint).parent / f"teacher-cache-{fingerprint_hash(fingerprint)[:12]}"
    if not force:
        try:
            return TeacherCache.open(root, fingerprint)
        except StaleCacheError:
            raise
        except CacheError:
            pass  # missing, incomplete or damaged: (re)build below, keeping the intact shards
    build_cache(root, teacher, explainer, split_view(dataset, split, "whole"), fingerprint, dtype=d.cache_dtype,
                shard_size=d.shard_size, batch_size=config.train.batch_size, device=device_of(config),
                progress=progress_enabled(config), force=force, num_workers=config.data.num_workers)
    return TeacherCache.open(root, fingerprint)


def precompute(config: ExperimentConfig, *, force: bool = False) -> TeacherCache:
    """``e2kd precompute``: the frozen-teacher cache of ``config``'s training set."""
    dataset = dataset_of(config)
    return prepare_cache(config, load_teacher(config, dataset), dataset, force=force)


def distill(config: ExperimentConfig) -> dict[str, Any]:
    """Distill ``config.teacher`` into ``config.model``; returns metrics.

    A finished run of the same config is reused; an interrupted one resumes.
    """
    if (done := finished_results(config)) is not None:
        return done
    dataset = dataset_of(config)
    teacher = load_teacher(config, dataset)
    torch.manual_seed(config.seed)
    student = build_from(config.model, dataset, config.model.checkpoint)
    rng = torch.get_rng_state()  # training draws from here, whether or not a cache is built below
    check_models(config, teacher, student)  # every check fails before the run directory exists
    frozen = config.distill.teacher_mode == "frozen"
    # a frozen teacher is replayed from the cache: the distiller gets no teacher model at all
    distiller = make_distiller(config, None if frozen else teacher, student, dataset)
    cache = prepare_cache(config, teacher, dataset) if frozen else None
    out = prepare_run_dir(config)
    torch.set_rng_state(rng)
    device = device_of(config)
    teacher, student = teacher.to(device), student.to(device)
    samples = FrozenTeacherDataset(dataset.samples(dataset.train_split), cache) if frozen else None

    def step(batch):
        replay = {}
        if frozen:
            replay["teacher_logits"] = batch["teacher_logits"].to(device)
            replay["teacher_maps"] = batch["teacher_map"].to(device) if distiller.explains else None
        return distiller(batch["image"].to(device), batch["label"].to(device), **replay)

    history = _fit(config, student, step, train_view(config, dataset, samples), out, desc=f"distill {out.name}")
    atomic_torch_save(student.state_dict(), out / "model.pt")
    return _finish(config, out, student, teacher, dataset, history)


def _finish(config, out, model, teacher, dataset, history) -> dict[str, Any]:
    results = evaluate_model(config, model, teacher, dataset)
    results["history"] = history
    atomic_write_json(out / "metrics.json", results)
    return results


