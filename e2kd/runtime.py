"""Where and how a run executes: the one place that decides the device (and, later, precision and
process group). Methods never look at it."""

from __future__ import annotations

import sys

import torch

from .config import ExperimentConfig


def device_of(config: ExperimentConfig) -> torch.device:
    """``train.device``, with ``auto`` = CUDA when available."""
    name = config.train.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def progress_enabled(config: ExperimentConfig) -> bool:
    """Progress bars: when asked for and stderr is a terminal."""
    return config.train.progress and sys.stderr.isatty()
