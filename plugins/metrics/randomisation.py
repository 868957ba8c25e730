"""Model-parameter randomisation test (Adebayo et al., 2018): an explanation that depends on what
the model learned changes when the learned weights are replaced by random ones.

The layers are the modules with a ``reset_parameters`` method (convolutions, linear layers,
normalisations; Quantus' rule), taken from the output down. Cascading: each step re-initialises one
more layer, keeping the earlier ones random; independent: each step re-initialises one layer of the
trained model alone. After each step the randomised copy explains the same images for the same
classes, and the similarity to the trained model's maps is averaged over samples: one value per
layer (a curve that should drop) and their mean.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any, Literal

import torch
from pydantic import BaseModel, Field
from torch import nn

import e2kd
from e2kd import hookimpl
from e2kd.api import EvalBatch
from e2kd.errors import ModelError

from .model_runs import ModelRunMetric, ModelRunOptions


class RandomisationOptions(ModelRunOptions):
    """Options of the ``model_randomisation`` metric."""

    order: Literal["cascading", "independent"] = Field(
        "cascading",
        description="cascading: layers randomised from the top down, cumulatively; independent: one at a time",
    )
    similarity: str = Field("spearman", description="registered similarity of the randomised and the trained maps")
    similarity_options: dict[str, Any] = Field(default_factory=dict, description="options of that similarity")
    seed: int = Field(0, description="torch is seeded with it before each layer is re-initialised")
    layers: list[str] | None = Field(
        None, description="names of the modules to randomise (default: every module with reset_parameters)"
    )


def randomisable_layers(model: nn.Module, names: list[str] | None = None) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of the modules with ``reset_parameters``, output first (the reverse of
    ``named_modules``' order); ``names`` picks some, in that order, and must all be such modules."""
    layers = [(n, m) for n, m in model.named_modules() if hasattr(m, "reset_parameters")][::-1]
    if names is None:
        return layers
    known = dict(layers)
    missing = [n for n in names if n not in known]
    if missing:
        raise ModelError(
            f"model_randomisation: layers {missing} are not modules with reset_parameters "
            f"(some that are: {', '.join(n for n, _ in layers[:5])})"
        )
    return [(n, m) for n, m in layers if n in names]


def reset_seeded(module: nn.Module, seed: int) -> None:
    """``module.reset_parameters()`` drawn on the CPU after ``torch.manual_seed(seed)`` — the same
    values on every device — without touching the caller's random state."""
    tensors = [*module.parameters(), *module.buffers()]
    device = tensors[0].device if tensors else torch.device("cpu")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module.to("cpu")
        module.reset_parameters()  # type: ignore[operator]
        module.to(device)


def randomised_models(
    model: nn.Module, order: str = "cascading", seed: int = 0, names: list[str] | None = None
) -> Iterator[tuple[str, nn.Module]]:
    """A copy of ``model`` (in eval mode) with one more layer re-initialised at each step
    (``cascading``), or with only that layer re-initialised (``independent``); ``model`` is untouched."""
    randomised = copy.deepcopy(model).eval()
    trained = {k: v.clone() for k, v in randomised.state_dict().items()} if order == "independent" else None
    for name, module in randomisable_layers(randomised, names):
        if trained is not None:
            randomised.load_state_dict(trained)
        reset_seeded(module, seed)
        yield name, randomised


class ModelRandomisation(ModelRunMetric):
    """Similarity of the maps of a progressively randomised model to the trained model's, per layer."""

    name = "model_randomisation"
    description = (
        "model-parameter randomisation test: similarity of the maps after re-initialising layers from the top down "
        "(cascading or independently) to the trained model's, per layer and mean (a similarity: lower is better)"
    )
    Options = RandomisationOptions
    category = "randomisation"

    def __init__(self, options: BaseModel | None = None, **kwargs: Any) -> None:
        super().__init__(options, **kwargs)
        self.similarity = e2kd.get_similarity(self.options.similarity, **self.options.similarity_options)

    @property
    def higher_is_better(self) -> bool:  # type: ignore[override]
        """A good explainer's maps stop resembling the trained model's: a low similarity (a high
        distance) is better."""
        return not self.similarity.higher_is_better

    @classmethod
    def capabilities(cls) -> dict[str, Any]:
        return {**super().capabilities(), "higher_is_better": "opposite of its similarity"}

    def detail(self) -> str:
        """The similarity's name and the order."""
        return f"{self.similarity.name}, {self.options.order}"

    def curve_labels(self) -> tuple[str, str]:
        what = "layer randomised, from the top" + (" (cumulative)" if self.options.order == "cascading" else "")
        return what, f"{self.similarity.name} to the trained model's maps"

    def reset(self) -> None:
        self._sums: dict[str, float] = {}
        self._count = 0

    def update(self, batch: EvalBatch) -> None:
        o = self.options
        classes, maps = self.explained(batch)
        for name, randomised in randomised_models(batch.model, o.order, o.seed, o.layers):  # type: ignore[arg-type]
            values = self.similarity(batch.explain(batch.images, classes, model=randomised), maps)  # type: ignore[misc]
            self._sums[name] = self._sums.get(name, 0.0) + float(values.double().sum())
        self._count += classes.shape[0]

    def compute(self) -> dict[str, Any]:
        if not self._count:
            return {}
        curve = {name: total / self._count for name, total in self._sums.items()}
        return {"mean": sum(curve.values()) / len(curve), "curve": curve}


@hookimpl
def register_metrics(register) -> None:
    register(ModelRandomisation)
