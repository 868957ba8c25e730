"""``e2kd export RUN``: a trained student as a folder that timm and the Hugging Face hub understand.

The folder holds ``config.json`` (timm's layout: architecture, classes and their names, mean/std,
the eval preprocessing, and an ``e2kd`` section with the builder and options), ``model.safetensors``
and a model card ``README.md`` (the run's metrics, config, teacher by name and SHA-256, e2kd version).
A student built by the ``timm`` builder opens with ``timm.create_model("local-dir:FOLDER", pretrained=True)`` (or
``hf-hub:REPO`` once pushed) and takes images normalised with the stored mean/std; every student opens
with :func:`load_exported`, which takes [0, 1] images like every e2kd model.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from . import __version__
from .config import ExperimentConfig, dump_config, load_config
from .data.augment import EVAL_RESIZE_RATIO
from .errors import ConfigError, ModelError

CONFIG_FILE, WEIGHTS_FILE, CARD_FILE = "config.json", "model.safetensors", "README.md"


def export_run(run_dir: str | Path, out: str | Path | None = None, *, force: bool = False) -> Path:
    """Write the student of the finished run ``run_dir`` to ``out`` (default ``RUN/export``), whole or not at all."""
    from .data import dataset_of
    from .models import build_from

    run_dir = Path(run_dir)
    for name in ("config.yaml", "model.pt"):
        if not (run_dir / name).is_file():
            raise ConfigError(f"{run_dir}: not a finished run (no {name}); train it first")
    out = Path(out) if out is not None else run_dir / "export"
    if out.exists() and any(out.iterdir()) and not force:
        raise ConfigError(f"{out}: exists and is not empty; choose another --out or pass --force to replace it")
    config = load_config(run_dir / "config.yaml")
    dataset = dataset_of(config)
    model = build_from(config.model, dataset, run_dir / "model.pt").eval()
    metrics = _read_json(run_dir / "metrics.json")
    env = _read_json(run_dir / "env.json")
    files = {
        CONFIG_FILE: (
            json.dumps(hub_config(config, model, dataset.class_names(), dataset.image_size), indent=2) + "\n"
        ).encode(),
        WEIGHTS_FILE: _safetensors_bytes(model),
        CARD_FILE: model_card(config, metrics, env, run_dir.name).encode(),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        for name, data in files.items():
            (staging / name).write_bytes(data)
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def hub_config(config: ExperimentConfig, model: nn.Module, class_names: list[str], image_size: int) -> dict[str, Any]:
    """``config.json`` in timm's layout (``architecture``, ``num_classes``, ``pretrained_cfg``, ...)."""
    mean, std = _normalisation(model)
    timm_arch = _timm_arch(config)
    head = getattr(model, "pretrained_cfg", {}) or {}
    pretrained_cfg = {
        "input_size": [3, image_size, image_size],
        "interpolation": "bilinear",
        "crop_pct": round(1 / EVAL_RESIZE_RATIO, 4),
        "crop_mode": "center",
        "mean": mean,
        "std": std,
        "num_classes": len(class_names),
        **{k: head[k] for k in ("first_conv", "classifier") if head.get(k)},
    }
    return {
        "architecture": timm_arch or config.model.name,
        "num_classes": len(class_names),
        **({"num_features": int(model.num_features)} if hasattr(model, "num_features") else {}),
        **({"model_args": config.model.options.get("kwargs", {})} if timm_arch else {}),
        "pretrained_cfg": pretrained_cfg,
        "label_names": class_names,
        "e2kd": {
            "version": __version__,
            "builder": config.model.name,
            "options": config.model.options,
            "inputs": "e2kd models take [0, 1] images; timm's takes them normalised with pretrained_cfg mean/std",
        },
    }


def load_exported(folder: str | Path) -> nn.Module:
    """An exported student as an e2kd model (taking [0, 1] images), from ``config.json`` + ``model.safetensors``."""
    from .models import build_model

    folder = Path(folder)
    config = _read_json(folder / CONFIG_FILE)
    if "e2kd" not in config:
        raise ModelError(f"{folder}: no e2kd section in {CONFIG_FILE} (not exported by `e2kd export`)")
    e2kd = config["e2kd"]
    return build_model(e2kd["builder"], e2kd["options"], int(config["num_classes"]), folder / WEIGHTS_FILE).eval()


def push_to_hub(folder: str | Path, repo: str, *, private: bool = False) -> str:
    """Upload an exported folder to the Hugging Face hub repository ``repo`` (created if missing)."""
    from .weights import offline

    if offline():
        raise ConfigError(f"--push {repo}: downloads and uploads are off (HF_HUB_OFFLINE=1); unset it to push")
    try:
        from huggingface_hub import HfApi
    except ImportError:
        raise ConfigError("--push needs huggingface_hub (pip install huggingface_hub)") from None
    api = HfApi()
    try:
        api.create_repo(repo, private=private, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo, commit_message="e2kd export")
    except Exception as exc:  # network, authentication: one line, the export itself is kept
        raise ConfigError(
            f"--push {repo}: the upload failed ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
            f"the export in {folder} is complete — log in (`hf auth login`) and push again"
        ) from None
    return f"https://huggingface.co/{repo}"


def model_card(config: ExperimentConfig, metrics: dict[str, Any], env: dict[str, Any], run_name: str) -> str:
    """The README.md of an export: hub metadata, how to load it, metrics, teacher, config."""
    produced = env.get("produced_by", {})
    timm_student = config.model.name == "timm"
    front = {
        "tags": ["image-classification", "knowledge-distillation", "e2kd", *(["timm"] * timm_student)],
        **({"library_name": "timm"} if timm_student else {}),
    }
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "", f"# {run_name}", ""]
    if config.teacher is None:
        how = "trained on labels"
    elif config.distill.lam > 0:
        how = "distilled with e2KD, explanation-enhanced knowledge distillation (Good Teachers Explain, ECCV 2024)"
    else:
        how = "distilled with plain KD"
    lines += [f"A model made with e2kd {__version__}: {how}.", ""]
    lines += ["## Load it", ""]
    if timm_student:
        lines += [
            "```python",
            "import timm",
            'model = timm.create_model("local-dir:THIS_FOLDER", pretrained=True)  # or "hf-hub:REPO" once pushed',
            "# inputs normalised with pretrained_cfg mean/std (config.json)",
            "```",
            "",
        ]
    lines += [
        "```python",
        "from e2kd.export import load_exported",
        'model = load_exported("THIS_FOLDER")  # takes [0, 1] images',
        "```",
        "",
    ]
    lines += ["## Teacher", ""]
    if config.teacher is None:
        lines += ["None (trained with labels).", ""]
    else:
        named = produced.get("weights", {}).get("teacher", {})
        sha = produced.get("checkpoints", {}).get("teacher")
        lines += [
            f"- model: `{config.teacher.name}` {json.dumps(config.teacher.options)}",
            f"- weights: `{config.teacher.checkpoint}`"
            + (f" (revision `{named['revision']}`)" if named.get("revision") else ""),
            f"- SHA-256: `{sha}`" if sha else "- SHA-256: not recorded",
            "",
        ]
    lines += ["## Metrics", ""]
    rows = [
        (split, key, value)
        for split, values in metrics.get("splits", {}).items()
        if isinstance(values, dict)
        for key, value in values.items()
        if isinstance(value, (int, float)) and not isinstance(value, bool)
    ]
    if rows:
        lines += ["| split | metric | value |", "|---|---|---|", *[f"| {s} | {k} | {v:.4g} |" for s, k, v in rows], ""]
    else:
        lines += ["No metrics recorded.", ""]
    lines += ["## Config", "", "```yaml", dump_config(config).strip(), "```", ""]
    versions = env.get("packages", {})
    if versions:
        lines += ["## Environment", "", ", ".join(f"{k} {v}" for k, v in versions.items() if v), ""]
    return "\n".join(lines)


def _timm_arch(config: ExperimentConfig) -> str | None:
    """The timm architecture of a student built by the ``timm`` builder (its validated options), else None."""
    from .registry import registry

    if config.model.name != "timm":
        return None
    return str(registry().validate_options("model", "timm", config.model.options).arch)  # type: ignore[attr-defined]


def _normalisation(model: nn.Module) -> tuple[list[float], list[float]]:
    """The mean/std a model normalises its [0, 1] input with (identity when it does not)."""
    mean, std = getattr(model, "input_mean", None), getattr(model, "input_std", None)
    if mean is None or std is None:
        return [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]
    return mean.flatten().tolist(), std.flatten().tolist()


def _safetensors_bytes(model: nn.Module) -> bytes:
    from safetensors.torch import save

    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    return save(state, metadata={"format": "pt"})


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
