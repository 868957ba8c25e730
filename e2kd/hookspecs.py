"""The hooks a plugin may implement.

Every plugin (the built-ins under ``plugins/`` included) is a module or object found
through the entry-point group ``e2kd`` and implements one or more of the hooks below
with ``@e2kd.hookimpl``. Each hook receives a ``register`` callable; the plugin calls
it once per item it provides, passing the item's class. Hooks are called lazily, once,
the first time anything asks the registry for an item (or lists plugins).
"""

from __future__ import annotations

from collections.abc import Callable

import pluggy

PROJECT = "e2kd"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

Register = Callable[[type], None]


@hookspec
def register_explainers(register: Register) -> None:
    """Register explanation providers.

    :param register: call ``register(cls)`` for each class; ``cls`` subclasses
        :class:`e2kd.api.Explainer` and sets ``name``, ``description``, ``Options``
        (a pydantic model with ``extra="forbid"``) and its capability flags.

    Called once, when the registry is first used.
    """


@hookspec
def register_similarities(register: Register) -> None:
    """Register similarity functions between two batches of explanations.

    :param register: call ``register(cls)`` for each class; ``cls`` subclasses
        :class:`e2kd.api.Similarity` and declares ``differentiable`` and
        ``higher_is_better``.

    Called once, when the registry is first used.
    """


@hookspec
def register_metrics(register: Register) -> None:
    """Register evaluation metrics.

    :param register: call ``register(cls)`` for each class; ``cls`` subclasses
        :class:`e2kd.api.Metric` and declares in ``requires`` what data it needs
        (any of :data:`e2kd.api.REQUIREMENTS`: ``labels``, ``single_label``, ``teacher``,
        ``explanations``, ``label_explanations``, ``masks``, ``groups``, ``model``).

    Called once, when the registry is first used.
    """


@hookspec
def register_models(register: Register) -> None:
    """Register model builders that configs can name (``model.name``).

    :param register: call ``register(cls)`` for each class; ``cls`` subclasses
        :class:`e2kd.api.ModelBuilder`, whose ``build(num_classes)`` returns an
        ``nn.Module`` mapping images to logits.

    Called once, when the registry is first used.
    """


@hookspec
def register_datasets(register: Register) -> None:
    """Register datasets that configs can name (``data.name``).

    :param register: call ``register(cls)`` for each class; ``cls`` subclasses
        :class:`e2kd.api.Dataset` and declares its ``label_type`` (single or multi),
        what its samples ``provides`` (``mask``, ``boxes``, ``group``), its splits,
        class names and an identity for frozen-teacher cache fingerprints.

    Called once, when the registry is first used.
    """


@hookspec
def register_weight_sources(register: Register) -> None:
    """Register weight sources: the schemes of weight names (``checkpoint: <scheme>:<spec>``).

    :param register: call ``register(cls)`` for each class; ``cls`` subclasses
        :class:`e2kd.api.WeightSource`, its ``name`` is the scheme (``hf-hub``, ``torchvision``, ...)
        and ``locate(spec, revision=, download=)`` returns the local file.

    Called once, when the registry is first used.
    """


@hookspec
def register_trackers(register: Register) -> None:
    """Register logging destinations that configs can name (``train.loggers``).

    :param register: call ``register(cls)`` for each class; ``cls`` subclasses
        :class:`e2kd.api.Tracker` (``start``, ``log_step``, ``log_epoch``, ``log_results``, ``close``).

    Called once, when the registry is first used.
    """
