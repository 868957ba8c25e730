"""The config module's helpers, each against its result written out by hand: ``--set`` parsing and
setting, the differences a stale run or cache reports, run identity, YAML errors, path options."""

from pathlib import Path

import pytest
import yaml

from e2kd.config import (
    ExperimentConfig,
    apply_overrides,
    load_config,
    load_config_dict,
    parse_override,
    read_config_file,
    set_value,
    stored_config,
)
from e2kd.errors import ConfigError
from e2kd.runs import identity_digest, run_identity
from e2kd.storage import describe_difference


@pytest.mark.parametrize(
    "text, expected",
    [
        ("distill.lam=0", (["distill", "lam"], 0)),
        (" train.epochs = 3", (["train", "epochs"], 3)),  # spaces around the key are dropped
        ("a.b=x=y", (["a", "b"], "x=y")),  # only the first '=' splits
        ("a=[1, 2]", (["a"], [1, 2])),  # the value is YAML
        ("a=", (["a"], "")),
        ("a=  ", (["a"], "")),
        ("a=[1, 2", (["a"], "[1, 2")),  # not YAML: kept as the text
        ("model.options={depth: 2}", (["model", "options"], {"depth": 2})),
    ],
)
def test_parse_override(text, expected):
    assert parse_override(text) == expected


def test_parse_override_errors_name_the_argument():
    with pytest.raises(ConfigError) as err:
        parse_override("distill.lam")
    assert str(err.value) == "--set 'distill.lam': expected KEY=VALUE, e.g. --set distill.lam=0"
    with pytest.raises(ConfigError) as err:
        parse_override(" =3")
    assert str(err.value) == "--set ' =3': empty key"


def test_set_value_creates_sections_and_turns_a_bare_plugin_name_into_a_section():
    data = {"distill": {"explainer": "gradcam"}, "seed": 1}
    set_value(data, ["distill", "explainer", "options", "layer"], "layer4")
    set_value(data, ["train", "epochs"], 2)
    set_value(data, ["seed"], 5)
    assert data == {
        "distill": {"explainer": {"name": "gradcam", "options": {"layer": "layer4"}}},
        "train": {"epochs": 2},
        "seed": 5,
    }
    with pytest.raises(ConfigError) as err:
        set_value({"seed": 1}, ["seed", "x"], 2)
    assert str(err.value) == "seed.x: 'seed' is not a section"
    with pytest.raises(ConfigError) as err:
        apply_overrides({"seed": 1}, ["seed.x=2"])
    assert str(err.value) == "--set 'seed.x=2': 'seed' is not a section"
    assert apply_overrides({"train": {"lr": 1}}, ["train.lr=0.5", "train.epochs=4"]) == {
        "train": {"lr": 0.5, "epochs": 4}
    }


def test_overrides_apply_over_the_resolved_config_and_name_it():
    config = load_config_dict({"train": {"epochs": 7}}, source="x.yaml", overrides=["distill.lam=0"])
    assert (config.train.epochs, config.distill.lam, config.source) == (7, 0.0, "x.yaml")
    with pytest.raises(ConfigError) as err:
        load_config_dict({}, source="x.yaml", overrides=["train.epochs=many"])
    assert str(err.value).startswith("x.yaml (with --set): train.epochs: Input should be a valid integer")


def test_describe_difference_lists_every_changed_leaf_by_its_path():
    digest_a, digest_b = "a" * 64, "0123456789" + "b" * 54
    stored = {"seed": 0, "train": {"lr": 0.1, "epochs": 2}, "weights_sha256": digest_a, "file": digest_a, "gone": 1}
    current = {"seed": 0, "train": {"lr": 0.2, "epochs": 2}, "weights_sha256": digest_b, "file": digest_b, "new": [1]}
    assert describe_difference(stored, current) == [
        "file (sha256 aaaaaaaaaa… in the cache, 0123456789… now)",
        "gone (1 in the cache, None now)",
        "new (None in the cache, [1] now)",
        "train.lr (0.1 in the cache, 0.2 now)",
        "weights (sha256 aaaaaaaaaa… in the cache, 0123456789… now)",
    ]
    assert describe_difference({"a": {"b": "x" * 64}}, {"a": {"b": "y" * 64}}, "run.", where="in the run") == [
        f"run.a.b ({'x' * 64!r} in the run, {'y' * 64!r} now)"
    ]  # not hex: not shown as a digest
    assert describe_difference({"a": {"w": 1}}, {"a": 2}) == ["a ({'w': 1} in the cache, 2 now)"]
    assert describe_difference({"a": "A" * 64}, {"a": "b" * 64}) == [f"a ({'A' * 64!r} in the cache, {'b' * 64!r} now)"]
    assert describe_difference({"a": "a" * 63}, {"a": "b" * 63}) == [f"a ({'a' * 63!r} in the cache, {'b' * 63!r} now)"]


def test_run_identity_leaves_out_only_the_volatile_fields():
    config = load_config_dict(
        {
            "out_dir": "runs/x",
            "train": {
                "progress": False,
                "checkpoint_every": 5,
                "device": "cpu",
                "channels_last": True,
                "epochs": 3,
                "loggers": ["wandb"],
            },
            "data": {"num_workers": 2},
        }
    )
    identity = run_identity(config)
    full = config.model_dump(mode="json")
    for section, key in (
        ("train", "progress"),
        ("train", "checkpoint_every"),
        ("train", "device"),
        ("train", "channels_last"),
        ("train", "loggers"),
        ("data", "num_workers"),
    ):
        assert key not in identity[section] and key in full[section]
    assert "out_dir" not in identity and identity["train"]["epochs"] == 3
    del full["out_dir"]
    for section, key in (
        ("train", "progress"),
        ("train", "checkpoint_every"),
        ("train", "device"),
        ("train", "channels_last"),
        ("train", "loggers"),
        ("data", "num_workers"),
    ):
        del full[section][key]
    assert identity == full
    moved = load_config_dict({"out_dir": "elsewhere", "train": {"epochs": 3, "device": "auto"}})
    assert (
        identity_digest(moved) == identity_digest(config) != identity_digest(load_config_dict({"train": {"epochs": 4}}))
    )
    assert len(identity_digest(config)) == 64


def test_stored_config_reads_a_run_directorys_file_or_gives_none(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"seed": 4, "distill": {"explainer": "no_such_plugin"}}))
    assert stored_config(path).seed == 4  # plugins are not looked up
    path.write_text("")
    assert stored_config(path) == ExperimentConfig()
    path.write_text("seed: [1\n")
    assert stored_config(path) is None
    path.write_text("seed: many\n")
    assert stored_config(path) is None


def test_malformed_yaml_names_line_and_column(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("seed: 1\ndistill:\n  lam: [1, 2\n")
    with pytest.raises(ConfigError) as err:
        read_config_file(path)
    assert str(err.value) == f"{path}: malformed YAML at line 4, column 1: expected ',' or ']', but got '<stream end>'"
    path.write_text("")
    assert read_config_file(path) == {}
    path.write_text("- 1\n")
    with pytest.raises(ConfigError) as err:
        read_config_file(path)
    assert str(err.value) == f"{path}: expected a mapping of sections (seed, data, model, ...) at the top level"


def test_the_legacy_data_form_is_the_synthetic_dataset():
    config = load_config_dict({"data": {"num_classes": 3, "bias": 0.5, "seed": 2, "num_workers": 1, "kind": "x"}})
    assert (config.data.name, config.data.seed, config.data.num_workers) == ("synthetic", 2, 1)
    assert config.data.options == {"num_classes": 3, "bias": 0.5}
    assert load_config_dict({"data": {"seed": 2}}).data.options == {}  # only seed: not the legacy form


def test_a_frozen_teacher_explains_top1_only():
    with pytest.raises(
        ConfigError, match="a frozen teacher caches top-1 maps only: use explain_classes: top1 or teacher_mode: live"
    ):
        load_config_dict({"distill": {"teacher_mode": "frozen", "explain_classes": "all"}})
    for classes in ("auto", "top1"):
        assert load_config_dict({"distill": {"teacher_mode": "frozen", "explain_classes": classes}})
    assert load_config_dict({"distill": {"teacher_mode": "live", "explain_classes": "all"}})


def test_paths_are_made_absolute_at_load_and_plugin_path_options_too(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_config_dict(
        {
            "out_dir": "runs/a",
            "model": {"name": "small_resnet", "checkpoint": "m.pt"},
            "distill": {"cache_dir": "~/cache"},
            "data": {"name": "image_folder", "options": {"root": "imgs", "image_size": 32}},
        }
    )
    assert config.out_dir == tmp_path / "runs" / "a" and config.model.checkpoint == tmp_path / "m.pt"
    assert config.distill.cache_dir == Path("~/cache").expanduser()
    assert config.data.options == {"root": str(tmp_path / "imgs"), "image_size": 32}  # not a path: kept as given
    assert load_config_dict({"model": "small_resnet"}).model.checkpoint is None


def test_plugin_errors_name_the_field_and_source(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config_dict({"eval": {"metrics": ["accuracy", "acurracy"]}}, source="e.yaml")
    assert str(err.value).startswith("e.yaml: eval.metrics.1.name: unknown metric 'acurracy'; did you mean 'accuracy'")
    with pytest.raises(ConfigError) as err:
        load_config_dict({"teacher": "small_resnet", "distill": {"lam": 1, "similarity": "spearman"}}, source="e.yaml")
    assert str(err.value) == (
        "e.yaml: distill.similarity: similarity 'spearman' is not differentiable and cannot train a "
        "student (use it for evaluation, pick a differentiable one, or set distill.lam: 0)"
    )
    assert load_config_dict({"teacher": "small_resnet", "distill": {"lam": 0, "similarity": "spearman"}})
    assert load_config_dict({"distill": {"lam": 1, "similarity": "spearman"}})  # no teacher: nothing is distilled


def test_a_packaged_config_is_loaded_by_name_with_its_path_as_source():
    config = load_config("voc_bcos_r50_r18")
    assert config.source.endswith("e2kd/configs/voc_bcos_r50_r18.yaml")


def test_every_plugin_field_is_named_in_its_error():
    cases = [
        ({"data": "nope"}, "data.name: unknown dataset 'nope'"),
        ({"teacher": "nope"}, "teacher.name: unknown model 'nope'"),
        ({"eval": {"explainer": "nope"}}, "eval.explainer.name: unknown explainer 'nope'"),
        ({"train": {"guidance": {"explainer": "nope"}}}, "train.guidance.explainer.name: unknown explainer 'nope'"),
        (
            {"distill": {"explainer": {"name": "gradcam", "options": {"layr": 1}}}},
            "distill.explainer.options.layr: unknown key; did you mean 'layer'?",
        ),
    ]
    for data, expected in cases:
        with pytest.raises(ConfigError) as err:
            load_config_dict(data, source="e.yaml")
        assert str(err.value).startswith(f"e.yaml: {expected}"), str(err.value)
    with pytest.raises(ConfigError) as err:
        load_config_dict({"train": {"epochs": "x"}}, source="e.yaml")
    assert str(err.value).startswith("e.yaml: train.epochs: Input should be a valid integer")
    assert load_config_dict({}).source == "config"


def test_nested_typos_get_the_hint_of_their_own_section():
    with pytest.raises(ConfigError) as err:
        load_config_dict({"train": {"guidance": {"wieght": 2}}})
    assert str(err.value).startswith("config: train.guidance.wieght: unknown key; did you mean 'weight'?")
    with pytest.raises(ConfigError) as err:  # a list index on the way: no hint, still one line
        load_config_dict({"eval": {"metrics": [{"name": "accuracy", "optionz": {}}]}})
    assert str(err.value).startswith("config: eval.metrics.0.optionz: unknown key (known: none)")


def test_a_non_differentiable_explainer_cannot_guide_or_train(fresh_registry):
    from e2kd import hookimpl
    from e2kd.api import Explainer

    class Fixed(Explainer):
        name, description, differentiable = "fixed", "a fixed map", False

    class Plugin:
        @hookimpl
        def register_explainers(self, register):
            register(Fixed)

    fresh_registry.register_plugin(Plugin(), name="fixed_plugin")
    with pytest.raises(ConfigError) as err:
        load_config_dict({"train": {"guidance": {"explainer": "fixed"}}}, source="e.yaml")
    assert str(err.value) == (
        "e.yaml: train.guidance.explainer: explainer 'fixed' is not differentiable and cannot "
        "guide a model (pick a differentiable one, e.g. gradcam or bcos)"
    )
    with pytest.raises(ConfigError) as err:
        load_config_dict({"teacher": "small_resnet", "distill": {"explainer": "fixed"}}, source="e.yaml")
    assert str(err.value).startswith("e.yaml: distill.explainer: explainer 'fixed' is not differentiable")
    assert load_config_dict({"eval": {"explainer": "fixed"}})  # evaluation may use it


def test_yaml_that_cannot_even_be_read_is_one_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_bytes(b"seed: 1\x07\n")  # a control character: a reader error, with no position or problem
    with pytest.raises(ConfigError) as err:
        read_config_file(path)
    assert str(err.value) == f"{path}: malformed YAML: invalid YAML"


def test_dump_keeps_the_schema_order_and_writes_paths_as_text(tmp_path):
    config = load_config_dict(
        {"model": {"name": "small_resnet", "checkpoint": str(tmp_path / "m.pt")}, "out_dir": str(tmp_path / "o")}
    )
    from e2kd.config import dump_config

    text = dump_config(config)
    assert isinstance(config.out_dir, Path) and f"out_dir: {tmp_path / 'o'}" in text  # a Path field, as text
    assert text.splitlines()[0] == "seed: 0" and text.index("data:") < text.index("model:") < text.index("train:")
    assert f"checkpoint: {tmp_path / 'm.pt'}" in text
    identity = run_identity(config)
    assert identity["model"]["checkpoint"] == str(tmp_path / "m.pt")  # JSON values, not Path objects
    import hashlib
    import json

    assert identity_digest(config) == hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def test_a_digest_is_64_lowercase_hex_characters():
    from e2kd.storage import _is_digest

    assert _is_digest("0123456789abcdef" * 4)
    assert not any(_is_digest(v) for v in ("X" * 64, "A" * 64, "a" * 63, 64, None))


def test_a_plugins_optional_path_option_is_made_absolute_like_a_required_one(tmp_path, monkeypatch):
    """``hf_datasets``' ``path`` is ``Path | None``: given relative, it is resolved against the working
    folder when the config is loaded, as ``image_folder``'s ``root`` (a plain ``Path``) is."""
    monkeypatch.chdir(tmp_path)
    config = load_config_dict({"data": {"name": "hf_datasets", "options": {"path": "saved", "image_size": 32}}})
    assert config.data.options == {"path": str(tmp_path / "saved"), "image_size": 32}
    config = load_config_dict({"data": {"name": "image_folder", "options": {"root": "imgs"}}})
    assert config.data.options["root"] == str(tmp_path / "imgs")
