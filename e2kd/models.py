"""Model helpers: build from the registry, load checkpoints, find layers by name."""

from __future__ import annotations

import contextlib
import difflib
import weakref
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .checkpoints import load_weights
from .errors import ModelError
from .weights import checkpoint_file

if TYPE_CHECKING:
    from .api import Dataset
    from .config import ExperimentConfig, ModelConfig


def resolve_layer(model: nn.Module, name: str | None, *, who: str = "explainer") -> nn.Module:
    """The submodule called ``name`` (``model.named_modules()`` naming); None = last feature stage."""
    if name is None:
        name = default_layer_name(model, who=who)
    try:
        return model.get_submodule(name)  # follows the dotted path: no walk over every module
    except AttributeError:
        pass
    modules = dict(model.named_modules())
    hint = difflib.get_close_matches(name, [n for n in modules if n], n=1)
    did_you_mean = f"; did you mean {hint[0]!r}?" if hint else ""
    raise ModelError(
        f"{who}: model {type(model).__name__} has no layer {name!r}{did_you_mean} "
        f"(set option 'layer' to a name from model.named_modules())"
    )


def default_layer_name(model: nn.Module, *, who: str = "explainer") -> str:
    """Name of the last feature stage, from timm-style ``model.feature_info``."""
    info = getattr(model, "feature_info", None)
    entries = getattr(info, "info", info)  # timm FeatureInfo object or plain list of dicts
    if isinstance(entries, (list, tuple)) and entries and isinstance(entries[-1], dict) and "module" in entries[-1]:
        return str(entries[-1]["module"])
    raise ModelError(
        f"{who}: model {type(model).__name__} declares no feature stages (feature_info); "
        f"set option 'layer' to a module name"
    )


def normalize_inputs(model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> nn.Module:
    """Make ``model`` take [0, 1] images and normalise them itself: ``(x - mean) / std`` per channel.

    A forward pre-hook with non-persistent buffers: module names and state-dict keys are
    unchanged (layers keep their names; checkpoints stay compatible) and the constants move
    with ``model.to(device)``. Explanations are taken w.r.t. the [0, 1] image.
    """
    if len(mean) != len(std) or any(s <= 0 for s in std):
        raise ModelError(f"normalisation: mean and std need one value per channel and std > 0 (got {mean}, {std})")
    model.register_buffer("input_mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
    model.register_buffer("input_std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
    model.register_forward_pre_hook(_normalize)
    return model


def _normalize(module: nn.Module, args: tuple) -> tuple:
    x = args[0]
    return ((x - module.input_mean.to(x.dtype)) / module.input_std.to(x.dtype), *args[1:])


def build_model(
    name: str, options: dict[str, Any] | None, num_classes: int, checkpoint: str | Path | None = None
) -> nn.Module:
    """Build a registered model; load ``checkpoint`` (a state-dict file, or a weight name) if given."""
    from .registry import create

    model = create("model", name, options).build(num_classes)
    if checkpoint is not None:
        load_weights(model, checkpoint_file(checkpoint))
    return model


def module_device(model: nn.Module) -> torch.device:
    """The device of a model's parameters (CPU for a model without any)."""
    return next(model.parameters(), torch.empty(0)).device


def build_from(ref: ModelConfig, dataset: Dataset, checkpoint: str | Path | None = None) -> nn.Module:
    """The model a config section names, with the dataset's number of classes."""
    return build_model(ref.name, ref.options, dataset.num_classes, checkpoint)


def load_teacher(config: ExperimentConfig, dataset: Dataset) -> nn.Module:
    """The config's trained teacher; one-line errors when it is missing."""
    from .errors import ConfigError

    if config.teacher is None:
        raise ConfigError("distillation needs a 'teacher' section (name, options, checkpoint)")
    if config.teacher.checkpoint is None:
        raise ConfigError("teacher.checkpoint: a trained teacher is required (run `e2kd train-teacher` first)")
    return build_from(config.teacher, dataset, config.teacher.checkpoint)


_FOUND: weakref.WeakKeyDictionary[nn.Module, dict[str, list[nn.Module]]] = weakref.WeakKeyDictionary()


def find_modules(model: nn.Module, key: str, test: Callable[[nn.Module], bool]) -> list[nn.Module]:
    """The submodules of ``model`` that pass ``test``, found once per model and ``key``: a walk over
    every module of a ResNet-34 costs a few tenths of a millisecond, which each training step
    would otherwise pay. Assumes the model's structure is fixed once explained."""
    found = _FOUND.setdefault(model, {})
    if key not in found:
        found[key] = [m for m in model.modules() if test(m)]
    return found[key]


@contextlib.contextmanager
def unfused_attention(model: nn.Module) -> Iterator[None]:
    """Switch timm's fused attention off inside ``model`` (restored on exit).

    Fused attention kernels have no double backward, which e2KD needs through the student, and
    they never materialise the attention probabilities that rollout reads.
    """
    attention = find_modules(model, "fused_attn", lambda m: hasattr(m, "fused_attn"))
    modules = [m for m in attention if m.fused_attn is True]
    for m in modules:
        m.fused_attn = False
    try:
        yield
    finally:
        for m in modules:
            m.fused_attn = True
