"""Similarity of the model's explanations to the teacher's, under any registered similarity."""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

import e2kd
from e2kd import hookimpl
from e2kd.api import EvalBatch, Metric


class ExplanationSimilarityOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    similarity: str = Field("cosine", description="name of a registered similarity")
    similarity_options: dict[str, Any] = Field(default_factory=dict, description="options of that similarity")


class ExplanationSimilarity(Metric):
    name = "explanation_similarity"
    description = "mean similarity of the model's explanations to the teacher's (teacher's top-1 class)"
    Options = ExplanationSimilarityOptions
    requires = frozenset({"explanations"})

    def __init__(self, options: BaseModel | None = None, **kwargs: Any) -> None:
        super().__init__(options, **kwargs)
        self.similarity = e2kd.get_similarity(self.options.similarity, **self.options.similarity_options)

    def per_sample(self, batch: EvalBatch) -> torch.Tensor:
        return self.similarity(batch.explanations, batch.teacher_explanations)


@hookimpl
def register_metrics(register) -> None:
    register(ExplanationSimilarity)
