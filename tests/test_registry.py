import pytest
import torch
from pydantic import BaseModel, ConfigDict

import e2kd
from e2kd import hookimpl
from e2kd.api import Explainer, Metric, ModelBuilder, Similarity
from e2kd.errors import PluginError

BUILTINS = {
    ("explainer", "gradcam"),
    ("similarity", "cosine"),
    ("metric", "accuracy"),
    ("metric", "agreement"),
    ("metric", "explanation_similarity"),
    ("model", "small_resnet"),
    ("model", "timm"),
}


def test_builtins_are_discovered_through_entry_points():
    found = {(i.kind, i.name): i for i in e2kd.list_plugins()}
    assert BUILTINS <= set(found)
    for key in BUILTINS:
        assert found[key].distribution == "e2kd"
        assert found[key].description


def test_unknown_name_lists_known_and_suggests():
    with pytest.raises(PluginError) as info:
        e2kd.get_explainer("gradcma")
    msg = str(info.value)
    assert "did you mean 'gradcam'" in msg and "known:" in msg and "\n" not in msg


def test_unknown_and_illtyped_options_are_one_line_errors():
    with pytest.raises(PluginError, match=r"layr: unknown key; did you mean 'layer'"):
        e2kd.get_explainer("gradcam", layr="x")
    with pytest.raises(PluginError, match=r"eps: Input should be greater than 0") as info:
        e2kd.get_similarity("cosine", eps=-1)
    assert "\n" not in str(info.value)


def test_env_var_empty_loads_no_entry_points(fresh_registry, monkeypatch):
    monkeypatch.setenv("E2KD_PLUGINS", "")
    fresh_registry.reset()
    assert e2kd.list_plugins() == []
    with pytest.raises(PluginError, match="known: none"):
        e2kd.get_explainer("gradcam")


def test_env_var_restricts_entry_points(fresh_registry, monkeypatch):
    monkeypatch.setenv("E2KD_PLUGINS", "gradcam, cosine")
    fresh_registry.reset()
    assert {(i.kind, i.name) for i in e2kd.list_plugins()} == {("explainer", "gradcam"), ("similarity", "cosine")}


def test_env_var_unknown_name_warns(fresh_registry, monkeypatch):
    monkeypatch.setenv("E2KD_PLUGINS", "gradcam,nonexistent")
    fresh_registry.reset()
    with pytest.warns(UserWarning, match="nonexistent"):
        e2kd.list_plugins()


def test_env_var_takes_distribution_names_and_exclusions(fresh_registry, monkeypatch):
    everything = {(i.kind, i.name) for i in e2kd.list_plugins()}
    monkeypatch.setenv("E2KD_PLUGINS", "e2kd")  # a distribution: every built-in
    fresh_registry.reset()
    assert {(i.kind, i.name) for i in e2kd.list_plugins()} == everything
    monkeypatch.setenv("E2KD_PLUGINS", "-gradcam,-distances")  # exclusions only: everything else
    fresh_registry.reset()
    left = {(i.kind, i.name) for i in e2kd.list_plugins()}
    gone = {("explainer", "gradcam"), ("similarity", "l1"), ("similarity", "l2"), ("similarity", "jsd")}
    assert left == everything - gone
    monkeypatch.setenv("E2KD_PLUGINS", "gradcam,cosine,distances,-distances")  # an exclusion wins
    fresh_registry.reset()
    assert {(i.kind, i.name) for i in e2kd.list_plugins()} == {("explainer", "gradcam"), ("similarity", "cosine")}
    monkeypatch.delenv("E2KD_PLUGINS")
    monkeypatch.setenv("E2KD_DISABLE_PLUGINS", "cosine, gradcam")
    fresh_registry.reset()
    assert {(i.kind, i.name) for i in e2kd.list_plugins()} == everything - {
        ("explainer", "gradcam"),
        ("similarity", "cosine"),
    }
    monkeypatch.setenv("E2KD_DISABLE_PLUGINS", "cosine,no_such_plugin")
    fresh_registry.reset()
    with pytest.warns(UserWarning, match=r"not installed: no_such_plugin \(e2kd plugins lists both\)$"):
        e2kd.list_plugins()


class _Opts(BaseModel):
    model_config = ConfigDict(extra="forbid")
    scale: float = 1.0


class _ConstExplainer(Explainer):
    name = "adhoc_const"
    description = "test explainer: the input itself times a scale"
    Options = _Opts

    def capture(self, model, inputs, *, trainable=True):
        import contextlib

        from e2kd.api import Capture

        explainer = self

        class _Cap(Capture):
            def explain(self, logits, target, *, create_graph=False):
                return self.inputs * explainer.options.scale

        return contextlib.nullcontext(_Cap(inputs))


class _Dot(Similarity):
    name = "adhoc_dot"
    description = "test similarity: dot product"

    def __call__(self, a, b):
        return (a.flatten(1) * b.flatten(1)).sum(1)


class _Count(Metric):
    name = "adhoc_count"
    description = "test metric: always one"

    def per_sample(self, batch):
        return torch.ones(batch.logits.shape[0])


class _Linear(ModelBuilder):
    name = "adhoc_linear"
    description = "test model: flatten + linear"

    def build(self, num_classes):
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(num_classes))


class AdHocPlugin:
    @hookimpl
    def register_explainers(self, register):
        register(_ConstExplainer)

    @hookimpl
    def register_similarities(self, register):
        register(_Dot)

    @hookimpl
    def register_metrics(self, register):
        register(_Count)

    @hookimpl
    def register_models(self, register):
        register(_Linear)


def test_adhoc_plugin_registers_every_kind_and_unregisters(fresh_registry):
    e2kd.register_plugin(AdHocPlugin(), name="adhoc")
    listed = {(i.kind, i.name): i for i in e2kd.list_plugins()}
    for key in [
        ("explainer", "adhoc_const"),
        ("similarity", "adhoc_dot"),
        ("metric", "adhoc_count"),
        ("model", "adhoc_linear"),
    ]:
        assert listed[key].plugin == "adhoc"
        assert listed[key].distribution == "(registered at run time)"
    x = torch.ones(2, 3, 4, 4)
    maps = e2kd.get_explainer("adhoc_const", scale=2.0).explain(torch.nn.Flatten(), x, 0)
    assert torch.equal(maps, 2 * x)
    assert torch.equal(e2kd.get_similarity("adhoc_dot")(x, x), torch.full((2,), 48.0))
    e2kd.unregister_plugin("adhoc")
    with pytest.raises(PluginError):
        e2kd.get_explainer("adhoc_const")


def test_duplicate_item_names_are_refused(fresh_registry):
    class Clash(_ConstExplainer):
        name = "gradcam"

    class ClashPlugin:
        @hookimpl
        def register_explainers(self, register):
            register(Clash)

    e2kd.register_plugin(ClashPlugin(), name="clash")
    listed = [i for i in e2kd.list_plugins("explainer") if i.name == "gradcam"]
    assert sorted(i.plugin for i in listed) == ["clash", "gradcam"] and all(
        i.status.startswith("clash") for i in listed
    )
    with pytest.raises(PluginError, match="registered twice.*'gradcam'.*'clash'"):
        e2kd.get_explainer("gradcam")
    assert e2kd.get_explainer("gradient").name == "gradient"  # the other names keep working


def test_misdeclared_items_are_refused(fresh_registry):
    class Loose(BaseModel):
        x: int = 0

    class BadOptions(_ConstExplainer):
        name = "bad_options"
        Options = Loose

    class NotAnExplainer:
        name = "nope"

    class BadPlugin:
        def __init__(self, cls):
            self.cls = cls

        @hookimpl
        def register_explainers(self, register):
            register(self.cls)

    from e2kd.registry import plugin_problems

    e2kd.register_plugin(BadPlugin(BadOptions), name="bad1")
    assert "gradcam" in {i.name for i in e2kd.list_plugins()}  # the rest still lists
    with pytest.raises(PluginError, match="extra='forbid'"):
        e2kd.get_explainer("bad_options")
    e2kd.unregister_plugin("bad1")
    e2kd.register_plugin(BadPlugin(NotAnExplainer), name="bad2")
    assert any("does not subclass Explainer" in p.message for p in plugin_problems())


def test_unknown_hook_is_rejected(fresh_registry):
    class Typo:
        @hookimpl
        def register_explainer(self, register):  # missing 's'
            pass

    with pytest.raises(Exception, match="register_explainer"):
        e2kd.register_plugin(Typo(), name="typo")


def test_model_builder_define_passes_validated_options(fresh_registry):
    class Width(BaseModel):
        model_config = ConfigDict(extra="forbid")
        width: int = 2

    Defined = ModelBuilder.define(
        "adhoc_defined", "test: linear of a given width", lambda o, n: torch.nn.Linear(o.width, n), Width
    )

    class Plugin:
        @hookimpl
        def register_models(self, register):
            register(Defined)

    e2kd.register_plugin(Plugin(), name="defined")
    model = e2kd.get_model_builder("adhoc_defined", width=5).build(3)
    assert (model.in_features, model.out_features) == (5, 3)
    with pytest.raises(PluginError, match="widht: unknown key; did you mean 'width'"):
        e2kd.get_model_builder("adhoc_defined", widht=5)
