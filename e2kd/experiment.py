"""Recipes from a validated config to runs: train a teacher, precompute, distill, evaluate, load.

Data comes from the dataset seam (:mod:`e2kd.data`), the loop from :mod:`e2kd.train`, run
directories from :mod:`e2kd.runs`; each recipe here is the short sequence that joins them.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .api import Dataset, Explainer
from .config import ExperimentConfig, ModelConfig, PluginRef, load_config
from .data import ViewDataset, make_loader, open_dataset, split_view
from .distill import Distiller, label_loss
from .errors import CacheError, ConfigError, StaleCacheError
from .evaluate import evaluate
from .frozen import FrozenTeacherDataset, TeacherCache, build_cache, fingerprint_hash, make_fingerprint
from .models import build_model
from .registry import create
from .runs import atomic_torch_save, atomic_write_json, finished_results, prepare_run_dir
from .train import fit, make_optimizer, make_schedule

EVAL_BATCH_SIZE = 256


def device_of(config: ExperimentConfig) -> torch.device:
    """The one device decision: ``train.device``, with ``auto`` = CUDA when available."""
    name = config.train.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def dataset_of(config: ExperimentConfig) -> Dataset:
    """The configured dataset, its files checked."""
    return open_dataset(config.data.name, config.data.options, seed=config.data.seed)


def _progress(config: ExperimentConfig) -> bool:
    return config.train.progress and sys.stderr.isatty()


def _build(ref: ModelConfig, dataset: Dataset, checkpoint: Path | None) -> nn.Module:
    return build_model(ref.name, ref.options, dataset.num_classes, checkpoint)


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
               checkpoint=out / "checkpoint.pt", progress=_progress(config), desc=desc)


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
    model = _build(config.model, dataset, config.model.checkpoint).to(device)

    def step(batch):
        return {"loss": label_loss(model(batch["image"].to(device)), batch["label"].to(device))}

    history = _fit(config, model, step, train_view(config, dataset), out, desc=f"teacher {out.name}")
    atomic_torch_save(model.state_dict(), out / "model.pt")
    return _finish(config, out, model, None, dataset, history)


def load_teacher(config: ExperimentConfig, dataset: Dataset) -> nn.Module:
    if config.teacher is None:
        raise ConfigError("distillation needs a 'teacher' section (name, options, checkpoint)")
    if config.teacher.checkpoint is None:
        raise ConfigError("teacher.checkpoint: a trained teacher is required (run `e2kd train-teacher` first)")
    return _build(config.teacher, dataset, config.teacher.checkpoint)


def resolved_distill(config: ExperimentConfig, dataset: Dataset | None) -> dict[str, Any]:
    """The KD kind and explained classes, ``auto`` resolved from the dataset's label type
    (single-label without a dataset)."""
    d, multi = config.distill, dataset is not None and dataset.label_type == "multi"
    kd = d.kd if d.kd != "auto" else ("binary" if multi else "softmax")
    classes = d.explain_classes if d.explain_classes != "auto" else ("positive" if multi else "top1")
    if d.teacher_mode == "frozen" and classes != "top1" and d.lam > 0:
        raise ConfigError(f"distill.teacher_mode: frozen caches the teacher's top-1 map, but this multi-label "
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


def _create(kind: str, ref: PluginRef):
    return create(kind, ref.name, ref.options)


def eval_explainer(config: ExperimentConfig) -> Explainer:
    """The explainer evaluation uses: ``eval.explainer``, else ``distill.explainer``."""
    return _create("explainer", config.eval.explainer or config.distill.explainer)


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
                progress=_progress(config), force=force, num_workers=config.data.num_workers)
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
    teacher = load_teacher(config, dataset)  # fail on a missing teacher before creating the run dir
    resolved_distill(config, dataset)
    frozen = config.distill.teacher_mode == "frozen"
    cache = prepare_cache(config, teacher, dataset) if frozen else None
    out = prepare_run_dir(config)
    torch.manual_seed(config.seed)
    device = device_of(config)
    student = _build(config.model, dataset, config.model.checkpoint)
    teacher, student = teacher.to(device), student.to(device)
    # a frozen teacher is replayed from the cache: the distiller gets no teacher model at all
    distiller = make_distiller(config, None if frozen else teacher, student, dataset)
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


def eval_splits(config: ExperimentConfig, dataset: Dataset) -> list[str]:
    splits = config.eval.splits or list(dataset.eval_splits())
    unknown = [s for s in splits if s not in dataset.splits()]
    if unknown:
        raise ConfigError(f"eval.splits: {dataset.name!r} has no split {unknown[0]!r} (known: {', '.join(dataset.splits())})")
    return splits


def evaluate_model(config: ExperimentConfig, model: nn.Module, teacher: nn.Module | None, dataset: Dataset,
                   metrics: list[PluginRef] | None = None) -> dict[str, Any]:
    """Every evaluation split through the eval view, with ``metrics`` (default ``eval.metrics``)."""
    device = device_of(config)
    explainer = eval_explainer(config)
    results: dict[str, Any] = {"splits": {}, "skipped": {}}
    for split in eval_splits(config, dataset):
        created = {m.name: _create("metric", m) for m in (metrics or config.eval.metrics)}
        loader = make_loader(split_view(dataset, split, "eval"), EVAL_BATCH_SIZE, num_workers=config.data.num_workers,
                             device=device)
        values, skipped = evaluate(model, loader, created, teacher=teacher, explainer=explainer, device=device)
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

    @cached_property
    def dataset(self) -> Dataset:
        return dataset_of(self.config)

    @property
    def class_names(self) -> list[str]:
        return self.dataset.class_names()

    def split(self, name: str) -> ViewDataset:
        """One split of the run's dataset, un-augmented (the evaluation view)."""
        if name not in self.dataset.splits():
            raise ConfigError(f"{self.path}: dataset {self.dataset.name!r} has no split {name!r} "
                              f"(known: {', '.join(self.dataset.splits())})")
        return split_view(self.dataset, name, "eval")

    def datasets(self) -> dict[str, ViewDataset]:
        """Every split, un-augmented (the evaluation view)."""
        return {name: self.split(name) for name in self.dataset.splits()}

    def explainer(self) -> Explainer:
        """The explainer the run evaluates with (eval.explainer, else distill.explainer)."""
        return eval_explainer(self.config)

    def evaluate(self, metrics: list[str] | None = None) -> dict[str, Any]:
        """Re-evaluate (optionally with other metrics); rewrites the run's metrics.json."""
        refs = [PluginRef(name=m) for m in metrics] if metrics else None
        for ref in refs or []:
            _create("metric", ref)  # unknown names fail here, with the known ones listed
        results = evaluate_model(self.config, self.model, self.teacher, self.dataset, refs)
        previous = self.path / "metrics.json"
        if previous.is_file():
            results["history"] = json.loads(previous.read_text()).get("history", [])
        atomic_write_json(previous, results)
        return results


def _moved_teacher(config: ExperimentConfig, run_dir: Path) -> ExperimentConfig:
    """If the teacher checkpoint is missing where the config says, look for it where it would be
    had it moved together with the run directory (e.g. a whole experiment folder copied)."""
    ckpt = config.teacher.checkpoint if config.teacher is not None else None
    if ckpt is None or ckpt.is_file():
        return config
    candidate = (run_dir / os.path.relpath(ckpt, Path(config.out_dir))).resolve()
    if not candidate.is_file():
        return config
    return config.model_copy(update={"teacher": config.teacher.model_copy(update={"checkpoint": candidate})})


def load_run(run_dir: str | Path) -> LoadedRun:
    """Load a finished run (``config.yaml`` + ``model.pt``) for evaluation or a notebook."""
    run_dir = Path(run_dir)
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise ConfigError(f"{run_dir}: not a run directory (no config.yaml)")
    config = _moved_teacher(load_config(config_path), run_dir.resolve())
    run = LoadedRun(run_dir, config, None, None)  # type: ignore[arg-type]
    device = device_of(config)
    run.model = _build(config.model, run.dataset, run_dir / "model.pt").to(device).eval()
    if config.teacher is not None:
        run.teacher = load_teacher(config, run.dataset).to(device).eval()
    return run
