"""Run directories: atomic writes, and the record of what produced a run."""

from __future__ import annotations

import importlib.metadata as metadata
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from .config import ExperimentConfig, describe_difference, dump_config, identity_digest, run_identity, stored_config
from .errors import ConfigError

_PACKAGES = ("e2kd", "torch", "torchvision", "timm", "captum", "pluggy", "pydantic", "numpy")


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


def environment(seed: int) -> dict[str, Any]:
    """Seed, package versions, git revision and command line of this process."""
    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "seed": seed,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": versions,
        "git_revision": git_revision(),
        "command": sys.argv,
    }


def git_revision() -> str | None:
    """The e2kd source tree's git revision (with '-dirty' if modified), or None."""
    root = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True, timeout=5)
        return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _identity_problem(out: Path, config: ExperimentConfig) -> str | None:
    """None if ``out`` holds no config or one with the same identity as ``config``, else what differs."""
    existing = out / "config.yaml"
    if not existing.is_file():
        return None
    stored = stored_config(existing)
    if stored is None:
        return "its config.yaml no longer validates"
    if identity_digest(stored) == identity_digest(config):
        return None
    changes = describe_difference(run_identity(stored), run_identity(config), where="there")
    return "; ".join(changes[:3]) + (f" (+{len(changes) - 3} more)" if len(changes) > 3 else "")


def prepare_run_dir(config: ExperimentConfig) -> Path:
    """Create ``config.out_dir`` with config.yaml and env.json; refuse one that holds a run of
    another config (compared by :func:`e2kd.config.run_identity`, so output folder, progress bar
    and loader workers may differ)."""
    out = Path(config.out_dir)
    problem = _identity_problem(out, config)
    if problem is not None:
        raise ConfigError(f"{out}: run directory holds a different run ({problem}); "
                          f"choose another out_dir (--out) or delete it")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.yaml", dump_config(config))
    atomic_write_json(out / "env.json", environment(config.seed))
    return out


def finished_results(config: ExperimentConfig) -> dict[str, Any] | None:
    """The metrics of a finished run of this config in ``config.out_dir``, else None."""
    out = Path(config.out_dir)
    files = [out / "config.yaml", out / "model.pt", out / "metrics.json"]
    if all(f.is_file() for f in files) and _identity_problem(out, config) is None:
        return json.loads(files[2].read_text())
    return None
