"""Similarity of the model's explanations to the teacher's, under any registered similarity."""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, Field, model_validator

import e2kd
from e2kd import hookimpl
from e2kd.api import EvalBatch, Metric, PluginOptions, Similarity


class ExplanationSimilarityOptions(PluginOptions):
    """Options of the ``explanation_similarity`` metric."""

    similarity: str | None = Field(
        None,
        description="name of a registered similarity (default: the run's training "
        "similarity with its options, else cosine)",
    )
    similarity_options: dict[str, Any] = Field(default_factory=dict, description="options of that similarity")

    @model_validator(mode="after")
    def _options_need_a_name(self) -> ExplanationSimilarityOptions:
        if self.similarity_options and self.similarity is None:
            raise ValueError("similarity_options needs similarity (the name of the similarity they configure)")
        return self


class ExplanationSimilarity(Metric):
    """Mean similarity of the model's explanations to the teacher's, for the teacher's top-1 class."""

    name = "explanation_similarity"
    description = "mean similarity of the model's explanations to the teacher's (teacher's top-1 class)"
    Options = ExplanationSimilarityOptions
    requires = frozenset({"explanations"})
    category = "agreement"

    def __init__(self, options: BaseModel | None = None, **kwargs: Any) -> None:
        super().__init__(options, **kwargs)
        self.similarity = e2kd.get_similarity(self.options.similarity or "cosine", **self.options.similarity_options)

    @classmethod
    def capabilities(cls) -> dict[str, Any]:
        return {**super().capabilities(), "higher_is_better": "as its similarity"}

    @property
    def higher_is_better(self) -> bool:  # type: ignore[override]
        """The direction of the similarity it averages (a distance: lower is better)."""
        return self.similarity.higher_is_better

    def bind(self, *, similarity: Similarity | None = None) -> None:
        if self.options.similarity is None and similarity is not None:
            self.similarity = similarity  # the run's training similarity, with its options

    def detail(self) -> str:
        """The similarity's name."""
        return self.similarity.name

    def per_sample(self, batch: EvalBatch) -> torch.Tensor:
        return self.similarity(batch.explanations, batch.teacher_explanations)


@hookimpl
def register_metrics(register) -> None:
    register(ExplanationSimilarity)
