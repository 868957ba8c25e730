"""Shared output of the benchmark scripts: JSON on stdout, optionally to a file (atomically)."""

from __future__ import annotations

import json
import platform
import sys

import torch

from e2kd.storage import atomic_write_json


def emit(result: dict, json_path: str | None) -> None:
    print(json.dumps(result, indent=2))
    if json_path:
        atomic_write_json(json_path, result)


def environment() -> dict:
    """What a benchmark ran on: the machine, torch's CPU threads and the versions."""
    return {
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "cpus": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
    }
