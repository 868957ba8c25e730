"""Built-in data: a deterministic synthetic shapes-on-backgrounds generator."""

from .synthetic import BACKGROUNDS, SHAPES, SyntheticShapes

__all__ = ["SyntheticShapes", "SHAPES", "BACKGROUNDS"]
