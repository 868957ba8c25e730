"""Run directories: atomic writes, the record of what produced a run, matching a run to its
config, and loading a finished run."""

from __future__ import annotations

import hashlib
import importlib.metadata as metadata
import json
import os
import platform
import shutil
import subprocess
import sys
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from .config import ExperimentConfig, MetricRef, dump_config, load_config, stored_config
from .data import ViewDataset, split_view
from .digests import cached_file_sha256
from .errors import ConfigError
from .evaluate import evaluate_model
from .models import build_from, load_teacher
from .plan import Plan, plan_run
from .registry import create, registry
from .runtime import Runtime, is_main_process, runtime_of
from .storage import atomic_write_json, atomic_write_text, describe_difference
from .tracking import STATE_FILE
from .weights import resolve as resolve_weights

if TYPE_CHECKING:
    from .api import Dataset, Explainer

#: Fields that do not change what a run computes (the device and memory format only its floating-point
#: rounding); a run directory is matched without them, so a run started on a CPU may resume on a GPU.
VOLATILE_FIELDS = (
    ("out_dir",),
    ("train", "progress"),
    ("train", "checkpoint_every"),
    ("train", "device"),
    ("train", "channels_last"),
    ("data", "num_workers"),
    ("train", "loggers"),
)


def run_identity(config: ExperimentConfig) -> dict[str, Any]:
    """The resolved config without :data:`VOLATILE_FIELDS`: what a run directory is matched by."""
    data = config.model_dump(mode="json")
    for keys in VOLATILE_FIELDS:
        node = data
        for key in keys[:-1]:
            node = node.get(key, {})
        node.pop(keys[-1], None)
    return data


def identity_digest(config: ExperimentConfig) -> str:
    """SHA-256 of :func:`run_identity`."""
    return hashlib.sha256(json.dumps(run_identity(config), sort_keys=True).encode()).hexdigest()


_PACKAGES = ("e2kd", "torch", "torchvision", "timm", "captum", "pluggy", "pydantic", "numpy")


def produced_by(config: ExperimentConfig) -> dict[str, Any]:
    """What besides the config decides a run's results: e2kd's version, the distribution and version
    of every plugin item the config names, and the SHA-256 of each checkpoint file it starts from
    (the teacher's, a student's initial weights) — for a weight name also the name and revision it
    resolved to. Stored in env.json; a run is reused only when it is the same now (a checkpoint file
    that is gone is not compared)."""
    plugins = {}
    for _, kind, ref in config.plugin_refs():
        info = registry().info(kind, ref.name)
        plugins[f"{kind} {ref.name}"] = f"{info.distribution} {info.version}" if info.version else info.distribution
    files, weights = {}, {}
    for role, ref in (("model", config.model), ("teacher", config.teacher)):
        if ref is None or ref.checkpoint is None:
            continue
        if ref.weight_name is not None:  # the file the name resolves to now, and its revision
            resolved = resolve_weights(ref.weight_name)
            files[role], weights[role] = resolved.sha256, resolved.record()
        elif ref.checkpoint_path.is_file():
            files[role] = cached_file_sha256(ref.checkpoint_path)
    return {
        "e2kd": _version("e2kd"),
        "plugins": plugins,
        "checkpoints": files,
        **({"weights": weights} if weights else {}),
    }


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def environment(seed: int) -> dict[str, Any]:
    """Seed, package versions, git revision and command line of this process."""
    versions = {name: _version(name) for name in _PACKAGES}
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
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=5,
        )
        return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _identity_problem(out: Path, config: ExperimentConfig) -> str | None:
    """None if ``out`` holds no config, or one with the same identity as ``config`` produced by the
    same code and checkpoints (:func:`produced_by`); else what differs."""
    existing = out / "config.yaml"
    if not existing.is_file():
        return None
    stored = stored_config(existing)
    if stored is None:
        return "its config.yaml no longer validates"
    if identity_digest(stored) != identity_digest(config):
        changes = describe_difference(run_identity(stored), run_identity(config), where="there")
    else:
        try:
            record = json.loads((out / "env.json").read_text()).get("produced_by")
        except (OSError, ValueError):
            record = None
        if record is None:
            return "it records no e2kd and plugin versions (written by an older e2kd)"
        now = produced_by(config)
        record = {
            **record,
            "checkpoints": {k: v for k, v in record.get("checkpoints", {}).items() if k in now["checkpoints"]},
        }
        changes = describe_difference(record, now, where="there")
        if not changes:
            return None
    return "; ".join(changes[:3]) + (f" (+{len(changes) - 3} more)" if len(changes) > 3 else "")


#: What a run directory holds once trained (removed by ``rerun``; config.yaml and env.json are rewritten).
TRAINED_FILES = ("model.pt", "checkpoint.pt", "metrics.json", "steps.csv", "epochs.csv")


def prepare_run_dir(config: ExperimentConfig, *, rerun: bool = False) -> Path:
    """Create ``config.out_dir`` with config.yaml and env.json; refuse one that holds a (partly)
    trained run of another config or of other code (compared by :func:`run_identity`,
    so output folder, progress bar and loader workers may differ, and :func:`produced_by`).
    ``rerun``: remove what an earlier run trained there and start over (not in a worker that torchrun
    restarted after a failure: that one resumes the rerun)."""
    out = Path(config.out_dir)
    if rerun and int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) == 0:  # a restarted worker resumes
        for name in TRAINED_FILES:
            (out / name).unlink(missing_ok=True)
        shutil.rmtree(out / "tensorboard", ignore_errors=True)
        (out / STATE_FILE).unlink(missing_ok=True)  # a rerun is a new tracked run
    problem = _identity_problem(out, config)
    trained = (out / "model.pt").is_file() or (out / "checkpoint.pt").is_file()
    if problem is not None and trained:
        raise ConfigError(
            f"{out}: run directory holds a different run ({problem}); train it again with --rerun, "
            f"choose another out_dir (--out) or delete it"
        )
    # a directory with nothing trained in it (e.g. left by a run that failed before its first
    # epoch) is simply taken over by this config
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.yaml", dump_config(config))
    atomic_write_json(out / "env.json", {**environment(config.seed), "produced_by": produced_by(config)})
    return out


def finished_results(config: ExperimentConfig) -> dict[str, Any] | None:
    """The metrics of a finished run of this config, made by the same code from the same
    checkpoints, in ``config.out_dir``; else None."""
    out = Path(config.out_dir)
    files = [out / "config.yaml", out / "model.pt", out / "metrics.json"]
    if all(f.is_file() for f in files) and _identity_problem(out, config) is None:
        return json.loads(files[2].read_text())
    return None


def reused(config: ExperimentConfig, rerun: bool = False) -> dict[str, Any] | None:
    """The results of a finished run of this config to reuse (None with ``rerun``), saying so in one line."""
    done = None if rerun else finished_results(config)
    if done is not None and is_main_process():
        print(
            f"e2kd: {config.out_dir} holds a finished run of this config (same e2kd, plugin versions and "
            f"checkpoints): reused, not trained again (--rerun trains it again)",
            file=sys.stderr,
        )
    return done


@dataclass
class LoadedRun:
    """A finished run directory, loaded: its config, trained model and (if any) teacher."""

    path: Path
    config: ExperimentConfig
    model: nn.Module
    teacher: nn.Module | None
    #: Device, precision and processes of everything run on the loaded models.
    runtime: Runtime

    @property
    def name(self) -> str:
        return self.path.name

    @cached_property
    def plan(self) -> Plan:
        """The run's evaluation, planned once: its dataset, evaluation explainer and similarity."""
        return plan_run(self.config, "evaluate")

    @property
    def dataset(self) -> Dataset:
        return self.plan.dataset

    @property
    def class_names(self) -> list[str]:
        return self.dataset.class_names()

    def split(self, name: str) -> ViewDataset:
        """One split of the run's dataset, un-augmented (the evaluation view)."""
        if name not in self.dataset.splits():
            raise ConfigError(
                f"{self.path}: dataset {self.dataset.name!r} has no split {name!r} "
                f"(known: {', '.join(self.dataset.splits())})"
            )
        return split_view(self.dataset, name, "eval")

    def explainer(self) -> Explainer:
        """The explainer the run evaluates with (eval.explainer, else distill.explainer)."""
        return self.plan.eval_explainer

    def evaluate(self, metrics: list[str] | None = None) -> dict[str, Any]:
        """Re-evaluate (optionally with other metrics; split over torchrun's processes); the main
        process rewrites the run's metrics.json."""
        refs = [MetricRef(name=m) for m in metrics] if metrics else None
        for ref in refs or []:
            create("metric", ref.name)  # unknown names fail here, with the known ones listed
        results = evaluate_model(self.plan, self.model, self.teacher, refs, runtime=self.runtime)
        previous = self.path / "metrics.json"
        if previous.is_file():
            results["history"] = json.loads(previous.read_text()).get("history", [])
        if self.runtime.is_main:
            atomic_write_json(previous, results)
        return results


def _moved_teacher(config: ExperimentConfig, run_dir: Path) -> ExperimentConfig:
    """If the teacher checkpoint is missing where the config says, look for it where it would be
    had it moved together with the run directory (e.g. a whole experiment folder copied)."""
    ckpt = config.teacher.checkpoint_path if config.teacher is not None else None
    if ckpt is None or ckpt.is_file():
        return config
    candidate = (run_dir / os.path.relpath(ckpt, Path(config.out_dir))).resolve()
    if not candidate.is_file():
        return config
    return config.model_copy(update={"teacher": config.teacher.model_copy(update={"checkpoint": candidate})})


def load_run(run_dir: str | Path, runtime: Runtime | None = None) -> LoadedRun:
    """Load a finished run (``config.yaml`` + ``model.pt``) for evaluation or a notebook, its models
    placed by ``runtime`` (default: the one its config asks for in this process)."""
    run_dir = Path(run_dir)
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise ConfigError(f"{run_dir}: not a run directory (no config.yaml)")
    config = _moved_teacher(load_config(config_path), run_dir.resolve())
    runtime = runtime or runtime_of(config)
    run = LoadedRun(run_dir, config, None, None, runtime)  # type: ignore[arg-type]
    run.model = runtime.model(build_from(config.model, run.dataset, run_dir / "model.pt")).eval()
    if config.teacher is not None:
        run.teacher = runtime.model(load_teacher(config, run.dataset)).eval()
    return run
