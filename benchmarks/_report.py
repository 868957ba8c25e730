"""Shared output of the benchmark scripts: JSON on stdout, optionally to a file (atomically)."""

from __future__ import annotations

import json

from e2kd.storage import atomic_write_json


def emit(result: dict, json_path: str | None) -> None:
    print(json.dumps(result, indent=2))
    if json_path:
        atomic_write_json(json_path, result)
