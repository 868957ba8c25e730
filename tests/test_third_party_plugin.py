"""Install examples/third_party_plugin into a temporary site dir and use it like a user would."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PLUGIN = ROOT / "examples" / "third_party_plugin"

USE_FROM_CONFIG = r"""
import json, torch
import torch.nn.functional as F
from e2kd.config import load_config_dict
from e2kd.experiment import make_distiller
from e2kd.models import build_model
from e2kd.plan import plan_run
cfg = load_config_dict({"distill": {"lam": 1.0, "explainer": {"name": "attention_map", "options": {"p": 2}},
                                    "similarity": "neg_l2"}, "data": {"image_size": 16}})
torch.manual_seed(0)
teacher = build_model("small_resnet", {"widths": [8, 16]}, 4)
student = build_model("small_resnet", {"widths": [4, 8]}, 4)
x = torch.rand(4, 3, 16, 16)
out = make_distiller(plan_run(cfg, "distill"), teacher, student)(x)
out["loss"].backward()
grad = student.stages[1][0].conv1.weight.grad

def amap(model, x):  # the attention map, computed here by hand
    feats = {}
    handle = model.stages[1].register_forward_hook(lambda mod, a, o: feats.update(o=o))
    model(x)
    handle.remove()
    a = feats["o"].pow(2).mean(1, keepdim=True)
    return F.interpolate(a, size=x.shape[-2:], mode="bilinear", align_corners=False).flatten(1)

with torch.no_grad():
    student.train()  # as during the step (BN in train mode)
    d = (F.normalize(amap(student, x), dim=1) - F.normalize(amap(teacher.eval(), x), dim=1)).norm(dim=1)
print(json.dumps({"explanation": float(out["explanation"]), "expected": float((1 + d).mean()),
                  "grad_norm": float(grad.norm()), "finite": bool(torch.isfinite(grad).all())}))
"""


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    target = tmp_path_factory.mktemp("site")
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
            str(PLUGIN),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    return target


def _run(args, site, **env):
    environ = {**os.environ, "PYTHONPATH": str(site), **env}
    return subprocess.run(args, capture_output=True, text=True, env=environ, cwd=ROOT, timeout=300)


def test_plugin_is_discovered_and_listed(site):
    result = _run([sys.executable, "-m", "e2kd", "plugins", "--json"], site)
    assert result.returncode == 0, result.stderr
    items = {(i["kind"], i["name"]): i for i in json.loads(result.stdout)}
    for key in [
        ("explainer", "attention_map"),
        ("explainer", "layercam"),
        ("similarity", "neg_l2"),
        ("dataset", "csv_images"),
    ]:
        assert items[key]["distribution"] == "e2kd-attention-transfer"
        assert items[key]["plugin"] == "attention_transfer"
    assert items[("explainer", "gradcam")]["distribution"] == "e2kd"
    table = _run([sys.executable, "-m", "e2kd", "plugins"], site)
    assert "attention_map" in table.stdout and "e2kd-attention-transfer" in table.stdout


def test_plugin_can_be_excluded_by_env_var(site):
    result = _run([sys.executable, "-m", "e2kd", "plugins", "--json"], site, E2KD_PLUGINS="gradcam,cosine")
    names = {i["name"] for i in json.loads(result.stdout)}
    assert names == {"gradcam", "cosine"}


def test_plugin_is_usable_from_a_config(site):
    result = _run([sys.executable, "-c", USE_FROM_CONFIG], site)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["finite"] and out["grad_norm"] > 0
    assert abs(out["explanation"] - out["expected"]) < 1e-5 and out["explanation"] > 1.0


def test_plugin_own_test_suite_passes(site):
    result = _run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(PLUGIN / "tests")], site)
    assert result.returncode == 0, result.stdout + result.stderr
    from e2kd.testing import EXPLAINER_CASES

    expected = 2 * len(EXPLAINER_CASES) + 6  # two explainers through the kit, six other tests
    assert f"{expected} passed" in result.stdout, result.stdout
