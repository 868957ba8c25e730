"""Entry-point discovery in this process, with entry points made up for the test: what is loaded,
what a failing import reports (one line, with where it failed), versions and distributions, the
allow / exclude selection, clashes and option listings — each against the expected text."""

import types
import warnings

import pytest
from pydantic import BaseModel, ConfigDict, Field

from e2kd import hookimpl, registry as registry_module
from e2kd.api import Explainer
from e2kd.errors import PluginError
from e2kd.registry import _Registry, format_validation_error, plugin_selection


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid")
    scale: float = Field(2.0, description="a factor")
    layer: str


def _explainer(name: str) -> type[Explainer]:
    return type(f"Explainer_{name}", (Explainer,), {"name": name, "description": f"the {name} explainer",
                                                    "Options": _Options})


def _plugin(*names: str):
    classes = [_explainer(n) for n in names]

    class Plugin:
        @hookimpl
        def register_explainers(self, register):
            for cls in classes:
                register(cls)

    return Plugin()


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
    message = ("could not load plugin entry point 'broken' (broken_dist.plugin:PLUGIN, broken-dist): ImportError: "
               f"no module named 'missing_dependency' at {line}")
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
    assert str(err.value) == ("unknown explainer 'beta' (known: alpha); note: could not load plugin entry point "
                              "'beta' (beta_dist.plugin:PLUGIN, beta-dist): ImportError: no module named "
                              f"'missing_dependency' at {line} (+1 more failed plugins)")


def test_with_the_debug_variable_the_traceback_is_printed_and_not_hinted(entry_points, capsys, monkeypatch):
    monkeypatch.setenv("E2KD_DEBUG", "1")
    entry_points.append(_broken("broken", "broken-dist"))
    with pytest.warns(registry_module.PluginWarning) as caught:
        _Registry().all()
    assert not str(caught[0].message).endswith("shows the traceback)")
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):") and "missing_dependency" in err


def test_only_the_first_entry_point_of_a_name_loads_and_a_distribution_filter_applies(entry_points):
    entry_points += [_EntryPoint("same", "first-dist", plugin=_plugin("one")),
                     _EntryPoint("same", "second-dist", plugin=_plugin("two")),
                     _EntryPoint("other", "second-dist", plugin=_plugin("three"))]
    assert _names(_Registry()) == ["one", "three"]
    assert _names(_Registry(frozenset({"second-dist"}))) == ["three", "two"]
    # an entry point without distribution metadata is kept, under the name '?'
    entry_points.append(_EntryPoint("orphan", None, plugin=_plugin("four")))
    info = _Registry().info("explainer", "four")
    assert (info.distribution, info.version) == ("?", None)


def test_the_selection_variables_allow_and_exclude_by_entry_point_or_distribution(entry_points, monkeypatch):
    entry_points += [_EntryPoint("a", "dist-x", plugin=_plugin("a1")), _EntryPoint("b", "dist-x", plugin=_plugin("b1")),
                     _EntryPoint("c", "dist-y", plugin=_plugin("c1"))]
    for allowed, disabled, expected in (("a", "", ["a1"]), ("dist-x", "", ["a1", "b1"]), ("dist-x,-b", "", ["a1"]),
                                        ("-dist-x", "", ["c1"]), ("", "", []), (None, "c", ["a1", "b1"]),
                                        (None, "dist-x, c", [])):
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
        "(e2kd plugins lists both)"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a distribution filter does not warn about the others' names
        _Registry(frozenset({"dist-y"})).all()


@pytest.mark.parametrize("allowed, disabled, expected", [
    (None, None, (None, set())),
    ("", None, (set(), set())),
    (" a , b ,", None, ({"a", "b"}, set())),
    ("-a, - b", None, (None, {"a", "b"})),
    ("a,-b", "c, d,", ({"a"}, {"b", "c", "d"})),
    (None, "c", (None, {"c"})),
])
def test_plugin_selection(monkeypatch, allowed, disabled, expected):
    for var, value in (("E2KD_PLUGINS", allowed), ("E2KD_DISABLE_PLUGINS", disabled)):
        if value is None:
            monkeypatch.delenv(var, raising=False)
        else:
            monkeypatch.setenv(var, value)
    assert plugin_selection() == expected


def test_a_clash_names_both_plugins_built_in_first_and_lists_both_items(entry_points):
    entry_points += [_EntryPoint("zeta_plugin", "zeta-dist", plugin=_plugin("same")),
                     _EntryPoint("own", "e2kd", plugin=_plugin("same", "unique"))]
    registry = _Registry()
    assert [p.message for p in registry.problems()] == [
        "explainer 'same' is registered twice: by plugin 'own' (e2kd) and plugin 'zeta_plugin' (zeta-dist); "
        "uninstall or rename one, or restrict loading with E2KD_PLUGINS"]
    assert (registry.problems()[0].plugin, registry.problems()[0].name) == ("zeta_plugin", "same")
    with pytest.raises(PluginError, match="^explainer 'same' is registered twice"):
        registry.info("explainer", "same")
    statuses = {(i.plugin, i.status) for i in registry.all() if i.name == "same"}
    assert statuses == {("own", "clash: 'same' also registered by 'zeta_plugin'"),
                        ("zeta_plugin", "clash: 'same' also registered by 'own'")}
    assert registry.info("explainer", "unique").status == "ok"


def test_options_are_listed_with_type_default_and_help(entry_points):
    entry_points.append(_EntryPoint("p", "p-dist", plugin=_plugin("x")))
    info = _Registry().info("explainer", "x")
    assert info.options == {"scale": {"type": "float", "required": False, "default": 2.0, "help": "a factor"},
                            "layer": {"type": "str", "required": True, "default": None, "help": ""}}
    assert info.to_json()["version"] == "1.0" and info.to_json()["status"] == "ok"


def test_validation_errors_are_one_line_with_the_path_and_the_count():
    try:
        _Options(scale="x", layer=3, extra=1)
    except Exception as exc:
        text = format_validation_error(exc, source="cfg.yaml", path="distill.explainer.options",
                                       known=_Options.model_fields)
    assert text == ("cfg.yaml: distill.explainer.options.scale: Input should be a valid number, unable to parse "
                    "string as a number (got 'x') [+2 more problem(s)]")
    try:
        _Options(layer="l", scal=1)
    except Exception as exc:
        text = format_validation_error(exc, source="s", known=_Options.model_fields)
    assert text == "s: scal: unknown key; did you mean 'scale'? (known: layer, scale)"
    try:
        _Options(layer="l", zzz=1)
    except Exception as exc:
        assert format_validation_error(exc, source="s") == "s: zzz: unknown key (known: none)"
