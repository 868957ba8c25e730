"""Evaluate a model (and optionally its teacher) with registered metrics, on batches or on the
evaluation splits a config names."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.data import Dataset as TorchDataset
from torch.utils.data import Subset

from .api import Dataset, EvalBatch, Explainer, Metric
from .config import ExperimentConfig, PluginRef, metric_keys
from .data import make_loader, split_view
from .errors import ConfigError
from .explaining import explained_forward
from .labels import label_sets
from .registry import create
from .runtime import Runtime, at_least_fp32, runtime_of

if TYPE_CHECKING:
    from .plan import Plan

EVAL_BATCH_SIZE = 256


def evaluate(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    metrics: dict[str, Metric],
    *,
    teacher: nn.Module | None = None,
    explainer: Explainer | None = None,
    runtime: Runtime | None = None,
) -> tuple[dict[str, Any], dict[str, str]]:
    """Run ``metrics`` over ``batches``; returns (values, skipped metric -> reason).

    A metric whose requirements the data or setting cannot meet is skipped, not failed.
    Explanations are computed only when a metric needs them: the model and the teacher are
    each run once per batch, and one capture of the model explains both the teacher's top-1
    class and the present label classes. ``runtime`` gives the device and precision (the forwards
    and explanations run under its autocast, as in training; logits and maps reach the metrics
    in at least float32); default: one CPU process in float32.
    """
    runtime = runtime or Runtime(torch.device("cpu"))
    device = runtime.device
    was_training = model.training
    for metric in metrics.values():
        metric.reset()
    needs = set().union(*(m.requires for m in metrics.values())) if metrics else set()
    pair_maps = "explanations" in needs and teacher is not None and explainer is not None
    want_label_maps = "label_explanations" in needs and explainer is not None
    active: dict[str, Metric] | None = None
    skipped: dict[str, str] = {}
    for batch in batches:
        images = batch["image"].to(device)
        labels = _get(batch, "label", device)
        label_maps = want_label_maps and labels is not None
        t_logits = t_maps = None
        targets = []
        if teacher is not None:
            with runtime.autocast():
                t_logits, t_maps, t_top1 = explained_forward(
                    teacher, images, explainer if pair_maps else None, role="teacher"
                )
            t_logits, t_maps = _fp32(t_logits), _fp32(t_maps)
            if pair_maps:
                targets.append(t_top1)
        if label_maps:
            label_targets, label_weights = label_sets(labels)
            targets.append(label_targets)
        with runtime.autocast():
            logits, maps, _ = explained_forward(
                model,
                images,
                explainer if targets else None,
                torch.cat(targets, dim=1) if targets else None,
                role="evaluated model",
            )
        logits, maps = _fp32(logits), _fp32(maps)
        eval_batch = EvalBatch(
            logits=logits,
            labels=labels,
            teacher_logits=t_logits,
            explanations=maps[:, 0] if pair_maps else None,
            teacher_explanations=t_maps[:, 0] if pair_maps else None,
            groups=_get(batch, "group", device),
            in_distribution=_get(batch, "in_distribution", device),
            images=images,
            **(_model_in_loop(model, explainer, runtime) if explainer is not None else {}),
        )
        if label_maps:
            rows, cols = torch.nonzero(label_weights > 0, as_tuple=True)
            classes = label_targets[rows, cols]
            eval_batch.label_explanations = maps[:, int(pair_maps) :][rows, cols]
            eval_batch.label_pairs = torch.stack([rows, classes], dim=1)
            masks = _get(batch, "mask", device)
            if masks is not None:
                eval_batch.label_masks = masks[rows, classes if masks.shape[1] > 1 else 0][:, None]
        if active is None:
            have = eval_batch.available()
            active = {}
            for name, metric in metrics.items():
                missing = sorted(metric.requires - have)
                if missing:
                    skipped[name] = f"needs {', '.join(missing)}"
                else:
                    active[name] = metric
        for metric in active.values():
            metric.update(eval_batch)
    model.train(was_training)
    return {name: metric.compute() for name, metric in (active or {}).items()}, skipped


def eval_splits(config: ExperimentConfig, dataset: Dataset) -> list[str]:
    """``eval.splits``, else the dataset's evaluation splits; an unknown split is a one-line error."""
    splits = config.eval.splits or list(dataset.eval_splits())
    unknown = [s for s in splits if s not in dataset.splits()]
    if unknown:
        raise ConfigError(
            f"eval.splits: {dataset.name!r} has no split {unknown[0]!r} (known: {', '.join(dataset.splits())})"
        )
    return splits


def evaluate_model(
    plan: Plan,
    model: nn.Module,
    teacher: nn.Module | None,
    metrics: list[PluginRef] | None = None,
    runtime: Runtime | None = None,
    samples_of: Callable[[str], TorchDataset] | None = None,
) -> dict[str, Any]:
    """Every evaluation split of ``plan`` through the eval view, with ``metrics`` (default
    ``eval.metrics``), each built once and bound to the plan's similarity; the explanations are the
    plan's evaluation explainer's. ``samples_of(split)`` gives a split's raw samples (default: the
    dataset's; e.g. a decoded cache's).

    Under several processes each evaluates every ``world_size``-th sample and the metric states
    are merged (:meth:`e2kd.api.Metric.merge`); every process returns the same results.
    """
    config, dataset = plan.config, plan.dataset
    runtime = runtime or runtime_of(config)
    refs = metrics or config.eval.metrics
    created = {key: create("metric", m.name, m.options) for key, m in zip(metric_keys(refs), refs)}
    for metric in created.values():
        metric.bind(similarity=plan.similarity)
    results: dict[str, Any] = {
        "splits": {},
        "skipped": {},
        "higher_is_better": {key: metric.higher_is_better for key, metric in created.items()},
        "details": {key: metric.detail() for key, metric in created.items() if metric.detail()},
        "categories": {key: metric.category for key, metric in created.items()},
        "curve_labels": {key: list(m.curve_labels()) for key, m in created.items() if m.curve_labels() is not None},
    }
    for split in eval_splits(config, dataset):
        view = split_view(dataset, split, "eval", samples=samples_of(split) if samples_of is not None else None)
        if runtime.distributed:
            view = Subset(view, range(runtime.rank, len(view), runtime.world_size))
        loader = make_loader(view, EVAL_BATCH_SIZE, num_workers=config.data.num_workers, device=runtime.device)
        values, skipped = evaluate(
            model, loader, created, teacher=teacher, explainer=plan.eval_explainer, runtime=runtime
        )
        if runtime.distributed:
            values, skipped = merge_across_processes(created, skipped, runtime)
        results["splits"][split] = values
        results["skipped"].update(skipped)
    return results


def merge_across_processes(
    metrics: dict[str, Metric], skipped: dict[str, str], runtime: Runtime
) -> tuple[dict[str, Any], dict[str, str]]:
    """Merge every process's metric states; (values, skipped) as one process over all samples."""
    gathered: list[Any] = [None] * runtime.world_size
    torch.distributed.all_gather_object(gathered, ({n: m.state() for n, m in metrics.items()}, skipped))
    skipped = {name: why for _, s in gathered for name, why in s.items()}
    active = {name: metric for name, metric in metrics.items() if name not in skipped}
    for rank, (states, _) in enumerate(gathered):
        if rank != runtime.rank:
            for name, metric in active.items():
                metric.merge(states[name])
    return {name: metric.compute() for name, metric in active.items()}, skipped


def _fp32(x: torch.Tensor | None) -> torch.Tensor | None:
    return at_least_fp32(x) if x is not None else None


def _model_in_loop(evaluated: nn.Module, explainer: Explainer, runtime: Runtime) -> dict[str, Any]:
    """``EvalBatch``'s ``forward``, ``explain`` and ``model``: the evaluated model (or another
    module given as ``model=``) run as the batch was, under the run's precision, at least float32."""

    def forward(images: torch.Tensor, model: nn.Module = evaluated) -> torch.Tensor:
        with runtime.autocast():
            return at_least_fp32(explained_forward(model, images, None)[0])

    def explain(images: torch.Tensor, target: torch.Tensor, model: nn.Module = evaluated) -> torch.Tensor:
        with runtime.autocast():
            maps = explained_forward(model, images, explainer, target.view(-1, 1), role="evaluated model")[1]
        return at_least_fp32(maps[:, 0])  # type: ignore[index]

    return {"forward": forward, "explain": explain, "model": evaluated}


def flatten_metrics(values: dict[str, Any]) -> dict[str, float]:
    """``{"a": 1, "g": {"worst": 2}}`` -> ``{"a": 1, "g.worst": 2}``."""
    flat: dict[str, float] = {}
    for name, value in values.items():
        if isinstance(value, dict):
            flat.update({f"{name}.{k}": v for k, v in flatten_metrics(value).items()})
        else:
            flat[name] = value
    return flat


def _get(batch: dict[str, torch.Tensor], key: str, device: str | torch.device) -> torch.Tensor | None:
    value = batch.get(key)
    return value.to(device) if value is not None else None
