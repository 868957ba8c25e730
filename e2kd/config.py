"""One YAML file = one experiment, validated by pydantic.

Plugins are named by string; their options are validated by the plugin's own
``Options`` model when the config is loaded, so a typo fails before anything runs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from .errors import ConfigError, E2KDError
from .registry import create, format_validation_error, registry, validate_options


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PluginRef(StrictModel):
    """A registered item by name, with its options. YAML may give just the name."""

    name: str
    options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _from_name(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value


class MetricRef(PluginRef):
    """A registered metric by name with its options, and optionally the key of its results (``as``)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    as_: str | None = Field(
        None,
        alias="as",
        min_length=1,
        description="key of its results in metrics.json and report.md (default: its name, with its options "
        "written out where one metric is listed twice)",
    )

    @model_serializer(mode="wrap")
    def _dump(self, handler: Any) -> dict[str, Any]:
        data = handler(self)
        key = data.pop("as_", None)
        return data | ({"as": key} if key is not None else {})


def metric_keys(refs: list[PluginRef]) -> list[str]:
    """The key of each metric in the results: its ``as`` name, else its name — written with its
    options where one name is given with different options (``explanation_similarity[similarity=l2]``)."""
    names = [ref.name for ref in refs]
    keys = []
    for ref in refs:
        options = ",".join(
            f"{k}={json.dumps(v, sort_keys=True) if not isinstance(v, str) else v}"
            for k, v in sorted(ref.options.items())
        )
        explicit = getattr(ref, "as_", None)
        keys.append(explicit or (f"{ref.name}[{options}]" if names.count(ref.name) > 1 and options else ref.name))
    return keys


def _absolute(path: Path | None) -> Path | None:
    """Paths are resolved when a config is loaded, so a run directory's config works from anywhere."""
    return Path(path).expanduser().resolve() if path is not None else None


class ModelConfig(PluginRef):
    """A registered model builder, optionally with weights: a local file, or a weight name."""

    checkpoint: Path | str | None = Field(
        None,
        description="weights: a state-dict file (path), or a weight name <source>:<spec> such as "
        "hf-hub:timm/resnet34.tv_in1k, torchvision:ResNet34_Weights.IMAGENET1K_V1, bcos-v2:resnet_34",
    )

    @field_validator("checkpoint", mode="before")
    @classmethod
    def _resolve(cls, value: Any) -> Path | str | None:
        from .weights import is_weight_name

        if is_weight_name(value):
            return str(value)
        return _absolute(value)

    @property
    def checkpoint_path(self) -> Path | None:
        """The checkpoint as a local file when it is one (None for a weight name or no checkpoint)."""
        return self.checkpoint if isinstance(self.checkpoint, Path) else None

    @property
    def weight_name(self) -> str | None:
        """The checkpoint when it is a weight name (``<source>:<spec>``), else None."""
        return self.checkpoint if isinstance(self.checkpoint, str) else None


#: Keys of the config format before datasets were plugins (``data: {num_classes: ...}``).
_LEGACY_SYNTHETIC_KEYS = {"kind", "num_classes", "image_size", "train_per_class", "test_per_class", "bias"}


class DataConfig(PluginRef):
    """A registered dataset by name, with its options (``e2kd plugins --kind dataset``)."""

    name: str = "synthetic"
    seed: int = Field(0, description="draws subsets (shots, held-out images) and generated data")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes (results do not depend on it)")
    cache: Literal["none", "decoded"] = Field(
        "none",
        description="decoded: train from the training split decoded once into a uint8 memory-mapped file "
        "(`e2kd prepare`), augmented per sample on the training device",
    )
    cache_dir: Path | None = Field(
        None,
        description="where decoded caches go, one folder per split named by its fingerprint "
        "(default: $E2KD_CACHE_DIR or ~/.cache/e2kd)",
    )
    decode: Literal["cpu", "device"] = Field(
        "cpu",
        description="device: training images travel as their JPEG bytes and are decoded on the training device "
        "(nvJPEG on CUDA), augmented there per sample (for data too large for data.cache: decoded)",
    )
    short_side: int | None = Field(
        None, ge=8, description="short side of the images in the decoded cache (default: image_size * 256 / 224)"
    )

    @model_validator(mode="before")
    @classmethod
    def _legacy_synthetic(cls, value: Any) -> Any:
        """Read the earlier ``data: {num_classes: 4, bias: 0.95, ...}`` form as the synthetic dataset."""
        if isinstance(value, dict) and "name" not in value and set(value) & _LEGACY_SYNTHETIC_KEYS:
            rest = {k: v for k, v in value.items() if k not in ("seed", "num_workers", "kind")}
            kept = {k: value[k] for k in ("seed", "num_workers") if k in value}
            return {"name": "synthetic", "options": rest, **kept}
        return value

    @field_validator("cache_dir")
    @classmethod
    def _resolve(cls, value: Path | None) -> Path | None:
        return _absolute(value)

    @model_validator(mode="after")
    def _one_decoder(self) -> DataConfig:
        if self.decode == "device" and self.cache == "decoded":
            raise ValueError("data.decode: device decodes files per batch, data.cache: decoded never decodes; pick one")
        return self


class DistillConfig(StrictModel):
    temperature: float = Field(1.0, gt=0)
    lam: float = Field(1.0, ge=0, description="weight of the explanation term (0 = plain KD)")
    ce_weight: float = Field(0.0, ge=0, description="weight of the label cross-entropy (the paper uses 0)")
    explainer: PluginRef = PluginRef(name="gradcam")
    similarity: PluginRef = PluginRef(name="cosine")
    teacher_mode: Literal["live", "frozen"] = Field(
        "live", description="frozen: replay teacher logits and maps precomputed once per training image"
    )
    cache_dir: Path | None = Field(
        None, description="frozen-teacher cache (default: next to the teacher checkpoint, named by fingerprint)"
    )
    kd: Literal["auto", "softmax", "binary"] = Field(
        "auto", description="KD term: softmax KL, or per-class binary KL on sigmoids (auto: from the dataset's labels)"
    )
    cache_dtype: Literal["float16", "float32"] = "float16"
    shard_size: int = Field(512, ge=1, description="samples per cache shard")
    explain_classes: Literal["auto", "top1", "label", "topk", "all", "positive"] = Field(
        "auto",
        description="classes whose explanations are matched (loss averaged over them); auto: top1 for "
        "single-label data (the paper), positive (teacher logit > 0) for multi-label data",
    )
    top_k: int = Field(2, ge=1, description="k for explain_classes: topk")
    explain_every: int = Field(
        1,
        ge=1,
        description="compute the explanation term on every K-th step only "
        "(plain KD in between; the paper's code: 16 for ResNets, 4 for ViTs)",
    )
    feature_resolution: bool = Field(
        True,
        description="compare bilinearly upsampled maps at the explainer's feature resolution when the explainer "
        "and the similarity support it (the same value, computed exactly; false: form the upsampled maps)",
    )

    @model_validator(mode="after")
    def _frozen_is_top1(self) -> DistillConfig:
        if self.teacher_mode == "frozen" and self.explain_classes not in ("auto", "top1"):
            raise ValueError("a frozen teacher caches top-1 maps only: use explain_classes: top1 or teacher_mode: live")
        return self

    @field_validator("cache_dir")
    @classmethod
    def _resolve(cls, value: Path | None) -> Path | None:
        return _absolute(value)


class GuidanceConfig(StrictModel):
    """Model guidance of a teacher (Rao et al., ICCV 2023; see e2kd.guidance)."""

    loss: Literal["energy", "l1"] = Field(
        "energy",
        description="energy: 1 - share of positive attribution inside "
        "the boxes; l1: normalised attribution outside them",
    )
    weight: float = Field(1.0, gt=0, description="weight of the guidance term beside the classification loss")
    explainer: PluginRef = Field(
        PluginRef(name="gradcam"),
        description="a differentiable explainer giving one-channel maps (bcos: contribution: true)",
    )
    annotated_fraction: float = Field(
        1.0, gt=0, le=1, description="share of training images whose masks are used (a seeded subset)"
    )


class TrainConfig(StrictModel):
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    optimizer: Literal["adamw", "sgd"] = "adamw"
    schedule: Literal["cosine", "constant"] = "cosine"
    warmup_epochs: int = Field(0, ge=0, description="linear learning-rate warm-up before the schedule (the paper: 5)")
    augment: Literal["auto", "none", "flip", "flip_crop", "resized_crop_flip"] = Field(
        "auto", description="training geometry (auto: the dataset's default; see docs/datasets.md)"
    )
    color_jitter: float = Field(
        0.0, ge=0, description="photometric jitter strength (image only, never the teacher map)"
    )
    device: str = Field("auto", description="cpu, cuda, cuda:N, ... (auto: CUDA when available)")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32",
        description="autocast precision of the forward and explanations; losses in float32; fp16 adds loss scaling",
    )
    channels_last: bool | None = Field(
        None, description="channels-last memory format for models and batches (default: on for CUDA)"
    )
    checkpoint_every: int | None = Field(
        None, ge=1, description="save a resumable checkpoint every N steps (default: at the end of each epoch)"
    )
    progress: bool = True
    guidance: GuidanceConfig | None = Field(
        None,
        description="guide the explanations of a model trained by train-teacher towards the dataset's boxes or masks",
    )
    mixup: float | None = Field(
        None,
        gt=0,
        description="mixup alpha: each step trains on lam*x + (1-lam)*x[perm], "
        "lam ~ Beta(alpha, alpha); distilling, the teacher sees the same "
        "mixed image (the paper: Waterbirds)",
    )
    loggers: list[PluginRef] | None = Field(
        None,
        description="where training logs go (e2kd plugins --kind tracker): csv, tensorboard, mlflow, wandb, ... "
        "(default: csv, and tensorboard when installed)",
    )


class EvalConfig(StrictModel):
    metrics: list[MetricRef] = Field(
        default_factory=lambda: [MetricRef(name=n) for n in ("accuracy", "agreement", "explanation_similarity")]
    )
    explainer: PluginRef | None = Field(
        None, description="explainer for explanation metrics (default: distill.explainer)"
    )
    splits: list[str] | None = Field(None, description="splits to evaluate (default: the dataset's evaluation splits)")

    @model_validator(mode="after")
    def _distinct_keys(self) -> EvalConfig:
        keys = metric_keys(self.metrics)  # type: ignore[arg-type]
        twice = next((k for k in keys if keys.count(k) > 1), None)
        if twice is not None:
            raise ValueError(f"metrics: two entries store their results as {twice!r}; give one of them `as: <key>`")
        return self


class ExperimentConfig(StrictModel):
    seed: int = 0
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig(name="small_resnet")
    teacher: ModelConfig | None = None
    distill: DistillConfig = DistillConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    out_dir: Path = Field(Path("runs/experiment"), validate_default=True)
    _source: str = PrivateAttr("config")

    @property
    def source(self) -> str:
        """Where the config came from (its file), for error messages."""
        return self._source

    @field_validator("out_dir")
    @classmethod
    def _resolve(cls, value: Path) -> Path:
        return _absolute(value)  # type: ignore[return-value]

    def plugin_refs(self) -> list[tuple[str, str, PluginRef]]:
        """(field path, kind, ref) of every plugin the config names."""
        refs = [
            ("data", "dataset", self.data),
            ("model", "model", self.model),
            ("distill.explainer", "explainer", self.distill.explainer),
            ("distill.similarity", "similarity", self.distill.similarity),
        ]
        if self.teacher is not None:
            refs.append(("teacher", "model", self.teacher))
        if self.eval.explainer is not None:
            refs.append(("eval.explainer", "explainer", self.eval.explainer))
        if self.train.guidance is not None:
            refs.append(("train.guidance.explainer", "explainer", self.train.guidance.explainer))
        refs += [(f"eval.metrics.{i}", "metric", ref) for i, ref in enumerate(self.eval.metrics)]
        return refs

    def tracker_refs(self) -> list[tuple[str, str, PluginRef]]:
        """(field path, kind, ref) of every tracker ``train.loggers`` names (they do not change results)."""
        return [(f"train.loggers.{i}", "tracker", ref) for i, ref in enumerate(self.train.loggers or [])]


def validate_plugins(config: ExperimentConfig, source: str = "config") -> None:
    """Check every named plugin exists, its options validate (metrics are built, so options they pass
    on to other plugins are checked too), and that a distillation with ``lam > 0`` names a
    differentiable explainer and similarity; one-line ConfigError naming the field otherwise."""
    for path, kind, ref in [*config.plugin_refs(), *config.tracker_refs()]:
        try:
            options = validate_options(kind, ref.name, ref.options, source=source, path=f"{path}.options")
        except E2KDError as exc:
            text = str(exc)
            raise ConfigError(text if text.startswith(f"{source}: ") else f"{source}: {path}.name: {text}") from None
        _resolve_path_options(ref, options)
        if kind == "metric":
            try:
                create(kind, ref.name, options)
            except E2KDError as exc:
                raise ConfigError(f"{source}: {path}.options: {exc}") from None
    g = config.train.guidance
    if g is not None and not registry().info("explainer", g.explainer.name).capabilities["differentiable"]:
        raise ConfigError(
            f"{source}: train.guidance.explainer: explainer {g.explainer.name!r} is not differentiable and "
            f"cannot guide a model (pick a differentiable one, e.g. gradcam or bcos)"
        )
    d = config.distill
    if config.teacher is not None and d.lam > 0:
        for field, kind, ref in (("explainer", "explainer", d.explainer), ("similarity", "similarity", d.similarity)):
            if not registry().info(kind, ref.name).capabilities["differentiable"]:
                raise ConfigError(
                    f"{source}: distill.{field}: {kind} {ref.name!r} is not differentiable and cannot "
                    f"train a student (use it for evaluation, pick a differentiable one, or set distill.lam: 0)"
                )


def _resolve_path_options(ref: PluginRef, options: BaseModel) -> None:
    """Make every path-typed plugin option given in ``ref`` absolute (e.g. a dataset's ``root``)."""
    for key, field in type(options).model_fields.items():
        if (
            key in ref.options
            and ref.options[key] is not None
            and Path in (field.annotation, *get_args(field.annotation))
        ):
            ref.options[key] = str(_absolute(Path(ref.options[key])))


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=value`` -> (["a", "b"], value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. --set distill.lam=0")
    key, raw = text.split("=", 1)
    if not key.strip():
        raise ConfigError(f"--set {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def set_value(data: dict[str, Any], keys: list[str], value: Any, *, what: str = "") -> None:
    """Set ``data[k1][k2]...[kn] = value``, creating sections; a bare plugin name becomes {name: ...}."""
    node = data
    for key in keys[:-1]:
        child = node.get(key)
        if child is None or isinstance(child, str):
            child = {} if child is None else {"name": child}
            node[key] = child
        if not isinstance(child, dict):
            raise ConfigError(f"{what or '.'.join(keys)}: {key!r} is not a section")
        node = child
    node[keys[-1]] = value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        keys, value = parse_override(text)
        set_value(data, keys, value, what=f"--set {text!r}")
    return data


def load_config_dict(
    data: dict[str, Any], *, source: str = "config", overrides: list[str] | None = None
) -> ExperimentConfig:
    """Validate a config given as a dict, then apply ``--set`` style overrides over the resolved values."""
    config = _validate(data or {}, source)
    if overrides:
        resolved = config.model_dump(mode="json")
        config = _validate(apply_overrides(resolved, overrides), f"{source} (with --set)")
    validate_plugins(config, source)
    config._source = source
    return config


def _validate(data: dict[str, Any], source: str) -> ExperimentConfig:
    try:
        return ExperimentConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source=source, known=_known_keys(exc))) from None


#: The paper's settings, shipped with the package: ``e2kd distill imagenet_50shot_r34_r18 --set ...``.
PACKAGED_CONFIGS = Path(__file__).parent / "configs"


def packaged_configs() -> list[str]:
    """Names of the configs shipped in ``e2kd/configs`` (the paper's settings)."""
    return sorted(p.stem for p in PACKAGED_CONFIGS.glob("*.yaml"))


def config_path(path: str | Path) -> Path:
    """``path`` when it is a file, else the packaged config of that bare name (with or without ``.yaml``)."""
    path = Path(path)
    if path.is_file():
        return path
    packaged = PACKAGED_CONFIGS / f"{path.stem}.yaml"
    if len(path.parts) == 1 and path.suffix in ("", ".yaml") and packaged.is_file():
        return packaged
    raise ConfigError(f"{path}: config file not found (or name a packaged one: {', '.join(packaged_configs())})")


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The YAML mapping in ``path`` (see :func:`config_path`), not yet validated."""
    path = config_path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"{path}: malformed YAML{where}: {problem}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (seed, data, model, ...) at the top level")
    return data


def load_config(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read, validate and return the experiment config in the YAML file ``path`` (or a packaged one by name)."""
    return load_config_dict(read_config_file(path), source=str(config_path(path)), overrides=overrides)


def dump_config(config: ExperimentConfig) -> str:
    """The resolved config as YAML (what a run directory stores)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


def _known_keys(exc: ValidationError) -> list[str]:
    """Field names valid where the first error occurred (for did-you-mean hints)."""
    loc = exc.errors()[0]["loc"]
    model: type[BaseModel] = ExperimentConfig
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        candidates = [
            a
            for a in getattr(annotation, "__args__", (annotation,))
            if isinstance(a, type) and issubclass(a, BaseModel)
        ]
        if not candidates:
            return []
        model = candidates[0]
    return list(model.model_fields)


def stored_config(path: Path) -> ExperimentConfig | None:
    """A run directory's ``config.yaml`` read with today's schema (fields added since get their
    defaults), or None if it no longer validates. Plugins are not looked up."""
    try:
        return _validate(yaml.safe_load(path.read_text()) or {}, str(path))
    except (ConfigError, yaml.YAMLError):
        return None
