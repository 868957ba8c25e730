"""Every built-in item through the contract kit (``e2kd.testing``) that third parties run on theirs.

What runs is read from an isolated registry of e2kd's own entry points, so ``E2KD_PLUGINS`` or an
installed third-party plugin does not change it; ``E2KD_CONTRACT_THIRD_PARTY=1`` adds every
installed plugin (to check yours against the same kit).
"""

import os
from pathlib import Path

import pytest

from e2kd import testing
from e2kd.registry import isolated_registry, use_registry

CONTRACT = isolated_registry(third_party=os.environ.get("E2KD_CONTRACT_THIRD_PARTY") == "1")


@pytest.fixture(autouse=True)
def _isolated():
    """Lookups inside the code under test (a metric's similarity, the kit's B-cos test model) see
    the same plugins as the test."""
    with use_registry(CONTRACT):
        yield


def _names(kind):
    return sorted(i.name for i in CONTRACT.all() if i.kind == kind)


@pytest.mark.parametrize("case", testing.EXPLAINER_CASES)
@pytest.mark.parametrize("name", _names("explainer"))
def test_explainer_contract(name, case):
    testing.EXPLAINER_CASES[case](CONTRACT.create("explainer", name))


@pytest.mark.parametrize("case", testing.SIMILARITY_CASES)
@pytest.mark.parametrize("name", _names("similarity"))
def test_similarity_contract(name, case):
    testing.SIMILARITY_CASES[case](CONTRACT.create("similarity", name))


@pytest.mark.parametrize("case", testing.METRIC_CASES)
@pytest.mark.parametrize("name", _names("metric"))
def test_metric_contract(name, case):
    testing.METRIC_CASES[case](CONTRACT.create("metric", name))


SMALL_MODELS = {
    "timm": {"arch": "resnet18"},
    "small_resnet": {"widths": [4, 8]},
    "bcos_small": {"widths": [4, 6]},
    "bcos_vit_tiny": {"img_size": 32, "patch_size": 8, "embed_dim": 16, "depth": 1, "num_heads": 2},
}


@pytest.mark.parametrize("name", [n for n in _names("model") if n in SMALL_MODELS])
def test_model_contract(name):
    testing.check_model(CONTRACT.create("model", name, SMALL_MODELS[name]))


def test_the_contract_registry_is_every_built_in_entry_point_whatever_the_environment(monkeypatch):
    """The isolated registry loads exactly the entry points pyproject.toml declares, with
    E2KD_PLUGINS empty (which empties the process-wide registry)."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    declared = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())
    declared = set(declared["project"]["entry-points"]["e2kd"])
    monkeypatch.setenv("E2KD_PLUGINS", "")
    isolated = isolated_registry()
    assert {i.plugin for i in isolated.all()} == declared
    assert {i.distribution for i in isolated.all()} == {"e2kd"}
    assert {"gradcam", "bcos", "rollout", "integrated_gradients"} <= set(_names("explainer"))
    global_registry = type(isolated)()  # as the process-wide one is built: it honours E2KD_PLUGINS
    assert global_registry.all() == []


def test_synthetic_dataset_contract():
    testing.check_dataset(
        CONTRACT.create(
            "dataset", "synthetic", {"num_classes": 3, "image_size": 16, "train_per_class": 2, "test_per_class": 2}
        )
    )


def test_file_datasets_contract(tmp_path):
    from e2kd.data.miniature import write_image_folder, write_voc, write_waterbirds

    from .test_datasets import VOC_IMAGES

    write_image_folder(tmp_path / "f", ["a", "b"], {"train": 3, "val": 2})
    testing.check_dataset(
        CONTRACT.create(
            "dataset", "image_folder", {"root": str(tmp_path / "f"), "image_size": 16, "holdout_per_class": 1}
        )
    )
    write_waterbirds(tmp_path / "w", {"train": {(0, 0): 2, (1, 1): 2}, "val": {(0, 1): 1}, "test": {(1, 0): 1}})
    testing.check_dataset(CONTRACT.create("dataset", "waterbirds", {"root": str(tmp_path / "w"), "image_size": 16}))
    write_voc(tmp_path / "v", VOC_IMAGES)
    testing.check_dataset(CONTRACT.create("dataset", "voc", {"root": str(tmp_path / "v"), "image_size": 16}))


def test_an_evaluation_only_explainer_passes_the_kit_as_such():
    """differentiable = False: explained like any other, refused for training (not trained by the kit)."""
    gradient = type(CONTRACT.create("explainer", "gradient"))

    class EvaluationOnly(gradient):
        name = "evaluation_only"
        differentiable = False

    testing.check_explainer(EvaluationOnly())
