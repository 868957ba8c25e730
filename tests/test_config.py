import pytest

from e2kd.config import ExperimentConfig, dump_config, load_config, load_config_dict
from e2kd.errors import ConfigError


def _write(tmp_path, text):
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    return path


def _one_line_error(fn, *args, match, **kw):
    with pytest.raises(ConfigError, match=match) as info:
        fn(*args, **kw)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_defaults_and_round_trip(tmp_path):
    config = load_config(_write(tmp_path, "seed: 3\ndistill: {lam: 2.0, explainer: gradcam}\n"))
    assert config.seed == 3 and config.distill.lam == 2.0 and config.distill.explainer.name == "gradcam"
    again = load_config(_write(tmp_path, dump_config(config)))
    assert again == config


def test_overrides_reach_defaults_and_plugin_options(tmp_path):
    path = _write(tmp_path, "distill: {lam: 1}\n")
    config = load_config(path, ["distill.lam=0", "distill.explainer.options.layer=stages.1", "train.epochs=3"])
    assert config.distill.lam == 0.0
    assert config.distill.explainer.options == {"layer": "stages.1"}
    assert config.train.epochs == 3


def test_missing_file(tmp_path):
    _one_line_error(load_config, tmp_path / "nope.yaml", match=r"nope.yaml: config file not found")


def test_malformed_yaml(tmp_path):
    msg = _one_line_error(load_config, _write(tmp_path, "distill:\n  lam: [1, 2\n"), match="malformed YAML at line")
    assert "exp.yaml" in msg


def test_top_level_must_be_a_mapping(tmp_path):
    _one_line_error(load_config, _write(tmp_path, "- 1\n- 2\n"), match="expected a mapping")


def test_unknown_key_suggests(tmp_path):
    _one_line_error(
        load_config, _write(tmp_path, "distill: {lamda: 1}\n"), match=r"distill.lamda: unknown key; did you mean 'lam'"
    )


def test_ill_typed_value(tmp_path):
    _one_line_error(
        load_config, _write(tmp_path, "train: {epochs: many}\n"), match=r"train.epochs: Input should be a valid integer"
    )


def test_unknown_plugin_name(tmp_path):
    _one_line_error(
        load_config,
        _write(tmp_path, "distill: {similarity: cosin}\n"),
        match=r"distill.similarity.name: unknown similarity 'cosin'; did you mean 'cosine'",
    )


def test_unknown_and_ill_typed_plugin_options(tmp_path):
    _one_line_error(
        load_config,
        _write(tmp_path, "distill: {explainer: {name: gradcam, options: {layers: x}}}\n"),
        match=r"distill.explainer.options.layers: unknown key; did you mean 'layer'",
    )
    _one_line_error(
        load_config,
        _write(tmp_path, "model: {name: small_resnet, options: {blocks: zero}}\n"),
        match=r"model.options.blocks: Input should be a valid integer",
    )


def test_bad_override():
    _one_line_error(load_config_dict, {}, overrides=["distill.lam"], match="expected KEY=VALUE")
    _one_line_error(
        load_config_dict, {}, overrides=["distill.lam=abc"], match=r"distill.lam: Input should be a valid number"
    )


def test_timm_pretrained_kwargs_point_to_weight_names():
    _one_line_error(
        load_config_dict,
        {"model": {"name": "timm", "options": {"arch": "resnet18", "kwargs": {"pretrained": True}}}},
        match="set the model's checkpoint to a weight name instead",
    )


def test_example_configs_validate():
    import pathlib

    root = pathlib.Path(__file__).parent.parent
    examples = sorted([*(root / "examples" / "configs").glob("*.yaml"), *(root / "e2kd" / "configs").glob("*.yaml")])
    assert len(examples) >= 9
    for path in examples:
        assert isinstance(load_config(path), ExperimentConfig)


def test_packaged_configs_load_by_name_from_anywhere(tmp_path, monkeypatch):
    import pathlib

    from e2kd.config import ConfigError, packaged_configs

    monkeypatch.chdir(tmp_path)
    path = pathlib.Path(__file__).parent.parent / "e2kd" / "configs" / "voc_bcos_r50_r18.yaml"
    assert load_config("voc_bcos_r50_r18") == load_config("voc_bcos_r50_r18.yaml") == load_config(path)
    assert "imagenet_50shot_r34_r18" in packaged_configs()
    (tmp_path / "voc_bcos_r50_r18.yaml").write_text("seed: 3\n")  # a file of that name wins
    assert load_config("voc_bcos_r50_r18.yaml").seed == 3
    with pytest.raises(
        ConfigError,
        match=r"^sub/voc_bcos_r50_r18: config file not found \(or name a packaged one: "
        r"imagenet_50shot_r34_r18, ",
    ):
        load_config("sub/voc_bcos_r50_r18")
