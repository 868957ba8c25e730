"""Accuracy and agreement per (label, group) cell, with worst-group and ID/OOD summaries.

A cell is a (label, group id) pair; for the built-in synthetic data the group is the
background type, for Waterbirds ``group = 2 * label + place``. A cell is in distribution
when the ``in_distribution`` option lists its group, else when the dataset marks its samples
so (waterbird on water, matching background), else when its group id equals its label.
"""

from __future__ import annotations

import torch
from pydantic import Field

from e2kd import hookimpl
from e2kd.api import EvalBatch, Metric, PluginOptions


class GroupOptions(PluginOptions):
    """Options of the group metrics."""

    in_distribution: list[int] | None = Field(
        None,
        description="group ids that are in distribution (default: as the dataset marks samples, else "
        "cells whose group equals the label)",
    )


class _GroupMetric(Metric):
    Options = GroupOptions
    requires = frozenset({"labels", "single_label", "groups"})

    def hits(self, batch: EvalBatch) -> torch.Tensor:
        raise NotImplementedError

    def reset(self) -> None:
        self._cells: dict[tuple[int, int], list[float]] = {}
        self._marked: dict[tuple[int, int], bool] = {}  # cell -> in distribution, as the dataset marks it

    def update(self, batch: EvalBatch) -> None:
        keys = torch.stack([batch.labels.view(-1), batch.groups.view(-1)], dim=1).cpu()
        hits = self.hits(batch).double().cpu()
        cells, inverse = torch.unique(keys, dim=0, return_inverse=True)
        sums = torch.zeros(len(cells), dtype=torch.float64).index_add_(0, inverse, hits)
        counts = torch.bincount(inverse).double()  # (every cell occurs: the last one has index len(cells) - 1)
        for (label, group), s, n in zip(cells.tolist(), sums.tolist(), counts.tolist()):
            total = self._cells.setdefault((label, group), [0.0, 0.0])
            total[0] += s
            total[1] += n
        if batch.in_distribution is not None:  # a cell is in distribution if the dataset marks its samples so
            flags = batch.in_distribution.view(-1).cpu().double()
            marked = torch.zeros(len(cells), dtype=torch.float64).index_add_(0, inverse, flags) > 0
            self._marked.update({tuple(cell): bool(m) for cell, m in zip(cells.tolist(), marked.tolist())})

    def _is_id(self, label: int, group: int) -> bool:
        listed = self.options.in_distribution
        if listed is not None:
            return group in listed
        return self._marked.get((label, group), group == label)

    def compute(self) -> dict[str, float]:
        if not self._cells:
            return {}
        values = {cell: s / n for cell, (s, n) in self._cells.items()}
        out = {"worst_group": min(values.values()), "mean_group": sum(values.values()) / len(values)}
        for name, want in (("in_distribution", True), ("out_of_distribution", False)):
            chosen = [(s, n) for cell, (s, n) in self._cells.items() if self._is_id(*cell) == want]
            if chosen:
                out[name] = sum(s for s, _ in chosen) / sum(n for _, n in chosen)
        out.update({f"y{label}_g{group}": v for (label, group), v in sorted(values.items())})
        return out


class GroupAccuracy(_GroupMetric):
    """Accuracy per (label, group) cell: worst, mean, in- and out-of-distribution groups."""

    name = "group_accuracy"
    description = "accuracy per (label, group) cell; worst-group, mean-group, in- and out-of-distribution"

    def hits(self, batch: EvalBatch) -> torch.Tensor:
        return batch.logits.argmax(1) == batch.labels


class GroupAgreement(_GroupMetric):
    """Teacher agreement per (label, group) cell: worst, mean, in- and out-of-distribution groups."""

    name = "group_agreement"
    description = "teacher agreement per (label, group) cell; worst-group, mean-group, in- and out-of-distribution"
    requires = frozenset({"labels", "groups", "teacher"})
    category = "agreement"

    def hits(self, batch: EvalBatch) -> torch.Tensor:
        return batch.logits.argmax(1) == batch.teacher_logits.argmax(1)


@hookimpl
def register_metrics(register) -> None:
    register(GroupAccuracy)
    register(GroupAgreement)
