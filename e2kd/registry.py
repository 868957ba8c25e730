"""Plugin discovery and the typed facade over it.

Plugins are found through the entry-point group ``e2kd`` (built-ins included), loaded
lazily and once. ``E2KD_PLUGINS`` restricts which entry points load: unset loads all,
a comma-separated list loads those names (entry points or distributions), an empty value
loads none; ``-name`` entries and ``E2KD_DISABLE_PLUGINS`` leave names out (see
:func:`plugin_selection`).
"""

from __future__ import annotations

import contextlib
import difflib
import importlib.metadata as metadata
import os
import sys
import traceback
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import pluggy
from pydantic import BaseModel, ValidationError

from . import hookspecs
from .api import (
    CATEGORIES,
    REQUIREMENTS,
    SAMPLE_FIELDS,
    Dataset,
    Explainer,
    Metric,
    ModelBuilder,
    PluginItem,
    Similarity,
    Tracker,
    WeightSource,
)
from .errors import PluginError

ENTRY_POINT_GROUP = "e2kd"
ENV_VAR = "E2KD_PLUGINS"
DISABLE_VAR = "E2KD_DISABLE_PLUGINS"
DEBUG_VAR = "E2KD_DEBUG"
#: The distribution of the built-in plugins (in a clash, the other item is the one reported).
BUILT_IN_DISTRIBUTION = "e2kd"

#: kind -> (hook name, base class every registered class must subclass)
KINDS: dict[str, tuple[str, type[PluginItem]]] = {
    "explainer": ("register_explainers", Explainer),
    "similarity": ("register_similarities", Similarity),
    "metric": ("register_metrics", Metric),
    "model": ("register_models", ModelBuilder),
    "dataset": ("register_datasets", Dataset),
    "weights": ("register_weight_sources", WeightSource),
    "tracker": ("register_trackers", Tracker),
}


@dataclass(frozen=True)
class PluginInfo:
    """One registered item, as ``e2kd plugins`` lists it."""

    kind: str
    name: str
    description: str
    distribution: str
    plugin: str
    options: dict[str, Any] = field(default_factory=dict)
    capabilities: dict[str, Any] = field(default_factory=dict)
    cls: type[PluginItem] | None = field(default=None, compare=False, repr=False)
    #: "ok", or what is wrong ("clash: ..." when two plugins register the name)
    status: str = "ok"
    #: the distribution's version (None for a plugin registered at run time)
    version: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "name": self.name,
            "description": self.description,
            "distribution": self.distribution,
            "version": self.version,
            "plugin": self.plugin,
            "options": self.options,
            "capabilities": self.capabilities,
            "status": self.status,
        }


@dataclass(frozen=True)
class PluginProblem:
    """A plugin that failed to import, registered a misdeclared item, or clashes with another."""

    plugin: str
    distribution: str
    message: str
    kind: str | None = None
    name: str | None = None
    detail: str = field(default="", compare=False, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "name": self.name,
            "plugin": self.plugin,
            "distribution": self.distribution,
            "status": "error",
            "error": self.message,
        }


def plugin_selection() -> tuple[set[str] | None, set[str]]:
    """(allowed, excluded) entry-point or distribution names from the environment.

    ``E2KD_PLUGINS`` unset: every entry point; ``a,b``: only those (an entry point's name or its
    distribution's, e.g. ``e2kd`` for every built-in); empty: none. Entries written ``-name``, and
    the names in ``E2KD_DISABLE_PLUGINS``, are left out whatever else is allowed.
    """
    allowed = os.environ.get(ENV_VAR)
    entries = [n.strip() for n in (allowed or "").split(",") if n.strip()]
    excluded = {n[1:].strip() for n in entries if n.startswith("-")}
    excluded |= {n.strip() for n in os.environ.get(DISABLE_VAR, "").split(",") if n.strip()}
    wanted = {n for n in entries if not n.startswith("-")}
    if allowed is None or (not wanted and any(n.startswith("-") for n in entries)):
        return None, excluded  # unset, or only exclusions: everything else loads
    return wanted, excluded


class PluginWarning(UserWarning):
    """A plugin could not be loaded, or the plugin selection names what is not installed."""


def _warn(message: str) -> None:
    """A one-line warning, ``e2kd:0: PluginWarning: ...`` (no source line of e2kd's under it)."""
    warnings.warn_explicit(message, PluginWarning, filename="e2kd", lineno=0, module="e2kd")


def _where(exc: BaseException) -> str:
    """``file:line`` of the innermost frame of an exception's traceback."""
    frames = traceback.extract_tb(exc.__traceback__)
    return f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "?"


class _Registry:
    """Entry points of ``distributions`` (None: every installed one); ``honour_env``: restricted by
    ``E2KD_PLUGINS`` (the process-wide registry), or not (an isolated one, see :func:`isolated_registry`)."""

    def __init__(self, distributions: frozenset[str] | None = None, honour_env: bool = True) -> None:
        self._only, self._honour_env = distributions, honour_env
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self._entry_points_loaded = False
        self._distributions: dict[str, str] = {}  # plugin name -> distribution name
        self._versions: dict[str, str] = {}  # plugin name -> distribution version
        self._items: dict[str, dict[str, PluginInfo]] | None = None
        self._failed: list[PluginProblem] = []  # entry points that failed to import
        self._problems: list[PluginProblem] = []  # misdeclared items and clashes (rebuilt with the items)
        self._clashes: dict[str, dict[str, list[PluginInfo]]] = {}

    # -- discovery -----------------------------------------------------------------
    def _load_entry_points(self) -> None:
        if self._entry_points_loaded:
            return
        self._entry_points_loaded = True
        wanted, excluded = plugin_selection() if self._honour_env else (None, set())
        seen: set[str] = set()
        named: set[str] = set()  # selection entries that matched an entry point or a distribution
        for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
            dist = getattr(ep, "dist", None)
            dist_name = dist.metadata["Name"] if dist is not None else "?"
            if self._only is not None and dist_name not in self._only:
                continue
            names = {ep.name, dist_name}
            named |= names & (excluded | (wanted or set()))
            if ep.name in seen or names & excluded or (wanted is not None and not names & wanted):
                continue
            seen.add(ep.name)
            if self.pm.get_plugin(ep.name) is not None or self.pm.is_blocked(ep.name):
                continue
            try:
                plugin = ep.load()
            except Exception as exc:  # a broken third-party plugin must not hide the rest
                message = (
                    f"could not load plugin entry point {ep.name!r} ({ep.value}, {dist_name}): "
                    f"{type(exc).__name__}: {exc} at {_where(exc)}"
                )
                detail = "".join(traceback.format_exception(exc))
                self._failed.append(PluginProblem(ep.name, dist_name, message, detail=detail))
                _warn(message + ("" if os.environ.get(DEBUG_VAR) else f" ({DEBUG_VAR}=1 shows the traceback)"))
                if os.environ.get(DEBUG_VAR):
                    print(detail, file=sys.stderr)
                continue
            self.pm.register(plugin, name=ep.name)
            self._distributions[ep.name] = dist_name
            if dist is not None:
                self._versions[ep.name] = dist.version
        missing = sorted((wanted or set()) | excluded) if self._only is None else []
        missing = [n for n in missing if n not in named]
        if missing:
            _warn(
                f"{ENV_VAR} / {DISABLE_VAR} name entry points or distributions that are not installed: "
                f"{', '.join(missing)} (e2kd plugins lists both)"
            )
        self.pm.check_pending()

    def _collect(self) -> dict[str, dict[str, PluginInfo]]:
        if self._items is not None:
            return self._items
        self._load_entry_points()
        items: dict[str, dict[str, PluginInfo]] = {kind: {} for kind in KINDS}
        clashes: dict[str, dict[str, list[PluginInfo]]] = {kind: {} for kind in KINDS}
        problems: list[PluginProblem] = []
        for kind, (hook_name, base) in KINDS.items():
            # Call each implementation separately to know which plugin registered what.
            for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
                dist = self._distributions.get(impl.plugin_name, "(registered at run time)")
                version = self._versions.get(impl.plugin_name)

                def register(cls: type, *, _impl=impl, _dist=dist, _version=version, _kind=kind, _base=base) -> None:
                    try:
                        info = replace(_describe(cls, _kind, _base, _impl.plugin_name, _dist), version=_version)
                    except PluginError as exc:  # a misdeclared item is reported, and only its name fails
                        problems.append(
                            PluginProblem(_impl.plugin_name, _dist, str(exc), _kind, getattr(cls, "name", None))
                        )
                        return
                    if info.name in clashes[_kind]:
                        clashes[_kind][info.name].append(info)
                    elif info.name in items[_kind]:
                        clashes[_kind][info.name] = [items[_kind].pop(info.name), info]
                    else:
                        items[_kind][info.name] = info

                impl.function(register=register)
        for kind, by_name in clashes.items():
            for name, infos in by_name.items():
                # e2kd's own item first, then by distribution: the problem names the same plugin
                # whatever order the entry points were found in
                infos.sort(key=lambda i: (i.distribution != BUILT_IN_DISTRIBUTION, i.distribution, i.plugin))
                owners = " and ".join(f"plugin {i.plugin!r} ({i.distribution})" for i in infos)
                problems.append(
                    PluginProblem(
                        infos[-1].plugin,
                        infos[-1].distribution,
                        f"{kind} {name!r} is registered twice: by {owners}; uninstall or rename one, "
                        f"or restrict loading with {ENV_VAR}",
                        kind,
                        name,
                    )
                )
        self._items, self._clashes, self._problems = items, clashes, problems
        return items

    def problems(self) -> list[PluginProblem]:
        """Failed imports, misdeclared items and name clashes (none of them stops other plugins)."""
        self._collect()
        return [*self._failed, *self._problems]

    # -- run-time registration (tests, notebooks) -------------------------------------
    def register_plugin(self, plugin: object, name: str | None = None) -> str:
        self._load_entry_points()
        registered = self.pm.register(plugin, name=name)
        self.pm.check_pending()
        self._items = None
        return registered  # type: ignore[return-value]

    def unregister_plugin(self, name: str) -> None:
        self.pm.unregister(name=name)
        self._items = None

    def reset(self) -> None:
        """Forget everything; the next use rediscovers entry points (honours a new E2KD_PLUGINS)."""
        self.__init__(self._only, self._honour_env)  # type: ignore[misc]

    def create(self, kind: str, name: str, options: dict[str, Any] | BaseModel | None = None) -> Any:
        """Instantiate a registered item with validated options."""
        info = self.info(kind, name)
        assert info.cls is not None
        if not isinstance(options, BaseModel):
            options = self.validate_options(kind, name, options)
        return info.cls(options)

    def validate_options(
        self, kind: str, name: str, options: dict[str, Any] | None, *, source: str | None = None, path: str = "options"
    ) -> BaseModel:
        """Validate ``options`` with the item's own Options model; one-line PluginError on failure."""
        info = self.info(kind, name)
        assert info.cls is not None
        try:
            return info.cls.Options(**(options or {}))
        except ValidationError as exc:
            source = source or f"{kind} {name!r}"
            raise PluginError(
                format_validation_error(exc, source=source, path=path, known=info.cls.Options.model_fields)
            ) from None

    # -- lookup --------------------------------------------------------------------
    def info(self, kind: str, name: str) -> PluginInfo:
        items = self._collect()[kind]
        if name in items:
            return items[name]
        for problem in self._problems:
            if problem.kind == kind and problem.name == name:
                raise PluginError(problem.message)
        known = sorted(items)
        hint = difflib.get_close_matches(name, known, n=1)
        did_you_mean = f"; did you mean {hint[0]!r}?" if hint else ""
        known_text = ", ".join(known) if known else f"none (check {ENV_VAR} and installed plugins)"
        failed = sorted(self._failed, key=lambda p: p.plugin != name)  # a same-named entry point first
        note = (
            f"; note: {failed[0].message}" + (f" (+{len(failed) - 1} more failed plugins)" if len(failed) > 1 else "")
            if failed
            else ""
        )
        raise PluginError(f"unknown {kind} {name!r}{did_you_mean} (known: {known_text}){note}")

    def all(self) -> list[PluginInfo]:
        """Every registered item, clashing ones included (marked in ``status``)."""
        self._collect()
        out = []
        for kind in KINDS:
            infos = list(self._items[kind].values())  # type: ignore[index]
            for name, clashing in self._clashes[kind].items():
                infos += [
                    _replace_status(
                        i,
                        f"clash: {name!r} also registered by "
                        + ", ".join(repr(o.plugin) for o in clashing if o is not i),
                    )
                    for i in clashing
                ]
            out += sorted(infos, key=lambda i: (i.name, i.plugin))
        return out


def _replace_status(info: PluginInfo, status: str) -> PluginInfo:
    return replace(info, status=status)


def _describe(cls: type, kind: str, base: type[PluginItem], plugin: str, dist: str) -> PluginInfo:
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise PluginError(f"plugin {plugin!r} registered {cls!r} as a {kind}, but it does not subclass {base.__name__}")
    if not cls.name or not cls.description:
        raise PluginError(f"plugin {plugin!r}: {cls.__name__} must set class attributes 'name' and 'description'")
    if kind == "metric" and not set(cls.requires) <= REQUIREMENTS:  # type: ignore[attr-defined]
        unknown = sorted(set(cls.requires) - REQUIREMENTS)  # type: ignore[attr-defined]
        raise PluginError(
            f"plugin {plugin!r}: metric {cls.name!r} requires unknown data {unknown} (known: {sorted(REQUIREMENTS)})"
        )
    if kind == "metric" and cls.category not in CATEGORIES:  # type: ignore[attr-defined]
        raise PluginError(
            f"plugin {plugin!r}: metric {cls.name!r} has category {cls.category!r} (known: {', '.join(CATEGORIES)})"  # type: ignore[attr-defined]
        )
    if kind == "dataset" and (cls.label_type not in ("single", "multi") or not set(cls.provides) <= SAMPLE_FIELDS):  # type: ignore[attr-defined]
        raise PluginError(
            f"plugin {plugin!r}: dataset {cls.name!r} must declare label_type 'single' or 'multi' and "
            f"provides within {sorted(SAMPLE_FIELDS)}"
        )
    options_model = cls.Options
    if not (isinstance(options_model, type) and issubclass(options_model, BaseModel)):
        raise PluginError(f"plugin {plugin!r}: {cls.__name__}.Options must be a pydantic model")
    if options_model.model_config.get("extra") != "forbid":
        raise PluginError(f"plugin {plugin!r}: {cls.__name__}.Options must set model_config extra='forbid'")
    options = {
        key: {
            "type": _type_name(f.annotation),
            "required": f.is_required(),
            "default": None if f.is_required() else f.get_default(call_default_factory=True),
            "help": f.description or "",
        }
        for key, f in options_model.model_fields.items()
    }
    return PluginInfo(kind, cls.name, cls.description, dist, plugin, options, cls.capabilities(), cls)


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def format_validation_error(exc: ValidationError, *, source: str, path: str = "", known: Iterable[str] = ()) -> str:
    """One line from a pydantic error: ``source: field.path: problem``, with a did-you-mean hint."""
    errors = exc.errors()
    first = errors[0]
    field_path = ".".join([path] * bool(path) + [str(p) for p in first["loc"]])
    if first["type"] == "extra_forbidden":
        key = str(first["loc"][-1])
        hint = difflib.get_close_matches(key, list(known), n=1)
        extra = f"; did you mean {hint[0]!r}?" if hint else ""
        text = f"{source}: {field_path}: unknown key{extra} (known: {', '.join(sorted(known)) or 'none'})"
    else:
        text = f"{source}: {field_path}: {first['msg']} (got {first.get('input')!r})"
    if len(errors) > 1:
        text += f" [+{len(errors) - 1} more problem(s)]"
    return text


_REGISTRY = _Registry()


def registry() -> _Registry:
    """The process-wide registry (for tests: ``registry().reset()``)."""
    return _REGISTRY


def isolated_registry(*, third_party: bool = False) -> _Registry:
    """A registry of e2kd's built-in plugins only (with ``third_party``: of every installed
    distribution), whatever ``E2KD_PLUGINS`` says: what the contract tests run over."""
    return _Registry(None if third_party else frozenset({BUILT_IN_DISTRIBUTION}), honour_env=False)


@contextlib.contextmanager
def use_registry(replacement: _Registry) -> Iterator[_Registry]:
    """Make ``replacement`` the process-wide registry inside the block (e.g. an isolated one, so
    that lookups made by the code under test see the same plugins as the test)."""
    global _REGISTRY
    saved, _REGISTRY = _REGISTRY, replacement
    try:
        yield replacement
    finally:
        _REGISTRY = saved


def validate_options(
    kind: str, name: str, options: dict[str, Any] | None, *, source: str | None = None, path: str = "options"
) -> BaseModel:
    """Validate ``options`` with the item's own Options model; one-line PluginError on failure."""
    return _REGISTRY.validate_options(kind, name, options, source=source, path=path)


def create(kind: str, name: str, options: dict[str, Any] | BaseModel | None = None) -> Any:
    """Instantiate a registered item with validated options."""
    return _REGISTRY.create(kind, name, options)


def get_explainer(name: str, **options: Any) -> Explainer:
    """The explainer registered as ``name``, configured with ``options``."""
    return create("explainer", name, options)


def get_similarity(name: str, **options: Any) -> Similarity:
    """The similarity registered as ``name``, configured with ``options``."""
    return create("similarity", name, options)


def get_metric(name: str, **options: Any) -> Metric:
    """The metric registered as ``name``, configured with ``options``."""
    return create("metric", name, options)


def get_model_builder(name: str, **options: Any) -> ModelBuilder:
    """The model builder registered as ``name``, configured with ``options``."""
    return create("model", name, options)


def get_dataset(name: str, seed: int = 0, **options: Any) -> Dataset:
    """The dataset registered as ``name``, configured with ``options`` (``seed`` draws subsets)."""
    info = _REGISTRY.info("dataset", name)
    assert info.cls is not None
    return info.cls(validate_options("dataset", name, options), seed=seed)  # type: ignore[return-value]


def list_plugins(kind: str | None = None) -> list[PluginInfo]:
    """Every registered item (of one ``kind`` if given), with its source distribution."""
    if kind is not None and kind not in KINDS:
        raise PluginError(f"unknown plugin kind {kind!r} (known: {', '.join(KINDS)})")
    return [i for i in _REGISTRY.all() if kind is None or i.kind == kind]


def plugin_problems() -> list[PluginProblem]:
    """Plugins that failed to import, misdeclared items and name clashes."""
    return _REGISTRY.problems()


def register_plugin(plugin: object, name: str | None = None) -> str:
    """Register a plugin object at run time (notebooks, tests); returns its name."""
    return _REGISTRY.register_plugin(plugin, name)


def unregister_plugin(name: str) -> None:
    """Remove a plugin registered with :func:`register_plugin`."""
    _REGISTRY.unregister_plugin(name)
