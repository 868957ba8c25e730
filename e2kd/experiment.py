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
from .data import ViewDataset, dataset_of, split_view
from .distill import Distiller, at_least_fp32, label_loss
from .errors import CacheError, ConfigError, ModelError, StaleCacheError
from .evaluate import evaluate_model
from .frozen import FrozenTeacherDataset, TeacherCache, build_cache, fingerprint_hash, make_fingerprint
from . import mixup
from .guidance import AnnotatedSamples, Guidance
from .models import build_from, load_teacher
from .registry import create
from .runs import atomic_torch_save, atomic_write_json, prepare_run_dir, reused
from .runtime import Runtime, progress_enabled, runtime_of
from .train import fit, make_optimizer, make_schedule


def train_view(config: ExperimentConfig, dataset: Dataset, samples=None) -> ViewDataset:
    t = config.train
    return split_view(dataset, dataset.train_split, "train", augment=t.augment, color_jitter=t.color_jitter,
                      samples=samples)


def _fit(config: ExperimentConfig, runtime: Runtime, model: nn.Module, step, data: ViewDataset, out: Path,
         desc: str) -> list[dict]:
    t = config.train

    def schedule(optimizer, total_steps):
        return make_schedule(optimizer, t.schedule, total_steps, t.warmup_epochs * (total_steps // t.epochs))

    return fit(model, step, data, epochs=t.epochs, batch_size=t.batch_size,
               optimizer_fn=lambda params: make_optimizer(params, t.optimizer, t.lr, t.weight_decay),
               scheduler_fn=schedule, runtime=runtime, seed=config.seed, num_workers=config.data.num_workers,
               checkpoint=out / "checkpoint.pt", checkpoint_every=t.checkpoint_every, log_dir=out,
               progress=progress_enabled(config), desc=desc)


def _run_dir(config: ExperimentConfig, runtime: Runtime, rerun: bool = False) -> Path:
    """The run directory, created (and checked) by the main process; the others wait for it."""
    with runtime.main_first():
        out = prepare_run_dir(config, rerun=rerun) if runtime.is_main else Path(config.out_dir)
    return out


def train_teacher(config: ExperimentConfig, *, rerun: bool = False) -> dict[str, Any]:
    """Train ``config.model`` on the labels (cross-entropy, or BCE for multi-label data).

    A finished run of the same config (and code, see :func:`e2kd.runs.produced_by`) is reused
    unless ``rerun``; an interrupted one resumes.
    """
    if (done := reused(config, rerun)) is not None:
        return done
    if config.train.mixup is not None and config.train.guidance is not None:
        raise ConfigError(f"{config.source}: train.mixup: mixed images have no boxes to guide towards; use either "
                          f"train.mixup or train.guidance")
    mixing = config.train.mixup is not None
    runtime = runtime_of(config)
    dataset = dataset_of(config)
    guidance = make_guidance(config, dataset)
    torch.manual_seed(config.seed)
    model = runtime.model(build_from(config.model, dataset, config.model.checkpoint))
    samples = None
    if guidance is not None:
        try:
            guidance.explainer.check_model(model)
        except ModelError as exc:
            raise ConfigError(f"{config.source}: train.guidance.explainer: {exc}") from None
        g = config.train.guidance
        samples = AnnotatedSamples(dataset.samples(dataset.train_split), g.annotated_fraction, config.seed)
    out = _run_dir(config, runtime, rerun)  # after every check
    forward = runtime.ddp(model)

    def step(batch, index):
        images, labels = runtime.batch(batch["image"]), batch["label"].to(runtime.device)
        if mixing:
            lam, perm = mixup.draw(config.train.mixup, len(images), config.seed, index)
            images = mixup.mix(images, lam, perm)
        with runtime.autocast():
            if guidance is None:
                logits, term = forward(images), None
            else:
                logits, term = guidance(model, forward, images, labels, runtime.batch(batch["mask"]), batch["annotated"])
        logits = at_least_fp32(logits)
        ce = mixup.mixed_label_loss(logits, labels, lam, perm) if mixing else label_loss(logits, labels)
        if term is None:
            return {"loss": ce}
        return {"loss": ce + config.train.guidance.weight * term, "ce": ce, "guidance": term}

    history = _fit(config, runtime, model, step, train_view(config, dataset, samples), out, desc=f"teacher {out.name}")
    return _finish(config, runtime, out, model, None, dataset, history)


def make_guidance(config: ExperimentConfig, dataset: Dataset) -> Guidance | None:
    """The guidance of ``train.guidance`` (None without it); a one-line error when the dataset has
    neither masks nor boxes."""
    g = config.train.guidance
    if g is None:
        return None
    if not {"mask", "boxes"} & set(dataset.provides):
        raise ConfigError(f"{config.source}: train.guidance: dataset {dataset.name!r} provides no masks or boxes to "
                          f"guide towards; remove train.guidance or use a dataset that has them")
    return Guidance(_create("explainer", g.explainer), g.loss)


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
                   dataset: Dataset | None = None, student_forward=None) -> Distiller:
    d = config.distill
    explains = d.lam > 0
    return Distiller(
        teacher, student,
        explainer=_create("explainer", d.explainer) if explains else None,
        similarity=_create("similarity", d.similarity) if explains else None,
        temperature=d.temperature, lam=d.lam, ce_weight=d.ce_weight, top_k=d.top_k, explain_every=d.explain_every,
        feature_resolution=d.feature_resolution,
        student_forward=student_forward, **resolved_distill(config, dataset),
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


def prepare_cache(config: ExperimentConfig, teacher: nn.Module, dataset: Dataset, *, force: bool = False,
                  runtime: Runtime | None = None) -> TeacherCache:
    """Build (or resume, or reuse) the frozen-teacher cache for ``config`` and open it verified.

    The teacher sees each training image once, whole (the ``whole`` view), keyed by sample index.
    Under several processes every process computes its share of the shards.
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
    runtime = runtime or runtime_of(config)
    build_cache(root, teacher, explainer, split_view(dataset, split, "whole"), fingerprint, dtype=d.cache_dtype,
                shard_size=d.shard_size, batch_size=config.train.batch_size, progress=progress_enabled(config),
                force=force, num_workers=config.data.num_workers, runtime=runtime)
    return TeacherCache.open(root, fingerprint)


def precompute(config: ExperimentConfig, *, force: bool = False) -> TeacherCache:
    """``e2kd precompute``: the frozen-teacher cache of ``config``'s training set."""
    dataset = dataset_of(config)
    return prepare_cache(config, load_teacher(config, dataset), dataset, force=force)


def distill(config: ExperimentConfig, *, rerun: bool = False) -> dict[str, Any]:
    """Distill ``config.teacher`` into ``config.model``; returns metrics.

    A finished run of the same config (and code, see :func:`e2kd.runs.produced_by`) is reused
    unless ``rerun``; an interrupted one resumes.
    """
    if (done := reused(config, rerun)) is not None:
        return done
    if config.train.guidance is not None:
        raise ConfigError(f"{config.source}: train.guidance guides a model trained on labels (train-teacher); "
                          f"distill's explanation term is distill.lam")
    d, mixing = config.distill, config.train.mixup is not None
    if mixing and d.teacher_mode == "frozen":
        raise ConfigError(f"{config.source}: train.mixup: a frozen teacher's outputs are stored for unmixed images; "
                          f"mixup needs teacher_mode: live (the teacher sees the same mixed image)")
    if mixing and (d.ce_weight > 0 or d.explain_classes == "label"):
        raise ConfigError(f"{config.source}: train.mixup: a mixed image has two labels; distil with distill.ce_weight: 0 "
                          f"and explain_classes other than label")
    runtime = runtime_of(config)
    dataset = dataset_of(config)
    teacher = load_teacher(config, dataset)
    torch.manual_seed(config.seed)
    student = build_from(config.model, dataset, config.model.checkpoint)
    rng = torch.get_rng_state()  # training draws from here, whether or not a cache is built below
    check_models(config, teacher, student)  # every check fails before the run directory exists
    frozen = config.distill.teacher_mode == "frozen"
    teacher, student = runtime.model(teacher), runtime.model(student)
    # a frozen teacher is replayed from the cache: the distiller gets no teacher model at all
    distiller = make_distiller(config, None if frozen else teacher, student, dataset, runtime.ddp(student))
    cache = prepare_cache(config, teacher, dataset, runtime=runtime) if frozen else None
    out = _run_dir(config, runtime, rerun)
    torch.set_rng_state(rng)
    samples = FrozenTeacherDataset(dataset.samples(dataset.train_split), cache) if frozen else None

    def step(batch, index):
        replay = {}
        if frozen:
            replay["teacher_logits"] = runtime.batch(batch["teacher_logits"])
            replay["teacher_maps"] = runtime.batch(batch["teacher_map"]) if distiller.explains else None
        images = runtime.batch(batch["image"])
        if mixing:  # teacher and student see the same mixed image
            images = mixup.mix(images, *mixup.draw(config.train.mixup, len(images), config.seed, index))
        with runtime.autocast():
            return distiller(images, batch["label"].to(runtime.device), step=index, **replay)

    history = _fit(config, runtime, student, step, train_view(config, dataset, samples), out,
                   desc=f"distill {out.name}")
    return _finish(config, runtime, out, student, teacher, dataset, history)


def _finish(config, runtime: Runtime, out: Path, model, teacher, dataset, history) -> dict[str, Any]:
    """Every process evaluates its share of each split (states merged); the main process saves
    the model and writes metrics.json."""
    runtime.sync_buffers(model)  # evaluate (and save) the main process's model on every process
    if runtime.is_main:
        atomic_torch_save(model.state_dict(), out / "model.pt")
    results = evaluate_model(config, model, teacher, dataset, runtime=runtime)
    results["history"] = history
    if runtime.is_main:
        atomic_write_json(out / "metrics.json", results)
    return results
