"""Seeded per-class subsets of a split: the k-shot training images and the held-out ones."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import DataError


def per_class_draw(
    labels: Sequence[int], class_names: Sequence[str], *, shots: int | None, holdout: int, seed: int, where: str
) -> tuple[list[int], list[int]]:
    """(held-out, training) sample indices: per class, a permutation seeded by ``(seed, class)`` whose
    first ``holdout`` entries are held out and the next ``shots`` (all the rest if None) train, each
    list in sample order. For one seed the draws are nested (the 50 shots are part of the 200).
    A class with fewer than ``holdout + shots`` samples is a :class:`DataError` naming ``where/<class>``."""
    by_class: dict[int, list[int]] = {}
    for index, label in enumerate(labels):
        by_class.setdefault(int(label), []).append(index)
    held, train = [], []
    for label, name in enumerate(class_names):
        members = by_class.get(label, [])
        need = holdout + (shots or 1)
        if len(members) < need:
            raise DataError(
                f"{where}/{name}: {len(members)} images, fewer than holdout_per_class + shots = {need}; "
                f"lower data.options.shots or holdout_per_class"
            )
        order = np.random.default_rng([seed, label]).permutation(len(members))
        take = order[holdout:] if shots is None else order[holdout : holdout + shots]
        held += [members[i] for i in sorted(order[:holdout])]
        train += [members[i] for i in sorted(take)]
    return held, train
