"""Base classes that plugins subclass: explainers, similarities, metrics, model builders, datasets,
weight sources, trackers.

The core only talks to these interfaces; concrete methods live in plugins.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn


class PluginOptions(BaseModel):
    """Base of every plugin item's options: a pydantic model that refuses unknown keys (a typo in a
    config is a one-line error naming the key, not a silently ignored option)."""

    model_config = ConfigDict(extra="forbid")


class NoOptions(PluginOptions):
    """Options model of a plugin item that takes none."""


class PluginItem:
    """What every registered item declares about itself."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    Options: ClassVar[type[BaseModel]] = NoOptions

    def __init__(self, options: BaseModel | None = None, **kwargs: Any) -> None:
        if options is not None and kwargs:
            raise TypeError("pass either an Options instance or keyword options, not both")
        self.options = options if options is not None else self.Options(**kwargs)

    @classmethod
    def capabilities(cls) -> dict[str, Any]:
        """Capability flags the distiller and ``e2kd plugins`` show."""
        return {}

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.model_dump().items())
        return f"{type(self).__name__}({opts})"


class Capture:
    """What :meth:`Explainer.capture` yields: inputs to feed the model, and ``explain``."""

    def __init__(self, inputs: torch.Tensor) -> None:
        self.inputs = inputs

    def explain(
        self, logits: torch.Tensor, target: torch.Tensor, *, create_graph: bool = False, upsample: bool = True
    ) -> torch.Tensor:
        """Explanation (B, C, H, W) of ``logits[i, target[i]]`` from the captured forward.

        ``create_graph=True`` (the student): the map must be differentiable with respect to the
        model's parameters — the distiller back-propagates the explanation term through it, and
        refuses a map without that path. ``False`` (a teacher, evaluation): return it detached.
        ``explain`` may be called several times on one capture (several classes of one forward),
        so keep the forward's graph (``retain_graph=True``; :func:`class_gradient` does). The map
        is checked against :meth:`Explainer.map_channels` and the input's (H, W).

        ``upsample=False`` is asked only of explainers whose :meth:`Explainer.upsamples_bilinearly`
        is true: return the map before its final bilinear upsampling (a similarity then works at
        that resolution, exactly; see :mod:`e2kd.upsampling`).
        """
        raise NotImplementedError


def target_score(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``sum_i logits[i, target[i]]``: one scalar whose gradient holds each sample's class-score
    gradient (the samples of a batch do not interact)."""
    return logits.gather(1, target.view(-1, 1).to(logits.device)).sum()


def class_gradient(
    logits: torch.Tensor, target: torch.Tensor, wrt: torch.Tensor, *, create_graph: bool = False
) -> torch.Tensor:
    """d :func:`target_score` / d ``wrt``, keeping the forward's graph so that the same capture can
    explain other classes; with ``create_graph`` the gradient is itself differentiable (a student's
    map)."""
    (grad,) = torch.autograd.grad(target_score(logits, target), wrt, create_graph=create_graph, retain_graph=True)
    return grad


@contextlib.contextmanager
def recorded(
    modules: nn.Module | list[nn.Module],
    *,
    read: str = "output",
    leaf: bool | Callable[[torch.Tensor], bool] = False,
    check: Callable[[Any], None] | None = None,
    unfuse: nn.Module | None = None,
) -> Iterator[list[torch.Tensor]]:
    """Record, in call order, what ``modules`` output (``read="input"``: their first positional
    argument) during the forwards run inside the block; the list is filled as the model runs.

    - ``check(value)`` runs first on every value and may raise (e.g. a one-line
      :class:`e2kd.errors.ModelError` for an unexpected shape);
    - ``leaf`` (outputs only): record a detached copy that requires grad and let the model go on
      from it — for a frozen model (``trainable=False``) the map then needs the graph from this
      layer on only; a function of the output decides per call (e.g. ``not out.requires_grad``);
    - ``unfuse``: run that model's attention on the unfused path for the block (attention
      probabilities exist, and a double backward through attention works, only there).

    The hooks are removed on leaving the block, also after an error.
    """
    from .models import unfused_attention  # (models imports this module)

    values: list[torch.Tensor] = []

    def hook(module: nn.Module, args: tuple, output: Any) -> Any:
        value = args[0] if read == "input" else output
        if check is not None:
            check(value)
        if read == "output" and (leaf(output) if callable(leaf) else leaf):
            value = output = output.detach().requires_grad_(True)
        values.append(value)
        return output if read == "output" else None

    handles = [m.register_forward_hook(hook) for m in (modules if isinstance(modules, list) else [modules])]
    try:
        with unfused_attention(unfuse) if unfuse is not None else contextlib.nullcontext():
            yield values
    finally:
        for handle in handles:
            handle.remove()


class Explainer(PluginItem):
    """An explanation method, applied to the forward pass that training already runs.

    Usage (what the distiller does)::

        with explainer.capture(model, x) as cap:
            logits = model(cap.inputs)
        maps = cap.explain(logits, target, create_graph=True)

    The contract, in the order the distiller uses it in one training step:

    1. the teacher first (skipped when it is replayed from a frozen cache): ``capture(teacher, x,
       trainable=False)``, one forward through ``cap.inputs``, ``cap.explain(logits, classes)``
       for the teacher's top-1 (or each explained) class, detached; ``trainable=False`` promises
       nothing will be back-propagated into the model, so a method may start its graph at its
       layer (``recorded(..., leaf=True)``);
    2. then the student: ``capture(student, x, trainable=True)``, the training forward through
       ``cap.inputs`` (its logits also give the KD term), ``cap.explain(logits, teacher_classes,
       create_graph=True)``: a map differentiable with respect to the student's parameters;
    3. leaving ``capture`` removes every hook and restores the model, also after an error.

    :meth:`check_model` runs once per model before training (a missing layer is a one-line
    error then, not a traceback later). Building blocks: :func:`recorded`, :func:`class_gradient`,
    :func:`target_score`; the contract kit (:mod:`e2kd.testing`) checks a plugin against all of it.
    """

    #: The map is differentiable w.r.t. the model parameters (usable for e2KD training).
    differentiable: ClassVar[bool] = True
    #: The method reads a layer of the model (option ``layer``).
    needs_layer: ClassVar[bool] = False
    #: Model forwards per explanation beyond the training forward: a number, or the name of the
    #: option that sets it (e.g. ``"n_steps"``); shown by ``e2kd plugins``.
    extra_forwards: ClassVar[int | str] = 0
    #: Channels of the returned map (None: as many as the input has).
    output_channels: ClassVar[int | None] = 1

    @classmethod
    def capabilities(cls) -> dict[str, Any]:
        """What ``e2kd plugins`` lists: differentiable, layer needed, extra forwards, map channels."""
        return {
            "differentiable": cls.differentiable,
            "needs_layer": cls.needs_layer,
            "extra_forwards": cls.extra_forwards,
            "output_channels": cls.output_channels,
        }

    def map_channels(self, input_channels: int) -> int:
        """Channels of this instance's maps for inputs of ``input_channels`` (default:
        :attr:`output_channels`, or the input's when None); override when an option changes it."""
        return self.output_channels or input_channels

    def at_input_resolution(self) -> bool:
        """True when this instance's maps are at the input's (H, W) (the default); False for maps
        at the method's own, smaller resolution (e.g. Grad-CAM with ``upsample: false``)."""
        return True

    def check_model(self, model: nn.Module) -> None:
        """Raise :class:`e2kd.errors.ModelError` if this explainer cannot explain ``model``."""

    def upsamples_bilinearly(self) -> bool:
        """True when, with this instance's options, the map is the bilinear upsampling
        (``align_corners=False``) to the input size of a smaller map, which the capture returns
        from ``explain(..., upsample=False)``."""
        return False

    @contextlib.contextmanager
    def capture(self, model: nn.Module, inputs: torch.Tensor, *, trainable: bool = True) -> Iterator[Capture]:
        """Install what the method needs around one forward of ``model`` and remove it on exit.

        ``trainable=False`` promises that the explanation will not be back-propagated
        into the model (a frozen teacher), which lets methods skip building graphs.
        """
        raise NotImplementedError
        yield  # pragma: no cover

    def explain(self, model: nn.Module, inputs: torch.Tensor, target: torch.Tensor | int | None = None) -> torch.Tensor:
        """Convenience for notebooks: explain ``target`` (default: the top-1 class), detached."""
        with torch.enable_grad():
            with self.capture(model, inputs, trainable=False) as cap:
                logits = model(cap.inputs)
            if target is None:
                chosen = logits.argmax(1)
            elif isinstance(target, int):
                chosen = torch.full((inputs.shape[0],), target, dtype=torch.long, device=inputs.device)
            else:
                chosen = target
            return cap.explain(logits, chosen, create_graph=False).detach()


class Similarity(PluginItem):
    """Per-sample similarity of two explanation batches: (B, ...) x (B, ...) -> (B,)."""

    differentiable: ClassVar[bool] = True
    higher_is_better: ClassVar[bool] = True
    #: :meth:`upsampled` is implemented: the similarity of bilinearly upsampled maps, computed
    #: from the maps at feature resolution (exactly; see :mod:`e2kd.upsampling`).
    feature_resolution: ClassVar[bool] = False

    @classmethod
    def capabilities(cls) -> dict[str, Any]:
        """What ``e2kd plugins`` lists: differentiable, direction, feature-resolution support."""
        return {
            "differentiable": cls.differentiable,
            "higher_is_better": cls.higher_is_better,
            "feature_resolution": cls.feature_resolution,
        }

    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Per-sample similarity (B,) of two batches of maps (B, C, H, W) of the same size;
        differentiable in ``a`` when :attr:`differentiable`."""
        raise NotImplementedError

    def upsampled(self, a: torch.Tensor, b: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """``self(up(a), up(b))`` with ``up`` the bilinear upsampling to ``size`` (a map already
        at ``size`` is left as is), without forming the upsampled maps."""
        raise NotImplementedError(f"similarity {self.name!r} does not declare feature_resolution")

    def loss(self, student: torch.Tensor, teacher: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        """Per-sample loss: ``1 - sim`` if higher is better, else ``sim``; with ``size``, of the
        maps bilinearly upsampled to it (:meth:`upsampled`)."""
        value = self(student, teacher) if size is None else self.upsampled(student, teacher, size)
        return 1.0 - value if self.higher_is_better else value


@dataclass
class EvalBatch:
    """One evaluated batch; fields a dataset or setting lacks are None.

    ``labels`` are class indices (B,) or multi-hot (B, K). ``explanations`` /
    ``teacher_explanations`` are the model's and the teacher's maps for the teacher's top-1
    class. ``label_explanations`` and ``label_masks`` are aligned, one row per (image, present
    label class) pair — for single-label data one row per image — and ``label_pairs`` (P, 2)
    holds each row's (image index, class). ``explain(images, target)`` explains the evaluated
    model on other images (e.g. shifted ones). ``in_distribution`` marks samples whose group
    is in distribution (e.g. waterbird on water).
    """

    logits: torch.Tensor
    labels: torch.Tensor | None = None
    teacher_logits: torch.Tensor | None = None
    explanations: torch.Tensor | None = None
    teacher_explanations: torch.Tensor | None = None
    label_explanations: torch.Tensor | None = None
    label_masks: torch.Tensor | None = None
    label_pairs: torch.Tensor | None = None
    groups: torch.Tensor | None = None
    in_distribution: torch.Tensor | None = None
    images: torch.Tensor | None = None
    explain: Callable[..., torch.Tensor] | None = None
    forward: Callable[..., torch.Tensor] | None = None
    model: nn.Module | None = None

    def available(self) -> set[str]:
        """Names of the requirements this batch can satisfy."""
        have = {
            "labels": self.labels is not None,
            "single_label": self.labels is not None and self.labels.dim() == 1,
            "teacher": self.teacher_logits is not None,
            "explanations": self.explanations is not None and self.teacher_explanations is not None,
            "label_explanations": self.label_explanations is not None,
            "masks": self.label_masks is not None,
            "groups": self.groups is not None,
            "model": self.images is not None and self.explain is not None and self.forward is not None,
        }
        return {name for name, ok in have.items() if ok}


#: Every requirement a metric may declare (see :meth:`EvalBatch.available`).
REQUIREMENTS = frozenset(
    {"labels", "single_label", "teacher", "explanations", "label_explanations", "masks", "groups", "model"}
)


#: What a metric measures (its ``category``), in the order ``e2kd plugins`` and the docs list them.
CATEGORIES = ("performance", "agreement", "localisation", "faithfulness", "randomisation", "robustness")


class Metric(PluginItem):
    """A metric accumulated over batches. The default averages ``per_sample`` values.

    Override ``update``/``compute`` for metrics that are not sample means; ``compute`` may
    return a dict of named values (e.g. per group). The accumulators are the attributes whose
    names start with ``_`` (set in ``reset``); :meth:`state` returns them and :meth:`merge` adds
    another process's state (numbers and tensors add, dicts merge key by key, lists add element
    by element, booleans or). A metric whose state does not add overrides both.
    """

    #: Data the metric needs: any of :data:`REQUIREMENTS`.
    requires: ClassVar[frozenset[str]] = frozenset()
    #: Direction of every value the metric returns (an instance may decide it from its options,
    #: e.g. from its similarity's direction, by overriding this with a property).
    higher_is_better: ClassVar[bool] = True
    #: What it measures: one of :data:`CATEGORIES`.
    category: ClassVar[str] = "performance"

    def __init__(self, options: BaseModel | None = None, **kwargs: Any) -> None:
        super().__init__(options, **kwargs)
        self.reset()

    @classmethod
    def capabilities(cls) -> dict[str, Any]:
        """What ``e2kd plugins`` lists: the data the metric requires, its direction and category."""
        return {"requires": sorted(cls.requires), "higher_is_better": cls.higher_is_better, "category": cls.category}

    def bind(self, *, similarity: Similarity | None = None) -> None:
        """Called by the evaluator before a run is evaluated, with the run's training similarity
        (its options included); metrics that compare explanations may default to it."""

    def detail(self) -> str:
        """What the report writes beside the metric's column, e.g. the similarity it uses (after
        :meth:`bind`); empty for nothing."""
        return ""

    def curve_labels(self) -> tuple[str, str] | None:
        """For a metric whose value holds a ``"curve"`` (``{x: y}``, x numbers written as text or
        names such as layers): the labels of its x and y axes; the report then draws the curve of
        every run (and of the teacher, for faithfulness and randomisation metrics) in one panel."""
        return None

    def reset(self) -> None:
        """Forget every batch seen (called on construction and before each split)."""
        self._total = 0.0
        self._count = 0

    def per_sample(self, batch: EvalBatch) -> torch.Tensor:
        """Per-sample values (B,) for this batch; batch-native, no Python loop over samples."""
        raise NotImplementedError

    def state(self) -> dict[str, Any]:
        """The accumulators (attributes named ``_*``), to merge evaluations of several processes."""
        return {k: v for k, v in vars(self).items() if k.startswith("_")}

    def merge(self, state: dict[str, Any]) -> None:
        """Add another evaluation's :meth:`state` to this one's."""
        for key, value in state.items():
            setattr(self, key, _add_states(getattr(self, key), value))

    def update(self, batch: EvalBatch) -> None:
        """Accumulate one batch; by default the sum and count of :meth:`per_sample`. Override
        with :meth:`compute` (and keep accumulators in ``_*`` attributes) for other reductions."""
        values = self.per_sample(batch).detach().double()
        self._total += float(values.sum())
        self._count += values.numel()

    def compute(self) -> float | dict[str, float]:
        """The value over every batch seen (a float, or named values); NaN before any batch."""
        return self._total / self._count if self._count else float("nan")


def _add_states(a: Any, b: Any) -> Any:
    if isinstance(a, dict):
        return {k: _add_states(a[k], b[k]) if k in a and k in b else (a[k] if k in a else b[k]) for k in {**a, **b}}
    if isinstance(a, bool):
        return a or b
    if isinstance(a, (list, tuple)):
        return type(a)(_add_states(x, y) for x, y in zip(a, b))
    return a + b


class ModelBuilder(PluginItem):
    """Builds an image classifier (images -> logits) from its options."""

    def build(self, num_classes: int) -> nn.Module:
        """A freshly initialised model with ``num_classes`` outputs, built from this item's options."""
        raise NotImplementedError

    @classmethod
    def define(
        cls,
        name: str,
        description: str,
        build: Callable[[BaseModel, int], nn.Module],
        options: type[BaseModel] = NoOptions,
    ) -> type[ModelBuilder]:
        """A registrable builder class whose ``build(num_classes)`` calls ``build(options, num_classes)``
        (for families of architectures that differ only in a few numbers)."""
        return type(
            f"{name}_builder",
            (cls,),
            {
                "name": name,
                "description": description,
                "Options": options,
                "build": lambda self, num_classes: build(self.options, num_classes),
            },
        )


#: What a dataset's samples may carry besides ``image`` and ``label``.
SAMPLE_FIELDS = frozenset({"mask", "boxes", "group"})


class Dataset(PluginItem):
    """A source of labelled images with named splits (subclass it to register a dataset).

    A dataset reads samples; the core decides the view (training augmentation, evaluation
    resize + centre crop, the whole image for the frozen-teacher cache) and applies it jointly
    to the image, its masks/boxes and a replayed teacher map. Each sample of
    :meth:`samples` is a dict:

    - ``image``: float tensor (3, H, W) in [0, 1] at the file's own resolution (mean/std
      normalisation belongs to the model);
    - ``label``: class index (int64 scalar), or for ``label_type = "multi"`` a float multi-hot
      vector (K,);
    - ``mask`` (optional): float (1, H, W) object mask of the label class, or (K, H, W) one per class;
    - ``boxes`` + ``box_labels`` (optional): a ``torchvision.tv_tensors.BoundingBoxes`` (N, 4) and
      the class of each box (N,), rasterised by the core into per-class masks after the geometry;
    - ``group`` (optional): int64 group id, with ``in_distribution`` (bool) when groups define
      in- and out-of-distribution cells.

    Options are validated like every plugin's; ``seed`` (``data.seed``) draws subsets.
    """

    #: "single": a class index per image; "multi": a multi-hot vector per image.
    label_type: ClassVar[str] = "single"
    #: Optional sample fields this dataset provides (any of :data:`SAMPLE_FIELDS`).
    provides: ClassVar[frozenset[str]] = frozenset()
    #: True if images are stored at the training size already (the views then only augment).
    fixed_size: ClassVar[bool] = False
    #: Training augmentation used when ``train.augment`` is ``auto``.
    default_augment: ClassVar[str] = "resized_crop_flip"

    def __init__(self, options: BaseModel | None = None, *, seed: int = 0, **kwargs: Any) -> None:
        super().__init__(options, **kwargs)
        self.seed = seed

    @classmethod
    def capabilities(cls) -> dict[str, Any]:
        """What ``e2kd plugins`` lists: label type and optional sample fields."""
        return {"label_type": cls.label_type, "provides": sorted(cls.provides)}

    @property
    def image_size(self) -> int:
        """Side of the square images the models see (option ``image_size`` by default)."""
        return int(self.options.image_size)  # type: ignore[attr-defined]

    def check(self) -> None:
        """Raise :class:`e2kd.errors.DataError` naming the missing path, before anything runs."""

    def splits(self) -> tuple[str, ...]:
        """Every split name; the first is the one that trains unless :attr:`train_split` says otherwise."""
        raise NotImplementedError

    @property
    def train_split(self) -> str:
        """The split that trains: the first of :meth:`splits` unless overridden."""
        return self.splits()[0]

    def eval_splits(self) -> tuple[str, ...]:
        """The splits evaluated by default (``eval.splits`` may name others)."""
        return tuple(s for s in self.splits() if s != self.train_split)

    def class_names(self) -> list[str]:
        """The class names, in label order (their count is :attr:`num_classes`)."""
        raise NotImplementedError

    @property
    def num_classes(self) -> int:
        """The number of classes (of :meth:`class_names`)."""
        return len(self.class_names())

    def samples(self, split: str) -> torch.utils.data.Dataset[dict[str, Any]]:
        """The raw samples of ``split`` (see the class docstring), indexable and sized."""
        raise NotImplementedError

    def identity(self, split: str) -> dict[str, Any]:
        """What determines the samples of ``split`` (for cache fingerprints): name, options, and
        for file-based data the root and a digest of the file list."""
        return {
            "dataset": self.name,
            "split": split,
            "seed": self.seed,
            "options": self.options.model_dump(mode="json"),
        }


@dataclass(frozen=True)
class WeightFile:
    """A weights file found in a local cache: where it is, and what names its exact version."""

    path: Path
    #: the source's version of the file (a hub commit), None where the address alone names the file
    revision: str | None = None
    #: where it comes from (a URL or a hub repository)
    origin: str | None = None


class WeightSource(PluginItem):
    """Resolves weight names ``<name>:<spec>`` (``name`` is the scheme, e.g. ``hf-hub``) to a local file.

    Sources keep files in the cache of the library they come from (the Hugging Face hub cache,
    ``torch.hub``'s checkpoint folder), so a file fetched once is found by every tool that uses it.
    The core decides whether a download is allowed (``HF_HUB_OFFLINE=1`` forbids it), checks the
    lock file and hashes the file; a source only finds or fetches it.
    """

    def locate(self, spec: str, *, revision: str | None = None, download: bool = True) -> WeightFile:
        """The local file of ``spec`` (at ``revision`` when the source has versions; None = its default).

        ``download=False``: only the cache is searched. Raise :class:`e2kd.errors.WeightsNotCached`
        when the file is not there (or cannot be fetched) and :class:`e2kd.errors.ModelError` for a
        name this source does not know (with the names it does, or a close one).
        """
        raise NotImplementedError

    def names(self) -> list[str]:
        """Specs this source knows by heart (listed by ``e2kd weights list``; empty when open-ended)."""
        return []


@dataclass
class TrackedRun:
    """What a tracker is told when training starts."""

    #: the run directory
    folder: Path
    #: the run's name (its folder's name)
    name: str
    #: the resolved config (as in config.yaml)
    config: dict[str, Any]
    #: 0 for a fresh start; else the last step a resumed run keeps (drop or overwrite what came after)
    resume_step: int = 0
    #: this tracker's own state, kept in the run directory's trackers.json between starts (e.g. its run id)
    state: dict[str, Any] = field(default_factory=dict)


class Tracker(PluginItem):
    """A logging destination (``train.loggers``): training scalars per step and per epoch, then results.

    Only the main process of a run logs. ``start`` is called once per training (again when a killed
    run resumes), then ``log_step`` / ``log_epoch`` with the rows also written to steps.csv /
    epochs.csv (``step``, ``epoch``, the loss terms, ``lr``, ``images_per_s``, ``data_wait_s``; epoch
    rows carry ``last_step``), ``log_results`` with metrics.json's ``splits`` after evaluation, and
    ``close``. Optional packages are imported in ``start``, failing with a one-line
    :class:`e2kd.errors.ConfigError` naming the extra to install.
    """

    def start(self, run: TrackedRun) -> None:
        """Open the destination for ``run`` (resume it where ``run.state`` says one was started)."""

    def log_step(self, row: dict[str, float]) -> None:
        """One training step's scalars (``row["step"]`` is the global step, from 1)."""

    def log_epoch(self, row: dict[str, float]) -> None:
        """One epoch's means (``row["epoch"]`` from 1, ``row["last_step"]`` its last global step)."""

    def log_results(self, results: dict[str, dict[str, Any]]) -> None:
        """The evaluation: split -> metric -> value (numbers; curves and lists may be skipped)."""

    def close(self, failed: bool = False) -> None:
        """Flush and release the destination; ``failed``: training stopped on an error or an interrupt
        (mark the tracked run so, not finished)."""
