"""Installed plugins that fail to import or clash with another: `e2kd plugins` still works and says so,
other commands fail only when they use the affected name, with one line that says why."""

import json
import os
import subprocess
import sys
import textwrap
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


def _pyproject(name: str, entry_point: str, package: str, version_: str = "0.0.1") -> str:
    """A plugin package's pyproject.toml: one entry point in the e2kd group."""
    return f"""
        [build-system]
        requires = ["setuptools>=77"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "{name}"
        version = "{version_}"
        [project.entry-points.e2kd]
        {entry_point} = "{package}"
        [tool.setuptools]
        packages = ["{package}"]
    """


BROKEN = {
    "pyproject.toml": _pyproject("e2kd-broken-layercam", "layercam", "e2kd_broken_layercam"),
    "e2kd_broken_layercam/__init__.py": """
        import math
        import a_dependency_that_is_not_installed  # noqa: F401
    """,
}

CLASHING = {
    "pyproject.toml": _pyproject("e2kd-clashing", "my_gradcam", "e2kd_clashing"),
    "e2kd_clashing/__init__.py": """
        from e2kd import hookimpl
        from e2kd.api import Similarity
        from e2kd_plugins.explainers.gradcam import GradCAM


        class MyGradCAM(GradCAM):
            description = "another Grad-CAM under the same name"


        class HalfCosine(Similarity):
            name = "half_cosine"
            description = "cosine / 2 (a healthy item of the clashing package)"

            def __call__(self, a, b):
                import torch.nn.functional as F
                return F.cosine_similarity(a.flatten(1), b.flatten(1)) / 2


        @hookimpl
        def register_explainers(register):
            register(MyGradCAM)


        @hookimpl
        def register_similarities(register):
            register(HalfCosine)
    """,
}


def _package(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip())
    return root


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    target = tmp_path_factory.mktemp("site")
    for name, files in (("broken", BROKEN), ("clashing", CLASHING)):
        source = _package(tmp_path_factory.mktemp(name), files)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "--quiet",
                "--no-deps",
                "--no-build-isolation",
                "--no-index",
                "--target",
                str(target),
                str(source),
            ],
            check=True,
            capture_output=True,
            text=True,
        )
    return target


def _e2kd(site, *args, **env):
    environ = {**os.environ, "PYTHONPATH": str(site), **env}
    environ.pop("E2KD_DEBUG", None)
    environ.update(env)
    return subprocess.run(
        [sys.executable, "-m", "e2kd", *args], capture_output=True, text=True, env=environ, cwd=ROOT, timeout=300
    )


def test_plugins_lists_everything_and_names_the_problems(site):
    result = _e2kd(site, "plugins")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "half_cosine" in out and "e2kd-clashing" in out  # the healthy item of the clashing package
    assert "[clash: 'gradcam' also registered by 'my_gradcam']" in out
    assert "[clash: 'gradcam' also registered by 'gradcam']" in out
    assert (
        "could not load plugin entry point 'layercam' (e2kd_broken_layercam, e2kd-broken-layercam): "
        "ModuleNotFoundError: No module named 'a_dependency_that_is_not_installed' at " in out
    )
    assert "e2kd_broken_layercam/__init__.py:2" in out  # file and line
    assert "Traceback" not in result.stderr
    # the import failure is one warning line, with no source line of e2kd's under it
    warning = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(warning) == 1 and warning[0].startswith(
        "e2kd:0: PluginWarning: could not load plugin entry point 'layercam'"
    ), result.stderr
    items = json.loads(_e2kd(site, "plugins", "--json").stdout)
    errors = [i for i in items if i["status"] == "error"]
    assert {e["plugin"] for e in errors} == {"layercam", "my_gradcam"}
    debug = _e2kd(site, "plugins", E2KD_DEBUG="1")
    assert "Traceback (most recent call last)" in debug.stderr and "a_dependency_that_is_not_installed" in debug.stderr


def _config(tmp_path, explainer, out):
    config = {
        "data": {
            "name": "synthetic",
            "options": {"num_classes": 3, "image_size": 16, "train_per_class": 4, "test_per_class": 2},
        },
        "model": {"name": "small_resnet", "options": {"widths": [4]}},
        "distill": {"explainer": explainer},
        "train": {"epochs": 1, "batch_size": 8, "progress": False},
        "out_dir": str(tmp_path / out),
    }
    path = tmp_path / f"{out}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_only_commands_using_an_affected_name_fail_and_say_why(site, tmp_path):
    ok = _e2kd(site, "train-teacher", str(_config(tmp_path, "gradient", "ok")))
    assert ok.returncode == 0, ok.stderr
    clash = _e2kd(site, "train-teacher", str(_config(tmp_path, "gradcam", "clash")))
    assert clash.returncode == 2
    line = clash.stderr.strip().splitlines()[-1]
    assert (
        line.startswith("e2kd: error: ")
        and "clash.yaml: distill.explainer.name: explainer 'gradcam' is registered "
        "twice: by plugin 'gradcam' (e2kd) and plugin 'my_gradcam'"
        in line
    )
    assert not (tmp_path / "clash").exists()
    missing = _e2kd(site, "train-teacher", str(_config(tmp_path, "layercam", "missing")))
    assert missing.returncode == 2
    line = missing.stderr.strip().splitlines()[-1]
    assert "distill.explainer.name: unknown explainer 'layercam'" in line
    assert "note: could not load plugin entry point 'layercam'" in line


def test_a_clashing_distribution_is_left_out_by_name(site, tmp_path):
    result = _e2kd(site, "plugins", E2KD_PLUGINS="-e2kd-clashing")
    assert result.returncode == 0 and "clash" not in result.stdout and "half_cosine" not in result.stdout
    rows = {tuple(line.split()[:4]) for line in result.stdout.splitlines()}
    assert ("explainer", "gradcam", "e2kd", version("e2kd")) in rows  # distribution and version
    ok = _e2kd(site, "train-teacher", str(_config(tmp_path, "gradcam", "unclashed")), E2KD_DISABLE_PLUGINS="my_gradcam")
    assert ok.returncode == 0, ok.stderr


def _versioned(version_: str, scale: float) -> dict[str, str]:
    return {
        "pyproject.toml": _pyproject("e2kd-versioned", "versioned", "e2kd_versioned", version_),
        "e2kd_versioned/__init__.py": f"""
            import torch.nn.functional as F
            from e2kd import hookimpl
            from e2kd.api import Similarity


            class ScaledCosine(Similarity):
                name = "scaled_cosine"
                description = "cosine times a constant that changed between versions"

                def __call__(self, a, b):
                    return F.cosine_similarity(a.flatten(1), b.flatten(1)) * {scale}


            @hookimpl
            def register_similarities(register):
                register(ScaledCosine)
        """,
    }


def test_a_run_is_not_reused_after_its_plugin_changed_version(tmp_path_factory, tmp_path):
    sites = {}
    for version_, scale in (("0.0.1", 0.5), ("0.0.2", 0.25)):
        sites[version_] = tmp_path_factory.mktemp(f"site-{version_}")
        source = _package(tmp_path_factory.mktemp(f"versioned-{version_}"), _versioned(version_, scale))
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "--quiet",
                "--no-deps",
                "--no-build-isolation",
                "--no-index",
                "--target",
                str(sites[version_]),
                str(source),
            ],
            check=True,
            capture_output=True,
        )
    config = {
        "data": {
            "name": "synthetic",
            "options": {"num_classes": 3, "image_size": 16, "train_per_class": 4, "test_per_class": 2},
        },
        "model": {"name": "small_resnet", "options": {"widths": [4]}},
        "distill": {"similarity": "scaled_cosine"},
        "train": {"epochs": 1, "batch_size": 8, "progress": False},
        "eval": {"metrics": ["accuracy"]},
        "out_dir": str(tmp_path / "run"),
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    assert _e2kd(sites["0.0.1"], "train-teacher", str(path)).returncode == 0
    again = _e2kd(sites["0.0.1"], "train-teacher", str(path))
    assert again.returncode == 0 and "reused, not trained again" in again.stderr
    bumped = _e2kd(sites["0.0.2"], "train-teacher", str(path))
    assert bumped.returncode == 2
    line = bumped.stderr.strip().splitlines()[-1]
    assert (
        "holds a different run (plugins.similarity scaled_cosine ('e2kd-versioned 0.0.1' there, "
        "'e2kd-versioned 0.0.2' now)); train it again with --rerun" in line
    )
    rerun = _e2kd(sites["0.0.2"], "train-teacher", str(path), "--rerun")
    assert rerun.returncode == 0 and "reused" not in rerun.stderr
    record = json.loads((tmp_path / "run" / "env.json").read_text())["produced_by"]
    assert record["plugins"]["similarity scaled_cosine"] == "e2kd-versioned 0.0.2"
