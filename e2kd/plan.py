"""A run planned once, before anything is trained or written.

:func:`plan_run` checks the rules that span several fields of a config for the command that runs it,
resolves every ``auto`` (the KD term and the explained classes, from the dataset's labels) and builds
each plugin item the run uses exactly once: the dataset, the explainer, the similarity, the
evaluation explainer (the same item unless ``eval.explainer`` names another) and the guidance. The
recipes (:mod:`e2kd.experiment`), evaluation and the frozen-teacher cache take their items from the
plan, and :meth:`Plan.check_model` checks each model against the explainers once.

Rules that need only one field's value are pydantic validators in :mod:`e2kd.config` (checked when a
config is loaded); the rules here need the command, the dataset, or several sections at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, get_args

from torch import nn

from .errors import ConfigError, ModelError
from .registry import create

if TYPE_CHECKING:
    from .api import Dataset, Explainer, Similarity
    from .config import ExperimentConfig, PluginRef
    from .guidance import Guidance

Command = Literal["train-teacher", "distill", "precompute", "prepare", "evaluate"]
COMMANDS = get_args(Command)


@dataclass
class Plan:
    """What one command makes of a config: resolved settings and the plugin items, each built once."""

    config: ExperimentConfig
    dataset: Dataset
    #: The KD term: ``softmax`` or ``binary`` (``distill.kd``; auto: binary for multi-label data).
    kd: str
    #: The explained classes (``distill.explain_classes``; auto: top1, or positive for multi-label data).
    explain_classes: str
    #: ``distill.explainer``: the explanation term's, the frozen cache's and (by default) evaluation's.
    explainer: Explainer
    #: ``distill.similarity``: the explanation term's; metrics comparing explanations default to it.
    similarity: Similarity
    #: ``eval.explainer``, else :attr:`explainer` itself.
    eval_explainer: Explainer
    #: ``train.guidance`` of a teacher (train-teacher only), else None.
    guidance: Guidance | None
    _checked: set[tuple[int, int]] = field(default_factory=set, repr=False)

    @property
    def explains(self) -> bool:
        """Whether distillation has an explanation term (``distill.lam > 0``)."""
        return self.config.distill.lam > 0

    @property
    def frozen(self) -> bool:
        """Whether the teacher is replayed from the frozen-teacher cache."""
        return self.config.distill.teacher_mode == "frozen"

    def check_model(self, field: str, model: nn.Module, role: str = "") -> None:
        """The explainer of ``field`` (``distill.explainer`` or ``train.guidance.explainer``) accepts
        ``model`` (e.g. has its layer); a one-line error naming the config file, the field and the
        model's ``role`` otherwise. Each (explainer, model) pair is checked once per plan."""
        explainer = self.guidance.explainer if field == "train.guidance.explainer" and self.guidance else self.explainer
        key = (id(explainer), id(model))
        if key in self._checked:
            return
        try:
            explainer.check_model(model)
        except ModelError as exc:
            who = f"the {role} does not fit: " if role else ""
            raise ConfigError(f"{self.config.source}: {field}: {who}{exc}") from None
        self._checked.add(key)


def plan_run(config: ExperimentConfig, command: Command, dataset: Dataset | None = None) -> Plan:
    """Plan ``command`` over ``config`` (``dataset``: already opened, else opened here); every refusal
    is a one-line :class:`ConfigError` raised before anything is built beyond the dataset."""
    from .data import dataset_of

    if command not in COMMANDS:
        raise ValueError(f"unknown command {command!r} (known: {', '.join(COMMANDS)})")
    _check_command(config, command)
    dataset = dataset if dataset is not None else dataset_of(config)
    _check_data(config, command, dataset)
    kd, classes = _resolved(config, dataset)
    explainer = _create("explainer", config.distill.explainer)
    guidance = _guidance(config, dataset) if command == "train-teacher" else None
    return Plan(
        config=config,
        dataset=dataset,
        kd=kd,
        explain_classes=classes,
        explainer=explainer,
        similarity=_create("similarity", config.distill.similarity),
        eval_explainer=explainer if config.eval.explainer is None else _create("explainer", config.eval.explainer),
        guidance=guidance,
    )


def _check_command(config: ExperimentConfig, command: Command) -> None:
    """The rules between sections that depend on the command."""
    t, d, source = config.train, config.distill, config.source
    if command == "train-teacher" and t.mixup is not None and t.guidance is not None:
        raise ConfigError(
            f"{source}: train.mixup: mixed images have no boxes to guide towards; use either "
            f"train.mixup or train.guidance"
        )
    if command != "distill":
        return
    if t.guidance is not None:
        raise ConfigError(
            f"{source}: train.guidance guides a model trained on labels (train-teacher); "
            f"distill's explanation term is distill.lam"
        )
    if t.mixup is not None and d.teacher_mode == "frozen":
        raise ConfigError(
            f"{source}: train.mixup: a frozen teacher's outputs are stored for unmixed images; "
            f"mixup needs teacher_mode: live (the teacher sees the same mixed image)"
        )
    if t.mixup is not None and (d.ce_weight > 0 or d.explain_classes == "label"):
        raise ConfigError(
            f"{source}: train.mixup: a mixed image has two labels; distil with distill.ce_weight: 0 "
            f"and explain_classes other than label"
        )


def _check_data(config: ExperimentConfig, command: Command, dataset: Dataset) -> None:
    """A dataset stored at the training size has nothing to decode: no cache, no device decoding."""
    data, source = config.data, config.source
    if command == "evaluate":
        return
    if command == "prepare":
        field, fix = "data.name", "prepare is for datasets of image files"
    elif data.cache == "decoded":
        field, fix = "data.cache", "use data.cache: none"
    elif data.decode == "device":
        field, fix = "data.decode", "use data.decode: cpu"
    else:
        return
    if not dataset.fixed_size:
        return
    raise ConfigError(
        f"{source}: {field}: dataset {dataset.name!r} stores its images at the training size already, "
        f"there is nothing to decode; {fix}"
    )


def _resolved(config: ExperimentConfig, dataset: Dataset | None) -> tuple[str, str]:
    """The KD kind and explained classes, ``auto`` resolved from the dataset's label type
    (single-label without a dataset)."""
    d, multi = config.distill, dataset is not None and dataset.label_type == "multi"
    kd = d.kd if d.kd != "auto" else ("binary" if multi else "softmax")
    classes = d.explain_classes if d.explain_classes != "auto" else ("positive" if multi else "top1")
    if d.teacher_mode == "frozen" and classes != "top1" and d.lam > 0:
        raise ConfigError(
            f"{config.source}: distill.teacher_mode: frozen caches the teacher's top-1 map, but this multi-label "
            f"data explains {classes!r} classes; set distill.explain_classes: top1 or teacher_mode: live"
        )
    return kd, classes


def _guidance(config: ExperimentConfig, dataset: Dataset) -> Guidance | None:
    """The guidance of ``train.guidance`` (None without it); a one-line error when the dataset has
    neither masks nor boxes."""
    from .guidance import Guidance

    g = config.train.guidance
    if g is None:
        return None
    if not {"mask", "boxes"} & set(dataset.provides):
        raise ConfigError(
            f"{config.source}: train.guidance: dataset {dataset.name!r} provides no masks or boxes to "
            f"guide towards; remove train.guidance or use a dataset that has them"
        )
    return Guidance(_create("explainer", g.explainer), g.loss)


def _create(kind: str, ref: PluginRef):
    return create(kind, ref.name, ref.options)
