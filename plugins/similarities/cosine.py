"""Cosine similarity of flattened explanation maps (the paper's choice)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from e2kd import hookimpl
from e2kd.api import Similarity


class CosineOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    eps: float = Field(1e-8, gt=0, description="guards against zero norms (PyTorch's default)")


class Cosine(Similarity):
    name = "cosine"
    description = "cosine similarity of maps flattened over C x H x W"
    Options = CosineOptions
    differentiable = True
    higher_is_better = True

    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return F.cosine_similarity(a.flatten(1), b.flatten(1), dim=1, eps=self.options.eps)


@hookimpl
def register_similarities(register) -> None:
    register(Cosine)
