"""Base classes that plugins subclass: explainers, similarities, metrics, model builders.

The core only talks to these interfaces; concrete methods live in plugins.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterator

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn


class NoOptions(BaseModel):
    """Options model of a plugin item that takes none."""

    model_config = ConfigDict(extra="forbid")


class PluginItem:
    """What every registered item declares about itself."""

    kind: ClassVar[str] = ""
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
        self, logits: torch.Tensor, target: torch.Tensor, *, create_graph: bool = False
    ) -> torch.Tensor:
        """Explanation (B, C, H, W) of ``logits[i, target[i]]`` from the captured forward."""
        raise NotImplementedError


class Explainer(PluginItem):
    """An explanation method, applied to the forward pass that training already runs.

    Usage (what the distiller does)::

        with explainer.capture(model, x) as cap:
            logits = model(cap.inputs)
        maps = cap.explain(logits, target, create_graph=True)
    """

    kind = "explainer"
    #: The map is differentiable w.r.t. the model parameters (usable for e2KD training).
    differentiable: ClassVar[bool] = True
    #: The method reads a layer of the model (option ``layer``).
    needs_layer: ClassVar[bool] = False
    #: Model forwards per explanation beyond the training forward.
    extra_forwards: ClassVar[int] = 0
    #: Channels of the returned map (None: as many as the input has).
    output_channels: ClassVar[int | None] = 1

    @classmethod
    def capabilities(cls) -> dict[str, Any]:
        return {
            "differentiable": cls.differentiable,
            "needs_layer": cls.needs_layer,
            "extra_forwards": cls.extra_forwards,
            "output_channels": cls.output_channels,
        }

    def check_model(self, model: nn.Module) -> None:
        """Raise :class:`e2kd.errors.ModelError` if this explainer cannot explain ``model``."""

    @contextlib.contextmanager
    def capture(
        self, model: nn.Module, inputs: torch.Tensor, *, trainable: bool = True
    ) -> Iterator[Capture]:
        """Install what the method needs around one forward of ``model`` and remove it on exit.

        ``trainable=False`` promises that the explanation will not be back-propagated
        into the model (a frozen teacher), which lets methods skip building graphs.
        """
        raise NotImplementedError
        yield  # pragma: no cover

    def explain(
        self, model: nn.Module, inputs: torch.Tensor, target: torch.Tensor | int | None = None
    ) -> torch.Tensor:
        """Convenience for notebooks: explain ``target`` (default: the top-1 class), detached."""
        with torch.enable_grad():
            with self.capture(model, inputs, trainable=False) as cap:
                logits = model(cap.inputs)
            if target is None:
                target = logits.argmax(1)
            elif isinstance(target, int):
                target = torch.full((inputs.shape[0],), target, dtype=torch.long, device=inputs.device)
            return cap.explain(logits, target, create_graph=False).detach()


class Similarity(PluginItem):
    """Per-sample similarity of two explanation batches: (B, ...) x (B, ...) -> (B,)."""

    kind = "similarity"
    differentiable: ClassVar[bool] = True
    higher_is_better: ClassVar[bool] = True

    @classmethod
    def capabilities(cls) -> dict[str, Any]:
        return {"differentiable": cls.differentiable, "higher_is_better": cls.higher_is_better}

    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def loss(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """Per-sample loss: ``1 - sim`` if higher is better, else ``sim``."""
        value = self(student, teacher)
        return 1.0 - value if self.higher_is_better else value


@dataclass
class EvalBatch:
    """One evaluated batch; fields a dataset or setting lacks are None.

    ``explanations``/``teacher_explanations`` are the model's and the teacher's maps for the
    teacher's top-1 class; ``label_explanations`` the model's maps for the label class.
    ``images``, ``model`` and ``explainer`` let a metric run the model itself (e.g. on
    shifted images).
    """

    logits: torch.Tensor
    labels: torch.Tensor | None = None
    teacher_logits: torch.Tensor | None = None
    explanations: torch.Tensor | None = None
    teacher_explanations: torch.Tensor | None = None
    label_explanations: torch.Tensor | None = None
    masks: torch.Tensor | None = None
    groups: torch.Tensor | None = None
    images: torch.Tensor | None = None
    model: nn.Module | None = None
    explainer: "Explainer | None" = None

    def available(self) -> set[str]:
        """Names of the requirements this batch can satisfy."""
        have = {
            "labels": self.labels is not None,
            "teacher": self.teacher_logits is not None,
            "explanations": self.explanations is not None and self.teacher_explanations is not None,
            "label_explanations": self.label_explanations is not None,
            "masks": self.masks is not None,
            "groups": self.groups is not None,
            "model": self.images is not None and self.model is not None and self.explainer is not None,
        }
        return {name for name, ok in have.items() if ok}


#: Every requirement a metric may declare (see :meth:`EvalBatch.available`).
REQUIREMENTS = frozenset({"labels", "teacher", "explanations", "label_explanations", "masks", "groups", "model"})


class Metric(PluginItem):
    """A metric accumulated over batches. The default averages ``per_sample`` values.

    Override ``update``/``compute`` for metrics that are not sample means; ``compute`` may
    return a dict of named values (e.g. per group).
    """

    kind = "metric"
    #: Data the metric needs: any of :data:`REQUIREMENTS`.
    requires: ClassVar[frozenset[str]] = frozenset()
    higher_is_better: ClassVar[bool] = True

    def __init__(self, options: BaseModel | None = None, **kwargs: Any) -> None:
        super().__init__(options, **kwargs)
        self.reset()

    @classmethod
    def capabilities(cls) -> dict[str, Any]:
        return {"requires": sorted(cls.requires), "higher_is_better": cls.higher_is_better}

    def reset(self) -> None:
        self._total = 0.0
        self._count = 0

    def per_sample(self, batch: EvalBatch) -> torch.Tensor:
        """Per-sample values (B,) for this batch; batch-native, no Python loop over samples."""
        raise NotImplementedError

    def update(self, batch: EvalBatch) -> None:
        values = self.per_sample(batch).detach().double()
        self._total += float(values.sum())
        self._count += values.numel()

    def compute(self) -> float | dict[str, float]:
        return self._total / self._count if self._count else float("nan")


class ModelBuilder(PluginItem):
    """Builds an image classifier (images -> logits) from its options."""

    kind = "model"

    def build(self, num_classes: int) -> nn.Module:
        raise NotImplementedError

    @classmethod
    def define(
        cls, name: str, description: str, build: Callable[[BaseModel, int], nn.Module],
        options: type[BaseModel] = NoOptions,
    ) -> type["ModelBuilder"]:
        """A registrable builder class whose ``build(num_classes)`` calls ``build(options, num_classes)``
        (for families of architectures that differ only in a few numbers)."""
        return type(f"{name}_builder", (cls,), {
            "name": name, "description": description, "Options": options,
            "build": lambda self, num_classes: build(self.options, num_classes),
        })
