"""Runtime: exact resume after SIGKILL, mixed precision against fp32, explain_every, logs."""

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import e2kd
from e2kd.cli import main
from e2kd.distill import Distiller
from e2kd.testing import TinyCNN

from .conftest import TINY
from .test_accelerator import DEVICES

ROOT = Path(__file__).resolve().parent.parent

KILL_AFTER_A_CHECKPOINT = r"""
import os, signal, sys
import e2kd.train as train
saves = {"n": 0}
real = train.atomic_torch_save
def save_then_die(obj, path):
    real(obj, path)
    saves["n"] += 1
    if saves["n"] == int(os.environ["KILL_AFTER"]) and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
        os.kill(os.getpid(), signal.SIGKILL)  # (under torchrun: in the first attempt only)
train.atomic_torch_save = save_then_die
from e2kd.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _killed_after_saves(saves: int, command: str, config) -> None:
    """Run ``e2kd COMMAND CONFIG`` in a process that SIGKILLs itself right after its ``saves``-th checkpoint."""
    run = subprocess.run(
        [sys.executable, "-c", KILL_AFTER_A_CHECKPOINT, command, str(config)],
        env={**os.environ, "KILL_AFTER": str(saves)},
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert run.returncode == -signal.SIGKILL, run.stderr


def _write(path, data):
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("command", ["train-teacher", "distill"])
def test_a_run_killed_mid_epoch_resumes_to_identical_weights(tmp_path, command):
    """SIGKILL after the checkpoint at step 6 (epoch 2, 2 of 4 batches done); rerunning the same
    command resumes there and ends with the weights of an uninterrupted run, bit for bit."""
    train = {**TINY["train"], "epochs": 2, "batch_size": 4, "checkpoint_every": 3}
    base = {**TINY, "train": train}
    if command == "distill":
        assert main(["train-teacher", str(_write(tmp_path / "t.yaml", {**base, "out_dir": str(tmp_path / "t")}))]) == 0
        base = {
            **base,
            "model": {"name": "small_resnet", "options": {"widths": [4, 4]}},
            "teacher": {**TINY["model"], "checkpoint": str(tmp_path / "t" / "model.pt")},
        }
    straight = _write(tmp_path / "a.yaml", {**base, "out_dir": str(tmp_path / "a")})
    assert main([command, str(straight)]) == 0
    killed = _write(tmp_path / "b.yaml", {**base, "out_dir": str(tmp_path / "b")})
    _killed_after_saves(3, command, killed)  # saves: step 3, end of epoch 1 (step 4), step 6
    state = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    assert (state["epoch"], state["position"]) == (1, 2) and not (tmp_path / "b" / "model.pt").exists()
    assert main([command, str(killed)]) == 0
    a = torch.load(tmp_path / "a" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "model.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the step log is complete and not duplicated after the resume
    steps = [int(r["step"]) for r in csv.DictReader((tmp_path / "b" / "steps.csv").open())]
    assert steps == list(range(1, 9))
    history_a = json.loads((tmp_path / "a" / "metrics.json").read_text())["history"]
    history_b = json.loads((tmp_path / "b" / "metrics.json").read_text())["history"]
    assert history_a == history_b


def test_a_run_from_the_decoded_cache_killed_mid_epoch_resumes_to_identical_weights(tmp_path):
    """The device view's path (decoded cache, per-sample crops, flips and colour jitter): SIGKILL after
    the checkpoint at step 9 (epoch 2, 2 of 7 batches done), rerun, the uninterrupted run's weights."""
    from e2kd.data.miniature import write_image_folder

    write_image_folder(tmp_path / "img", ["a", "b", "c"], {"train": 5, "val": 2}, size=(20, 40), seed=3)
    data = {
        "name": "image_folder",
        "options": {"root": str(tmp_path / "img"), "image_size": 16},
        "cache": "decoded",
        "cache_dir": str(tmp_path / "cache"),
    }
    train = {**TINY["train"], "epochs": 2, "batch_size": 2, "checkpoint_every": 3, "color_jitter": 0.3}
    base = {**TINY, "data": data, "train": train}
    straight = _write(tmp_path / "a.yaml", {**base, "out_dir": str(tmp_path / "a")})
    assert main(["train-teacher", str(straight)]) == 0
    killed = _write(tmp_path / "b.yaml", {**base, "out_dir": str(tmp_path / "b")})
    _killed_after_saves(4, "train-teacher", killed)  # saves: steps 3, 6, end of epoch 1 (step 7), 9
    state = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    assert (state["epoch"], state["position"]) == (1, 2)
    assert main(["train-teacher", str(killed)]) == 0
    a = torch.load(tmp_path / "a" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "model.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    history_a = json.loads((tmp_path / "a" / "metrics.json").read_text())["history"]
    assert history_a == json.loads((tmp_path / "b" / "metrics.json").read_text())["history"]


def test_step_and_epoch_logs_hold_losses_lr_and_throughput(tmp_path):
    cfg = _write(
        tmp_path / "t.yaml", {**TINY, "train": {**TINY["train"], "batch_size": 4}, "out_dir": str(tmp_path / "t")}
    )
    assert main(["train-teacher", str(cfg)]) == 0
    steps = list(csv.DictReader((tmp_path / "t" / "steps.csv").open()))
    epochs = list(csv.DictReader((tmp_path / "t" / "epochs.csv").open()))
    assert len(steps) == 8 and len(epochs) == 2
    assert {"step", "epoch", "loss", "lr", "images_per_s"} <= set(steps[0])
    assert all(float(r["images_per_s"]) > 0 for r in steps)
    lrs = [float(r["lr"]) for r in steps]  # cosine schedule over the 8 steps, read after each step
    assert lrs[0] == pytest.approx(0.001 * 0.5 * (1 + torch.cos(torch.tensor(torch.pi / 8)).item()), rel=1e-6)
    history = json.loads((tmp_path / "t" / "metrics.json").read_text())["history"]
    mean_loss = sum(float(r["loss"]) for r in steps[:4]) / 4
    assert float(epochs[0]["loss"]) == pytest.approx(mean_loss) == pytest.approx(history[0]["loss"])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "name, explainer, rel, grad_cos", [("small_resnet", "gradcam", 0.03, 0.99), ("bcos_small", "bcos", 0.2, 0.7)]
)
def test_bf16_autocast_matches_fp32_within_stated_tolerances(name, explainer, rel, grad_cos, device):
    """bf16 autocast (CPU, and CUDA where present) against fp32, student = teacher with 30% weight noise (explanation loss ~0.2):
    every map agrees to cosine > 0.999; the e2KD loss terms come out in float32, within 3% (Grad-CAM)
    or 20% (B-cos: its 6-channel input-level W(x) runs through every bf16 layer, and an angular error
    of ~1e-2 per map moves 1 - cos by that much); the gradient agrees to cosine > 0.99 / 0.7."""
    import copy

    torch.manual_seed(1)
    teacher = e2kd.get_model_builder(name, widths=[4, 6]).build(3)
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.3 * p.std() * torch.randn_like(p))
    teacher, student = teacher.to(device), student.to(device).eval()
    x = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(0)).to(device)
    method = e2kd.get_explainer(explainer)
    distiller = Distiller(teacher, student, explainer=method, similarity=e2kd.get_similarity("cosine"), lam=1.0)
    results = {}
    for precision in ("fp32", "bf16"):
        student.zero_grad()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = distiller(x)
            maps = method.explain(student, x, 0).float()
        out["loss"].backward()
        results[precision] = (out, maps, torch.cat([p.grad.flatten() for p in student.parameters()]))
    (fp32, m32, g32), (bf16, m16, g16) = results["fp32"], results["bf16"]
    cos = torch.nn.functional.cosine_similarity
    assert cos(m32.flatten(1), m16.flatten(1)).min() > 0.999
    assert all(bf16[k].dtype == torch.float32 for k in ("loss", "kd", "explanation"))
    assert 0.05 < fp32["explanation"].item() < 0.5  # a realistic operating point, not near-orthogonal maps
    for key in ("loss", "explanation"):
        assert bf16[key].item() == pytest.approx(fp32[key].item(), rel=rel), key
    assert cos(g32, g16, dim=0) > grad_cos


def test_explain_every_k_steps_is_plain_kd_in_between():
    teacher, student = TinyCNN(width=6), TinyCNN(width=4)
    x = torch.rand(4, 3, 8, 8)
    cosine, gradcam = e2kd.get_similarity("cosine"), e2kd.get_explainer("gradcam")
    every3 = Distiller(teacher, student, explainer=gradcam, similarity=cosine, lam=2.0, explain_every=3)
    always = Distiller(teacher, student, explainer=gradcam, similarity=cosine, lam=2.0)
    plain = Distiller(teacher, student, lam=0.0)
    for step in range(6):
        out = every3(x, step=step)
        reference = always(x) if step % 3 == 0 else plain(x)
        torch.testing.assert_close(out["loss"], reference["loss"])
        assert (out["explanation"].item() > 0) == (step % 3 == 0)
