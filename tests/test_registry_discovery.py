"""Entry-point discovery in this process, with entry points made up for the test: what is loaded,
what a failing import reports (one line, with where it failed), versions and distributions, the
allow / exclude selection, clashes and option listings — each against the expected text."""

import types
import warnings

import pytest
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from e2kd import hookimpl
from e2kd import registry as registry_module
from e2kd.api import Explainer
from e2kd.errors import PluginError
from e2kd.registry import _Registry, format_validation_error, plugin_selection


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid")
    scale: float = Field(2.0, description="a factor")
    layer: str


def _item(base, name, **attrs):
    return type(f"{base.__name__}_{name}", (base,), {"name": name, "description": f"the {name} item", **attrs})


def _plugin_of(**kinds):
    """A plugin registering the classes given per hook name (register_metrics=[...], ...)."""
    methods = {}
    for hook, classes in kinds.items():

        def impl(self, register, _classes=classes):
            for cls in _classes:
                register(cls)

        impl.__name__ = hook
        methods[hook] = hookimpl(impl)
    return type("Plugin", (), methods)()


def _plugin(*names: str):
    """A plugin registering one explainer (options: _Options) per name."""
    return _plugin_of(register_explainers=[_item(Explainer, n, Options=_Options) for n in names])


class _EntryPoint:
    def __init__(self, name, dist, version="1.0", plugin=None, error=None):
        self.name, self.value = name, f"{(dist or name).replace('-', '_')}.plugin:PLUGIN"
        self.dist = types.SimpleNamespace(metadata={"Name": dist}, version=version) if dist else None
        self._plugin, self._error = plugin, error

    def load(self):
        if self._error is not None:
            raise self._error
        return self._plugin


def _raise_import_error():
    raise ImportError("no module named 'missing_dependency'")


def _broken(name, dist):
    try:
        _raise_import_error()
    except ImportError as exc:
        return _EntryPoint(name, dist, error=exc)


@pytest.fixture
def entry_points(monkeypatch):
    """Replace the installed entry points with the list the test fills in."""
    points = []
    monkeypatch.setattr(registry_module.metadata, "entry_points", lambda group: list(points) if group == "e2kd" else [])
    for var in ("E2KD_PLUGINS", "E2KD_DISABLE_PLUGINS", "E2KD_DEBUG"):
        monkeypatch.delenv(var, raising=False)
    return points


def _names(registry):
    return sorted(i.name for i in registry.all())


def test_a_failing_import_is_one_warning_line_with_where_and_the_others_still_load(entry_points, capsys):
    entry_points += [_EntryPoint("good", "good-dist", "1.2.3", _plugin("alpha")), _broken("broken", "broken-dist")]
    registry = _Registry()
    with pytest.warns(registry_module.PluginWarning) as caught:
        assert _names(registry) == ["alpha"]
    line = __file__ + ":" + str(_raise_import_error.__code__.co_firstlineno + 1)
    message = (
        "could not load plugin entry point 'broken' (broken_dist.plugin:PLUGIN, broken-dist): ImportError: "
        f"no module named 'missing_dependency' at {line}"
    )
    assert [str(w.message) for w in caught] == [message + " (E2KD_DEBUG=1 shows the traceback)"]
    (problem,) = registry.problems()
    assert (problem.plugin, problem.distribution, problem.message) == ("broken", "broken-dist", message)
    assert "Traceback" in problem.detail and "_raise_import_error" in problem.detail
    assert capsys.readouterr().err == ""
    alpha = registry.info("explainer", "alpha")
    assert (alpha.distribution, alpha.version, alpha.plugin) == ("good-dist", "1.2.3", "good")
    # a lookup of an unknown name says which plugin failed to load, a same-named one first
    entry_points.append(_broken("beta", "beta-dist"))
    registry = _Registry()
    with pytest.warns(registry_module.PluginWarning):
        with pytest.raises(PluginError) as err:
            registry.info("explainer", "beta")
    assert str(err.value) == (
        "unknown explainer 'beta' (known: alpha); note: could not load plugin entry point "
        "'beta' (beta_dist.plugin:PLUGIN, beta-dist): ImportError: no module named "
        f"'missing_dependency' at {line} (+1 more failed plugins)"
    )


def test_only_the_first_entry_point_of_a_name_loads_and_a_distribution_filter_applies(entry_points):
    entry_points += [
        _EntryPoint("same", "first-dist", plugin=_plugin("one")),
        _EntryPoint("same", "second-dist", plugin=_plugin("two")),
        _EntryPoint("other", "second-dist", plugin=_plugin("three")),
    ]
    assert _names(_Registry()) == ["one", "three"]
    assert _names(_Registry(frozenset({"second-dist"}))) == ["three", "two"]
    # an entry point without distribution metadata is kept, under the name '?'
    entry_points.append(_EntryPoint("orphan", None, plugin=_plugin("four")))
    info = _Registry().info("explainer", "four")
    assert (info.distribution, info.version) == ("?", None)


def test_the_selection_variables_allow_and_exclude_by_entry_point_or_distribution(entry_points, monkeypatch):
    entry_points += [
        _EntryPoint("a", "dist-x", plugin=_plugin("a1")),
        _EntryPoint("b", "dist-x", plugin=_plugin("b1")),
        _EntryPoint("c", "dist-y", plugin=_plugin("c1")),
    ]
    for allowed, disabled, expected in (
        ("a", "", ["a1"]),
        ("dist-x", "", ["a1", "b1"]),
        ("dist-x,-b", "", ["a1"]),
        ("-dist-x", "", ["c1"]),
        ("", "", []),
        (None, "c", ["a1", "b1"]),
        (None, "dist-x, c", []),
    ):
        if allowed is None:
            monkeypatch.delenv("E2KD_PLUGINS", raising=False)
        else:
            monkeypatch.setenv("E2KD_PLUGINS", allowed)
        monkeypatch.setenv("E2KD_DISABLE_PLUGINS", disabled)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # every name given is installed: no warning
            assert _names(_Registry()) == expected, (allowed, disabled)
        assert _names(_Registry(honour_env=False)) == ["a1", "b1", "c1"]  # an isolated registry ignores them
    monkeypatch.setenv("E2KD_PLUGINS", "a,zz")
    monkeypatch.setenv("E2KD_DISABLE_PLUGINS", "yy")
    with pytest.warns(registry_module.PluginWarning) as caught:
        _Registry().all()
    assert [str(w.message) for w in caught] == [
        "E2KD_PLUGINS / E2KD_DISABLE_PLUGINS name entry points or distributions that are not installed: yy, zz "
        "(e2kd plugins lists both)"
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a distribution filter does not warn about the others' names
        _Registry(frozenset({"dist-y"})).all()


@pytest.mark.parametrize(
    "allowed, disabled, expected",
    [
        (None, None, (None, set())),
        ("", None, (set(), set())),
        (" a , b ,", None, ({"a", "b"}, set())),
        ("-a, - b", None, (None, {"a", "b"})),
        ("a,-b", "c, d,", ({"a"}, {"b", "c", "d"})),
        (None, "c", (None, {"c"})),
    ],
)
def test_plugin_selection(monkeypatch, allowed, disabled, expected):
    for var, value in (("E2KD_PLUGINS", allowed), ("E2KD_DISABLE_PLUGINS", disabled)):
        if value is None:
            monkeypatch.delenv(var, raising=False)
        else:
            monkeypatch.setenv(var, value)
    assert plugin_selection() == expected


def test_a_clash_names_both_plugins_built_in_first_and_lists_both_items(entry_points):
    entry_points += [
        _EntryPoint("zeta_plugin", "zeta-dist", plugin=_plugin("same")),
        _EntryPoint("own", "e2kd", plugin=_plugin("same", "unique")),
    ]
    registry = _Registry()
    assert [p.message for p in registry.problems()] == [
        "explainer 'same' is registered twice: by plugin 'own' (e2kd) and plugin 'zeta_plugin' (zeta-dist); "
        "uninstall or rename one, or restrict loading with E2KD_PLUGINS"
    ]
    assert (registry.problems()[0].plugin, registry.problems()[0].name) == ("zeta_plugin", "same")
    with pytest.raises(PluginError, match="^explainer 'same' is registered twice"):
        registry.info("explainer", "same")
    statuses = {(i.plugin, i.status) for i in registry.all() if i.name == "same"}
    assert statuses == {
        ("own", "clash: 'same' also registered by 'zeta_plugin'"),
        ("zeta_plugin", "clash: 'same' also registered by 'own'"),
    }
    assert registry.info("explainer", "unique").status == "ok"


def test_options_are_listed_with_type_default_and_help(entry_points):
    entry_points.append(_EntryPoint("p", "p-dist", plugin=_plugin("x")))
    info = _Registry().info("explainer", "x")
    assert info.options == {
        "scale": {"type": "float", "required": False, "default": 2.0, "help": "a factor"},
        "layer": {"type": "str", "required": True, "default": None, "help": ""},
    }
    assert info.to_json()["version"] == "1.0" and info.to_json()["status"] == "ok"


def _validation_error(**values) -> ValidationError:
    with pytest.raises(ValidationError) as caught:
        _Options(**values)
    return caught.value


def test_validation_errors_are_one_line_with_the_path_and_the_count():
    text = format_validation_error(
        _validation_error(scale="x", layer=3, extra=1),
        source="cfg.yaml",
        path="distill.explainer.options",
        known=_Options.model_fields,
    )
    assert text == (
        "cfg.yaml: distill.explainer.options.scale: Input should be a valid number, unable to parse "
        "string as a number (got 'x') [+2 more problem(s)]"
    )
    assert (
        format_validation_error(_validation_error(layer="l", scal=1), source="s", known=_Options.model_fields)
        == "s: scal: unknown key; did you mean 'scale'? (known: layer, scale)"
    )
    assert (
        format_validation_error(_validation_error(layer="l", zzz=1), source="s") == "s: zzz: unknown key (known: none)"
    )
    # a bad scale and a missing layer: one more problem
    assert format_validation_error(_validation_error(scale="x"), source="s").endswith(" [+1 more problem(s)]")


def test_misdeclared_items_are_reported_by_plugin_distribution_and_name_and_the_rest_load(entry_points):
    from e2kd.api import REQUIREMENTS, SAMPLE_FIELDS, Dataset, Metric

    class NotPydantic:
        pass

    class Loose(BaseModel):
        x: int = 0

    metrics = [
        _item(Metric, "needs_all", requires=tuple(REQUIREMENTS)),
        _item(Metric, "needs_odd", requires=("odd",)),
        _item(Metric, "odd_category", category="speed"),
        _item(
            Metric,
            "",
        ),
        _item(Metric, "undescribed", description=""),
    ]
    datasets = [
        _item(Dataset, "full", label_type="multi", provides=tuple(SAMPLE_FIELDS)),
        _item(Dataset, "bad_type", label_type="soft"),
        _item(Dataset, "bad_field", provides=("odd",)),
    ]
    explainers = [_item(Explainer, "not_pydantic", Options=NotPydantic), _item(Explainer, "loose", Options=Loose)]
    entry_points.append(
        _EntryPoint(
            "mis",
            "mis-dist",
            plugin=_plugin_of(register_metrics=metrics, register_datasets=datasets, register_explainers=explainers),
        )
    )
    registry = _Registry()
    assert _names(registry) == ["full", "needs_all"]
    problems = {(p.kind, p.name): (p.plugin, p.distribution, p.message) for p in registry.problems()}
    known = sorted(REQUIREMENTS)
    assert problems == {
        ("metric", "needs_odd"): (
            "mis",
            "mis-dist",
            f"plugin 'mis': metric 'needs_odd' requires unknown data ['odd'] (known: {known})",
        ),
        ("metric", "odd_category"): (
            "mis",
            "mis-dist",
            "plugin 'mis': metric 'odd_category' has category 'speed' (known: performance, agreement, "
            "localisation, faithfulness, randomisation, robustness)",
        ),
        ("metric", ""): ("mis", "mis-dist", "plugin 'mis': Metric_ must set class attributes 'name' and 'description'"),
        ("metric", "undescribed"): (
            "mis",
            "mis-dist",
            "plugin 'mis': Metric_undescribed must set class attributes 'name' and 'description'",
        ),
        ("dataset", "bad_type"): (
            "mis",
            "mis-dist",
            "plugin 'mis': dataset 'bad_type' must declare label_type 'single' "
            f"or 'multi' and provides within {sorted(SAMPLE_FIELDS)}",
        ),
        ("dataset", "bad_field"): (
            "mis",
            "mis-dist",
            "plugin 'mis': dataset 'bad_field' must declare label_type "
            f"'single' or 'multi' and provides within {sorted(SAMPLE_FIELDS)}",
        ),
        ("explainer", "not_pydantic"): (
            "mis",
            "mis-dist",
            "plugin 'mis': Explainer_not_pydantic.Options must be a pydantic model",
        ),
        ("explainer", "loose"): (
            "mis",
            "mis-dist",
            "plugin 'mis': Explainer_loose.Options must set model_config extra='forbid'",
        ),
    }
    info = registry.info("metric", "needs_all")
    assert info.description == "the needs_all item" and info.capabilities == info.cls.capabilities()
    odd = next(p for p in registry.problems() if p.name == "needs_odd")
    assert odd.to_json() == {
        "kind": "metric",
        "name": "needs_odd",
        "plugin": "mis",
        "distribution": "mis-dist",
        "status": "error",
        "error": problems[("metric", "needs_odd")][2],
    }


def test_three_plugins_registering_one_name_are_all_named(entry_points):
    entry_points += [
        _EntryPoint("p_b", "dist-b", plugin=_plugin("same")),
        _EntryPoint("p_c", "dist-c", plugin=_plugin("same")),
        _EntryPoint("p_a", "dist-a", plugin=_plugin("same", "other")),
    ]
    registry = _Registry()
    (problem,) = registry.problems()
    assert problem.message.startswith(
        "explainer 'same' is registered twice: by plugin 'p_a' (dist-a) and plugin 'p_b' "
        "(dist-b) and plugin 'p_c' (dist-c);"
    )
    assert (problem.plugin, problem.distribution) == ("p_c", "dist-c")  # the last in that order
    statuses = sorted(i.status for i in registry.all() if i.name == "same")
    assert statuses == [
        "clash: 'same' also registered by 'p_a', 'p_b'",
        "clash: 'same' also registered by 'p_a', 'p_c'",
        "clash: 'same' also registered by 'p_b', 'p_c'",
    ]
    assert _names(registry) == ["other", "same", "same", "same"]
    with pytest.raises(PluginError) as err:  # a problem of another name does not answer for this one
        registry.info("explainer", "missing")
    assert str(err.value) == "unknown explainer 'missing' (known: other)"


def test_entry_points_are_read_once_and_registered_or_blocked_names_are_skipped(entry_points, monkeypatch):
    class Bare:  # an entry point object without a dist attribute
        name, value = "bare", "bare:PLUGIN"

        def load(self):
            return _plugin("from_bare")

    entry_points += [
        _EntryPoint("taken", "t-dist", plugin=_plugin("never")),
        _EntryPoint("blocked", "b-dist", plugin=_plugin("never2")),
        Bare(),
        _broken("broken", "broken-dist"),
    ]
    registry = _Registry()
    registry.pm.register(_plugin("early"), name="taken")
    registry.pm.set_blocked("blocked")
    with pytest.warns(registry_module.PluginWarning):
        assert _names(registry) == ["early", "from_bare"]
    registry.register_plugin(_plugin("late"), name="late")  # no second discovery: no second warning or failure
    assert _names(registry) == ["early", "from_bare", "late"] and len(registry.problems()) == 1
    assert registry.problems()[0].detail.startswith("Traceback (most recent call last):\n  File ")


def test_the_debug_variable_prints_the_traceback_instead_of_the_hint(entry_points, monkeypatch, capsys):
    monkeypatch.setenv("E2KD_DEBUG", "1")
    entry_points.append(_broken("broken", "broken-dist"))
    with pytest.warns(registry_module.PluginWarning) as caught:
        _Registry().all()
    line = __file__ + ":" + str(_raise_import_error.__code__.co_firstlineno + 1)
    assert str(caught[0].message) == (
        "could not load plugin entry point 'broken' (broken_dist.plugin:PLUGIN, "
        f"broken-dist): ImportError: no module named 'missing_dependency' at {line}"
    )
    err = capsys.readouterr().err  # the traceback instead of the hint
    assert err.startswith("Traceback (most recent call last):") and "missing_dependency" in err


def test_a_plugin_warning_is_attributed_to_e2kd_line_0_and_filterable_by_module(entry_points):
    entry_points.append(_broken("broken", "broken-dist"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _Registry().all()
    assert [(w.filename, w.lineno, w.category) for w in caught] == [("e2kd", 0, registry_module.PluginWarning)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", module="e2kd")
        _Registry().all()
    assert caught == []


def test_where_names_the_innermost_frame_or_a_question_mark():
    import importlib

    from e2kd.registry import _where

    try:
        importlib.import_module("no_such_module_for_this_test")
    except ImportError as exc:
        where = _where(exc)
    assert where.startswith("<frozen importlib._bootstrap>:") and where.rsplit(":", 1)[1].isdigit()
    assert _where(ValueError("never raised")) == "?"


def test_isolated_registries_keep_their_scope_through_a_reset(entry_points, monkeypatch):
    entry_points += [
        _EntryPoint("own", "e2kd", plugin=_plugin("built_in")),
        _EntryPoint("theirs", "their-dist", plugin=_plugin("third_party")),
    ]
    monkeypatch.setenv("E2KD_PLUGINS", "theirs")
    assert _names(registry_module.isolated_registry()) == ["built_in"]
    assert _names(registry_module.isolated_registry(third_party=True)) == ["built_in", "third_party"]
    assert _names(_Registry()) == ["third_party"]
    isolated = registry_module.isolated_registry()
    isolated.reset()
    assert _names(isolated) == ["built_in"]


def test_the_facade_builds_items_and_validates_with_the_default_source_and_path():
    dataset = registry_module.get_dataset(
        "synthetic", seed=3, num_classes=3, image_size=16, train_per_class=2, test_per_class=1
    )
    assert dataset.seed == 3 and dataset.num_classes == 3
    assert registry_module.get_dataset("synthetic", num_classes=3, image_size=16).seed == 0  # the default seed
    with pytest.raises(PluginError) as err:
        registry_module.get_dataset("synthetic", num_clases=3)
    assert str(err.value).startswith(
        "dataset 'synthetic': options.num_clases: unknown key; did you mean 'num_classes'?"
    )
    metric = registry_module.get_metric("explanation_similarity", similarity="l2")
    assert metric.name == "explanation_similarity" and metric.options.similarity == "l2"
    with pytest.raises(PluginError) as err:
        registry_module.validate_options("similarity", "cosine", {"epz": 1})
    assert str(err.value).startswith("similarity 'cosine': options.epz: unknown key; did you mean 'eps'?")
    with pytest.raises(PluginError) as err:
        registry_module.validate_options("similarity", "cosine", {"epz": 1}, source="cfg")
    assert str(err.value).startswith("cfg: options.epz: unknown key")
    with pytest.raises(PluginError) as err:  # the registry's own method names the options the same way
        registry_module.registry().validate_options("similarity", "cosine", {"epz": 1})
    assert str(err.value).startswith("similarity 'cosine': options.epz: unknown key")
    with pytest.raises(PluginError) as err:
        registry_module.list_plugins("explainers")
    assert (
        str(err.value)
        == "unknown plugin kind 'explainers' (known: explainer, similarity, metric, model, dataset, weights, tracker)"
    )


def test_unknown_names_list_every_known_one_and_count_the_failed_plugins(entry_points):
    entry_points += [_EntryPoint("p", "p-dist", plugin=_plugin("alpha", "gamma")), _broken("b1", "d1")]
    with pytest.warns(registry_module.PluginWarning):
        with pytest.raises(PluginError) as err:
            _Registry().info("explainer", "zeta")
    assert str(err.value).startswith(
        "unknown explainer 'zeta' (known: alpha, gamma); note: could not load plugin entry point 'b1'"
    )
    assert "more failed plugins" not in str(err.value)
    entry_points += [_broken("b2", "d2"), _broken("b3", "d3")]
    with pytest.warns(registry_module.PluginWarning):
        with pytest.raises(PluginError) as err:
            _Registry().info("explainer", "zeta")
    assert str(err.value).endswith(" (+2 more failed plugins)")


def test_options_listing_shows_factory_defaults_and_readable_types(entry_points):
    class Listed(BaseModel):
        model_config = ConfigDict(extra="forbid")
        sizes: list[int] = Field(default_factory=lambda: [1, 2])
        maybe: int | None = None

    entry_points.append(
        _EntryPoint("p", "p-dist", plugin=_plugin_of(register_explainers=[_item(Explainer, "listed", Options=Listed)]))
    )
    options = _Registry().info("explainer", "listed").options
    assert options["sizes"]["default"] == [1, 2]
    assert options["maybe"]["type"] == "int | None"
    info = _Registry().info("explainer", "listed")
    assert {k: v for k, v in info.to_json().items() if k not in ("options", "capabilities")} == {
        "kind": "explainer",
        "name": "listed",
        "description": "the listed item",
        "distribution": "p-dist",
        "version": "1.0",
        "plugin": "p",
        "status": "ok",
    }
    assert info.to_json()["options"] == options and info.to_json()["capabilities"] == info.capabilities


def test_the_first_entry_point_of_a_name_is_the_one_tried_even_when_it_fails(entry_points):
    entry_points += [_broken("dup", "first-dist"), _EntryPoint("dup", "second-dist", plugin=_plugin("second"))]
    registry = _Registry()
    with pytest.warns(registry_module.PluginWarning):
        assert _names(registry) == []
    assert [p.distribution for p in registry.problems()] == ["first-dist"]
