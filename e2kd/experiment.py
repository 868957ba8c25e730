"""Recipes from a validated config to runs: train a teacher, precompute, distill.

Each recipe plans its run once (:func:`e2kd.plan.plan_run`: the rules, the resolved settings and every
plugin item), then sequences the steps: models from :mod:`e2kd.models`, the runtime from
:mod:`e2kd.runtime`, the loop from :mod:`e2kd.train`, evaluation from :mod:`e2kd.evaluate`, the run
directory from :mod:`e2kd.runs`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import mixup
from .data import ViewDataset, split_view
from .data.batch_views import DeviceView
from .data.decoded import DecodedCache, build_decoded, decoded_fingerprint, default_root, default_short_side
from .data.files import EncodedFiles, ImageFiles
from .distill import Distiller
from .errors import CacheError, ConfigError, ModelError, StaleCacheError
from .evaluate import eval_splits, evaluate_model
from .frozen import FrozenTeacherDataset, TeacherCache, build_cache, fingerprint_hash, make_fingerprint
from .guidance import AnnotatedSamples
from .labels import label_loss
from .models import build_from, load_teacher
from .plan import Plan, plan_run
from .runs import prepare_run_dir, reused
from .runtime import Runtime, at_least_fp32, progress_enabled, runtime_of
from .storage import atomic_torch_save, atomic_write_json, e2kd_cache_dir
from .tracking import Tracking
from .train import fit, make_optimizer, make_schedule
from .weights import resolve as resolve_weights


def train_view(plan: Plan, samples=None, decoded: DecodedCache | None = None) -> ViewDataset | DeviceView:
    """The training split through the training view (``samples``: the split's samples, wrapped).

    From a ``decoded`` cache, or with ``data.decode: device`` (files decoded on the device), the view
    runs per batch on the training device (:class:`DeviceView`); otherwise per item in the loader
    workers (:func:`e2kd.data.split_view`).
    """
    t, dataset = plan.config.train, plan.dataset
    encoded = plan.config.data.decode == "device"
    if decoded is not None or encoded:
        return DeviceView(
            samples if samples is not None else training_samples(plan, decoded),
            encoded=encoded,
            kind=dataset.default_augment if t.augment == "auto" else t.augment,
            image_size=dataset.image_size,
            color_jitter=t.color_jitter,
            num_classes=dataset.num_classes,
            seed=plan.config.seed,
        )
    return split_view(
        dataset,
        dataset.train_split,
        "train",
        augment=t.augment,
        color_jitter=t.color_jitter,
        samples=samples,
        uint8=True,  # made float on the training device (e2kd.data.item_batches)
    )


def _encoded(plan: Plan) -> EncodedFiles:
    """The training split's samples as their files' bytes (``data.decode: device``)."""
    dataset = plan.dataset
    samples = dataset.samples(dataset.train_split)
    if not isinstance(samples, ImageFiles):
        raise ConfigError(
            f"{plan.config.source}: data.decode: device decodes image files, and dataset {dataset.name!r} "
            f"does not read its samples from files one to one (e2kd.data.files.ImageFiles); use data.decode: cpu"
        )
    return EncodedFiles(samples)


def training_samples(plan: Plan, decoded: DecodedCache | None):
    """The training split's raw samples: from the decoded cache, as file bytes, or decoded per item."""
    if decoded is not None:
        return decoded.samples()
    if plan.config.data.decode == "device":
        return _encoded(plan)
    return plan.dataset.samples(plan.dataset.train_split)


def prepare_decoded(
    plan: Plan, split: str | None = None, *, force: bool = False, runtime: Runtime | None = None
) -> DecodedCache:
    """Build (or resume, or reuse) the decoded cache of ``split`` (default: the training split) and
    open it. Under several processes the main process builds it while the others wait, and only the
    main process hashes its bytes on opening."""
    config, dataset = plan.config, plan.dataset
    split = split or dataset.train_split
    short_side = config.data.short_side or default_short_side(dataset.image_size)
    fingerprint = decoded_fingerprint(dataset.identity(split), short_side)
    root = default_root(fingerprint, config.data.cache_dir)
    runtime = runtime or Runtime(torch.device("cpu"))
    progress = progress_enabled(config)
    with runtime.main_first():
        if runtime.is_main:
            build_decoded(
                root,
                dataset.samples(split),
                fingerprint,
                short_side=short_side,
                num_workers=config.data.num_workers,
                progress=progress,
                force=force,
            )
    # the main process hashes every chunk (a damaged cache stops it, and torchrun stops the others);
    # the others check the index and the sizes only, instead of each reading the whole cache again
    return DecodedCache.open(root, fingerprint, checksum=runtime.is_main, progress=progress)


def prepare(config, *, force: bool = False) -> dict[str, DecodedCache]:
    """``e2kd prepare``: the decoded caches of ``config``'s training split and evaluation splits."""
    plan = plan_run(config, "prepare")
    splits = [plan.dataset.train_split, *eval_splits(config, plan.dataset)]
    return {split: prepare_decoded(plan, split, force=force) for split in dict.fromkeys(splits)}


def _eval_samples(plan: Plan, runtime: Runtime):
    """The samples evaluation reads per split: from decoded caches with ``data.cache: decoded`` (the
    eval view of a cached image is the JPEG's, pixel for pixel), else the dataset's own."""
    if plan.config.data.cache != "decoded":
        return None
    return lambda split: prepare_decoded(plan, split, runtime=runtime).samples()


def _decoded(plan: Plan, runtime: Runtime) -> DecodedCache | None:
    """The training run's decoded cache when ``data.cache: decoded`` (built on first use); with
    ``data.decode: device``, the check that the samples are files (before the run directory exists)."""
    if plan.config.data.decode == "device":
        _encoded(plan)
    return prepare_decoded(plan, runtime=runtime) if plan.config.data.cache == "decoded" else None


def _train(plan: Plan, runtime: Runtime, model: nn.Module, teacher, step, data: ViewDataset, out: Path, desc: str):
    """Train, then evaluate and save; scalars and results go to the config's trackers (main process)."""
    config = plan.config
    folder = out if runtime.is_main else None
    tracking = Tracking.named(config.train.loggers, folder, config.model_dump(mode="json"))
    try:
        history = _fit(plan, runtime, model, step, data, out, desc, tracking)
        results = _finish(plan, runtime, out, model, teacher, history)
        tracking.log_results(results)
    except BaseException:
        tracking.close(failed=True)  # a diverged, failed or interrupted run is not reported finished
        raise
    tracking.close()
    return results


def _fit(
    plan: Plan, runtime: Runtime, model: nn.Module, step, data: ViewDataset, out: Path, desc: str, tracking
) -> list[dict]:
    config = plan.config
    t = config.train

    def schedule(optimizer, total_steps):
        return make_schedule(optimizer, t.schedule, total_steps, t.warmup_epochs * (total_steps // t.epochs))

    return fit(
        model,
        step,
        data,
        epochs=t.epochs,
        batch_size=t.batch_size,
        optimizer_fn=lambda params: make_optimizer(params, t.optimizer, t.lr, t.weight_decay),
        scheduler_fn=schedule,
        runtime=runtime,
        seed=config.seed,
        num_workers=config.data.num_workers,
        checkpoint=out / "checkpoint.pt",
        checkpoint_every=t.checkpoint_every,
        tracking=tracking,
        progress=progress_enabled(config),
        desc=desc,
    )


def _run_dir(plan: Plan, runtime: Runtime, rerun: bool = False) -> Path:
    """The run directory, created (and checked) by the main process; the others wait for it."""
    with runtime.main_first():
        out = prepare_run_dir(plan.config, rerun=rerun) if runtime.is_main else Path(plan.config.out_dir)
    return out


def _weights_on_main_first(config, runtime: Runtime) -> None:
    """Under torchrun, resolve the config's weight names on the main process first: it downloads
    what is missing once, and the other processes then find the file in the cache."""
    names = [ref.weight_name for ref in (config.model, config.teacher) if ref is not None and ref.weight_name]
    if runtime.world_size > 1 and names:
        with runtime.main_first():
            for name in names:
                resolve_weights(name)


def train_teacher(config, *, rerun: bool = False) -> dict[str, Any]:
    """Train ``config.model`` on the labels (cross-entropy, or BCE for multi-label data).

    A finished run of the same config (and code, see :func:`e2kd.runs.produced_by`) is reused
    unless ``rerun``; an interrupted one resumes.
    """
    if (done := reused(config, rerun)) is not None:
        return done
    runtime = runtime_of(config)
    _weights_on_main_first(config, runtime)
    plan = plan_run(config, "train-teacher")
    mixing, guidance, dataset = config.train.mixup is not None, plan.guidance, plan.dataset
    torch.manual_seed(config.seed)
    model = runtime.model(build_from(config.model, dataset, config.model.checkpoint))
    samples = None
    if guidance is not None:
        plan.check_model("train.guidance.explainer", model)
    decoded = _decoded(plan, runtime)
    if guidance is not None:
        g = config.train.guidance
        samples = AnnotatedSamples(training_samples(plan, decoded), g.annotated_fraction, config.seed)
    out = _run_dir(plan, runtime, rerun)  # after every check
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
                logits, term = guidance(
                    model, forward, images, labels, runtime.batch(batch["mask"]), batch["annotated"]
                )
        logits = at_least_fp32(logits)
        ce = mixup.mixed_label_loss(logits, labels, lam, perm) if mixing else label_loss(logits, labels)
        if term is None:
            return {"loss": ce}
        return {"loss": ce + config.train.guidance.weight * term, "ce": ce, "guidance": term}

    return _train(plan, runtime, model, None, step, train_view(plan, samples, decoded), out, f"teacher {out.name}")


def make_distiller(plan: Plan, teacher: nn.Module | None, student: nn.Module, student_forward=None) -> Distiller:
    """The distiller of ``plan`` (the planned explainer and similarity; none for plain KD). A model
    the explainer cannot explain is a one-line error naming the config file and the model's role."""
    d = plan.config.distill
    try:
        return Distiller(
            teacher,
            student,
            explainer=plan.explainer if plan.explains else None,
            similarity=plan.similarity if plan.explains else None,
            temperature=d.temperature,
            lam=d.lam,
            ce_weight=d.ce_weight,
            top_k=d.top_k,
            explain_every=d.explain_every,
            feature_resolution=d.feature_resolution,
            student_forward=student_forward,
            kd=plan.kd,
            explain_classes=plan.explain_classes,
        )
    except ModelError as exc:
        raise ConfigError(f"{plan.config.source}: distill.explainer: {exc}") from None


def prepare_cache(
    plan: Plan, teacher: nn.Module, *, force: bool = False, runtime: Runtime | None = None
) -> TeacherCache:
    """Build (or resume, or reuse) the frozen-teacher cache of ``plan`` and open it verified.

    The teacher sees each training image once, whole (the ``whole`` view), keyed by sample index.
    Under several processes every process computes its share of the shards.
    """
    config, dataset, d = plan.config, plan.dataset, plan.config.distill
    plan.check_model("distill.explainer", teacher, "teacher")
    split = dataset.train_split
    ref = {"name": config.teacher.name, "options": config.teacher.options}
    identity = {**dataset.identity(split), "view": "whole", "image_size": dataset.image_size}
    fingerprint = make_fingerprint(teacher, ref, plan.explainer, identity, d.cache_dtype, config.train.precision)
    folder = f"teacher-cache-{fingerprint_hash(fingerprint)[:12]}"
    # beside a teacher file; for named weights (a library's cache holds the file) in e2kd's cache folder
    checkpoint = config.teacher.checkpoint_path
    root = d.cache_dir or (checkpoint.parent if checkpoint is not None else e2kd_cache_dir()) / folder
    if not force:
        try:
            return TeacherCache.open(root, fingerprint)
        except StaleCacheError:
            raise
        except CacheError:
            pass  # missing, incomplete or damaged: (re)build below, keeping the intact shards
    runtime = runtime or runtime_of(config)
    build_cache(
        root,
        teacher,
        plan.explainer,
        split_view(dataset, split, "whole"),
        fingerprint,
        dtype=d.cache_dtype,
        shard_size=d.shard_size,
        batch_size=config.train.batch_size,
        progress=progress_enabled(config),
        force=force,
        num_workers=config.data.num_workers,
        runtime=runtime,
    )
    return TeacherCache.open(root, fingerprint)


def precompute(config, *, force: bool = False) -> TeacherCache:
    """``e2kd precompute``: the frozen-teacher cache of ``config``'s training set."""
    plan = plan_run(config, "precompute")
    return prepare_cache(plan, load_teacher(config, plan.dataset), force=force)


def distill(config, *, rerun: bool = False) -> dict[str, Any]:
    """Distill ``config.teacher`` into ``config.model``; returns metrics.

    A finished run of the same config (and code, see :func:`e2kd.runs.produced_by`) is reused
    unless ``rerun``; an interrupted one resumes.
    """
    if (done := reused(config, rerun)) is not None:
        return done
    plan = plan_run(config, "distill")
    runtime = runtime_of(config)
    _weights_on_main_first(config, runtime)
    mixing, frozen, dataset = config.train.mixup is not None, plan.frozen, plan.dataset
    teacher = load_teacher(config, dataset)
    torch.manual_seed(config.seed)
    student = build_from(config.model, dataset, config.model.checkpoint)
    rng = torch.get_rng_state()  # training draws from here, whether or not a cache is built below
    teacher, student = runtime.model(teacher), runtime.model(student)
    # a frozen teacher is replayed from the cache: the distiller gets no teacher model at all
    distiller = make_distiller(plan, None if frozen else teacher, student, runtime.ddp(student))
    cache = prepare_cache(plan, teacher, runtime=runtime) if frozen else None
    decoded = _decoded(plan, runtime)
    out = _run_dir(plan, runtime, rerun)  # after every check
    torch.set_rng_state(rng)
    samples = None
    if frozen:
        on_device = decoded is not None or config.data.decode == "device"
        samples = FrozenTeacherDataset(training_samples(plan, decoded), cache, resize_maps=not on_device)

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

    return _train(plan, runtime, student, teacher, step, train_view(plan, samples, decoded), out, f"distill {out.name}")


def _finish(plan: Plan, runtime: Runtime, out: Path, model, teacher, history) -> dict[str, Any]:
    """Every process evaluates its share of each split (states merged); the main process saves
    the model and writes metrics.json."""
    runtime.sync_buffers(model)  # evaluate (and save) the main process's model on every process
    if runtime.is_main:
        atomic_torch_save(model.state_dict(), out / "model.pt")
    results = evaluate_model(plan, model, teacher, runtime=runtime, samples_of=_eval_samples(plan, runtime))
    results["history"] = history
    if runtime.is_main:
        atomic_write_json(out / "metrics.json", results)
    return results
