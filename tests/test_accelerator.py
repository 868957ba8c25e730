"""Device and mixed-precision checks, run on the CPU and — where one is present — on CUDA.

Tests parametrised over ``DEVICES`` run here on the CPU and on a GPU machine on CUDA too; the
``cuda_only`` ones compare CUDA against the CPU or run the command-line pipeline on the GPU, and
are skipped without one (``E2KD_TEST_DEVICE=cpu`` runs them on the CPU, to check the checks).
"""

import copy
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

import e2kd
from e2kd.cli import main
from e2kd.distill import Distiller
from e2kd.explaining import explained_forward
from e2kd.registry import registry

from .conftest import TINY

ROOT = Path(__file__).resolve().parent.parent
HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device"))]
#: The device of the cuda_only tests.
TARGET = os.environ.get("E2KD_TEST_DEVICE", "cuda")
cuda_only = pytest.mark.skipif(TARGET == "cuda" and not HAS_CUDA, reason="no CUDA device")

#: Every built-in model at a size a CPU test affords: (options, input size).
BUILT_IN_MODELS = {
    "small_resnet": ({"widths": [4, 8]}, 16),
    "timm": ({"arch": "resnet18"}, 64),
    "bcos_small": ({"widths": [4, 6]}, 16),
    "bcos_resnet18": ({"small_input": True}, 16),
    "bcos_resnet34": ({"small_input": True}, 16),
    "bcos_resnet50": ({"small_input": True}, 16),
    "bcos_densenet121": ({"small_input": True}, 16),
    "bcos_densenet169": ({"small_input": True}, 16),
    "bcos_vit_tiny": ({"img_size": 16, "patch_size": 4, "embed_dim": 24, "depth": 2, "num_heads": 2}, 16),
    "bcos_v2_resnet18": ({}, 32),
    "bcos_v2_resnet34": ({}, 32),
    "bcos_v2_resnet50": ({}, 32),
    "bcos_v2_densenet121": ({}, 32),
    "bcos_v2_densenet169": ({}, 32),
    "bcos_v2_simple_vit_ti": ({}, 224),
}


def test_every_built_in_model_is_covered():
    built_in = {info.name for info in registry().all() if info.kind == "model" and info.distribution == "e2kd"}
    assert built_in == set(BUILT_IN_MODELS)


def _explainer_for(model):
    return e2kd.get_explainer("bcos" if getattr(model, "bcos", False) else "gradcam")


#: e2kd's own B-cos DenseNets at random initialisation: the signal vanishes through the dense
#: blocks (maps ~1e-11), so even float32 disagrees with float64 (cosine < 0.01) and bf16 cannot be
#: judged. The bcos-package layout (bcos_v2_densenet*) is fine. Strict: fixing it fails this mark.
VANISHING = pytest.mark.xfail(strict=True, reason="random-init B-cos DenseNet maps vanish (~1e-11): fp32 != fp64")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "name",
    [
        pytest.param(n, marks=VANISHING) if n in ("bcos_densenet121", "bcos_densenet169") else n
        for n in sorted(BUILT_IN_MODELS)
    ],
)
def test_bf16_autocast_explains_and_trains_every_built_in_model(name, device):
    """Under bf16 autocast each built-in model explains — maps agree with fp32 to cosine > 0.9 (deep
    B-cos networks' input-level maps pass through every bf16 layer: 0.94 for a B-cos-v2 ResNet-50;
    the others > 0.99) — and an e2KD step with the double backward gives a float32 loss and finite
    gradients."""
    options, size = BUILT_IN_MODELS[name]
    torch.manual_seed(1)
    teacher = e2kd.get_model_builder(name, **options).build(4).to(device).eval()
    student = copy.deepcopy(teacher).train()
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.1 * p.std() * torch.randn_like(p))
    explainer = _explainer_for(teacher)
    x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    logits32, maps32, targets = explained_forward(teacher, x, explainer)
    assert (maps32.flatten(1).abs().amax(1) > 0).all(), "a float32 map is zero: pick another test input"
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
        logits16, maps16, _ = explained_forward(teacher, x, explainer, targets)
    assert torch.isfinite(maps16).all() and torch.isfinite(logits16).all()
    cos = F.cosine_similarity(maps32.flatten(1).float(), maps16.flatten(1).float())
    assert cos.min() > 0.9, f"bf16 maps differ from fp32: cosine {cos.tolist()}"
    distiller = Distiller(teacher, student, explainer=explainer, similarity=e2kd.get_similarity("cosine"), lam=1.0)
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
        out = distiller(x)
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])
    out["loss"].backward()
    grads = [p.grad for p in student.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


# -- CUDA against the CPU -------------------------------------------------------------------


@pytest.fixture
def exact_float32():
    """No TF32 (CUDA matmuls and convolutions in full float32), restored afterwards."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@cuda_only
@pytest.mark.parametrize(
    "name, explainer, feature_resolution",
    [
        ("timm", "gradcam", True),
        ("timm", "gradcam", False),
        ("bcos_small", "bcos", True),
    ],
)
def test_distiller_on_the_device_equals_the_cpu(name, explainer, feature_resolution, exact_float32):
    """The same e2KD step on the device and on the CPU: loss terms to 1e-4, gradients to 1e-3."""
    options, size = BUILT_IN_MODELS[name]
    torch.manual_seed(0)
    teacher = e2kd.get_model_builder(name, **options).build(4).eval()
    student = e2kd.get_model_builder(name, **options).build(4).eval()
    x = torch.rand(4, 3, size, size, generator=torch.Generator().manual_seed(1))
    results = {}
    for device in ("cpu", TARGET):
        t, s = copy.deepcopy(teacher).to(device), copy.deepcopy(student).to(device)
        distiller = Distiller(
            t,
            s,
            explainer=e2kd.get_explainer(explainer),
            similarity=e2kd.get_similarity("cosine"),
            lam=1.0,
            feature_resolution=feature_resolution,
        )
        out = distiller(x.to(device))
        out["loss"].backward()
        results[device] = (
            {k: out[k].item() for k in ("loss", "kd", "explanation")},
            torch.cat([p.grad.flatten() for p in s.parameters()]).cpu(),
        )
    (cpu_terms, cpu_grad), (dev_terms, dev_grad) = results["cpu"], results[TARGET]
    assert cpu_terms["explanation"] > 1e-3
    assert dev_terms == pytest.approx(cpu_terms, rel=1e-4, abs=1e-6)
    torch.testing.assert_close(dev_grad, cpu_grad, rtol=1e-3, atol=1e-5 * cpu_grad.abs().max().item())


# -- the command line on the device ---------------------------------------------------------


def _write(path, data):
    path.write_text(yaml.safe_dump(data))
    return path


@cuda_only
def test_command_line_pipeline_on_the_device(tmp_path):
    """train-teacher, distill (live bf16, frozen, fp16 with loss scaling), evaluate with figures,
    with ``train.device: auto`` (CUDA where present) and channels-last by default."""
    train = {**TINY["train"], "epochs": 1, "batch_size": 4}
    if TARGET != "cuda":
        train["device"] = TARGET
    teacher = _write(tmp_path / "t.yaml", {**TINY, "train": train, "out_dir": str(tmp_path / "t")})
    assert main(["train-teacher", str(teacher)]) == 0
    student = {
        **TINY,
        "train": train,
        "model": {"name": "small_resnet", "options": {"widths": [4, 4]}},
        "teacher": {**TINY["model"], "checkpoint": str(tmp_path / "t" / "model.pt")},
    }
    runs = {
        "bf16": {"train": {**train, "precision": "bf16"}},
        "fp16": {"train": {**train, "precision": "fp16"}},
        "frozen": {"distill": {"teacher_mode": "frozen"}},
    }
    for run, change in runs.items():
        cfg = _write(tmp_path / f"{run}.yaml", {**student, **change, "out_dir": str(tmp_path / run)})
        assert main(["distill", str(cfg)]) == 0
        steps = list(csv.DictReader((tmp_path / run / "steps.csv").open()))
        assert steps and all(float(r["explanation"]) > 0 for r in steps), run
        assert all(float(r["loss"]) == float(r["loss"]) < 1e6 for r in steps), run  # finite
        if TARGET == "cuda":
            assert float(steps[-1]["gpu_memory_mb"]) > 0
    assert main(["evaluate", str(tmp_path / "bf16"), str(tmp_path / "frozen"), "--out", str(tmp_path / "report")]) == 0
    assert (tmp_path / "report" / "explanations.png").is_file()
    metrics = json.loads((tmp_path / "bf16" / "metrics.json").read_text())
    assert set(metrics["splits"]) == {"test_id", "test_ood"}


@cuda_only
def test_notebook_api_moves_images_to_the_models_device():
    model = e2kd.get_model_builder("small_resnet", widths=[4, 8]).build(3).to(TARGET).eval()
    maps = e2kd.explain(model, torch.rand(2, 3, 16, 16))  # CPU images, model on the device
    assert maps.device.type == torch.device(TARGET).type and maps.shape == (2, 1, 16, 16)


@cuda_only
def test_torchrun_one_process_per_device(tmp_path):
    """``torchrun --nproc-per-node 1`` (NCCL on CUDA) distils and writes the run once."""
    train = {**TINY["train"], "epochs": 1, "batch_size": 4}
    if TARGET != "cuda":
        train["device"] = TARGET
    teacher = _write(tmp_path / "t.yaml", {**TINY, "train": train, "out_dir": str(tmp_path / "t")})
    assert main(["train-teacher", str(teacher)]) == 0
    student = _write(
        tmp_path / "s.yaml",
        {
            **TINY,
            "train": train,
            "out_dir": str(tmp_path / "s"),
            "model": {"name": "small_resnet", "options": {"widths": [4, 4]}},
            "teacher": {**TINY["model"], "checkpoint": str(tmp_path / "t" / "model.pt")},
        },
    )
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "1",
            "-m",
            "e2kd",
            "distill",
            str(student),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env=env,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads((tmp_path / "s" / "metrics.json").read_text())["history"][0]["explanation"] > 0
