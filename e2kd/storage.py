"""Files written whole or not at all, and what differs between a stored record and today's.

Every file e2kd writes (run records, checkpoints, caches, reports, figures) goes through the atomic
writers here: a reader sees the old file or the whole new one, never a half-written one, and a
failed write leaves no temporary behind.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def describe_difference(
    stored: dict[str, Any], current: dict[str, Any], prefix: str = "", *, where: str = "in the cache"
) -> list[str]:
    """Human-readable list of what differs between two nested dicts."""
    changes = []
    for key in sorted(set(stored) | set(current)):
        a, b = stored.get(key), current.get(key)
        if a == b:
            continue
        path = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            changes += describe_difference(a, b, f"{path}.", where=where)
        elif key == "weights_sha256":
            changes.append(f"{prefix}weights (sha256 {str(a)[:10]}… {where}, {str(b)[:10]}… now)")
        elif _is_digest(a) and _is_digest(b):
            changes.append(f"{path} (sha256 {a[:10]}… {where}, {b[:10]}… now)")  # type: ignore[index]
        else:
            changes.append(f"{path} ({a!r} {where}, {b!r} now)")
    return changes


def _is_digest(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def e2kd_cache_dir() -> Path:
    """Where e2kd keeps caches unless told otherwise: ``$E2KD_CACHE_DIR``, else ``~/.cache/e2kd``."""
    return Path(os.environ.get("E2KD_CACHE_DIR") or Path.home() / ".cache" / "e2kd").expanduser()
