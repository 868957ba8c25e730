"""Mixup with consistent teaching: the mix and the mixed label loss by hand, reproducible draws,
the teacher and the student seeing the same mixed image, and the one-line errors."""

import math

import pytest
import torch
import yaml

from e2kd import mixup
from e2kd.cli import main
from e2kd.distill import Distiller

from .conftest import TINY
from .test_early_errors import _fails_with


def test_mix_by_hand():
    x = torch.tensor([[1.0, 2.0], [3.0, 6.0], [5.0, 10.0]])
    got = mixup.mix(x, 0.25, torch.tensor([2, 0, 1]))
    # 0.25 * x[i] + 0.75 * x[perm[i]]
    assert got.tolist() == [[4.0, 8.0], [1.5, 3.0], [3.5, 7.0]]


def test_mixed_label_loss_by_hand():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    labels = torch.tensor([0, 1])
    lam, perm = 0.3, torch.tensor([1, 0])

    def ce(z, y):
        return -(z[y] - math.log(math.exp(z[0]) + math.exp(z[1])))

    rows = logits.tolist()
    plain = (ce(rows[0], 0) + ce(rows[1], 1)) / 2
    swapped = (ce(rows[0], 1) + ce(rows[1], 0)) / 2
    assert mixup.mixed_label_loss(logits, labels, lam, perm).item() == pytest.approx(lam * plain + (1 - lam) * swapped)
    # multi-hot labels: BCE is linear in the targets, so the mix equals BCE against mixed targets
    multi = torch.tensor([[1.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    mixed_targets = lam * multi + (1 - lam) * multi[perm]
    reference = torch.nn.functional.binary_cross_entropy_with_logits(logits, mixed_targets)
    assert mixup.mixed_label_loss(logits, multi, lam, perm).item() == pytest.approx(reference.item(), rel=1e-12)


def test_draws_are_a_function_of_seed_and_step():
    lam, perm = mixup.draw(0.4, 8, seed=3, step=17)
    again = mixup.draw(0.4, 8, seed=3, step=17)
    assert lam == again[0] and torch.equal(perm, again[1])
    assert sorted(perm.tolist()) == list(range(8))
    assert mixup.draw(0.4, 8, seed=3, step=18)[0] != lam and mixup.draw(0.4, 8, seed=4, step=17)[0] != lam
    uniform = [mixup.draw(1.0, 2, seed=0, step=i)[0] for i in range(4000)]  # Beta(1, 1) is uniform on [0, 1]
    assert abs(sum(uniform) / len(uniform) - 0.5) < 0.02
    assert abs(sum(u < 0.25 for u in uniform) / len(uniform) - 0.25) < 0.03


def _write(path, data):
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def teacher_run(tmp_path):
    cfg = _write(tmp_path / "t.yaml", {**TINY, "train": {**TINY["train"], "epochs": 1}, "out_dir": str(tmp_path / "t")})
    assert main(["train-teacher", str(cfg)]) == 0
    return tmp_path / "t" / "model.pt"


def _student(tmp_path, teacher, **changes):
    data = {
        **TINY,
        "model": {"name": "small_resnet", "options": {"widths": [4, 4]}},
        "teacher": {**TINY["model"], "checkpoint": str(teacher)},
        "out_dir": str(tmp_path / "s"),
        "train": {**TINY["train"], "epochs": 1, "batch_size": 6, "mixup": 0.4},
    }
    for section, values in changes.items():
        data[section] = {**data.get(section, {}), **values}
    return _write(tmp_path / "s.yaml", data)


def test_teacher_and_student_see_the_same_mixed_image(tmp_path, teacher_run, monkeypatch):
    """Every distiller call receives the mixed batch of that step (λ and π drawn from (seed, step)),
    and the distiller runs teacher and student on that one tensor."""
    mixes, calls = [], []
    real_mix, real_call = mixup.mix, Distiller.__call__

    def spy_mix(x, lam, perm):
        out = real_mix(x, lam, perm)
        mixes.append((x.clone(), lam, perm.clone(), out))
        return out

    def spy_call(self, images, *args, **kwargs):
        calls.append((images, kwargs.get("step")))
        return real_call(self, images, *args, **kwargs)

    monkeypatch.setattr(mixup, "mix", spy_mix)
    monkeypatch.setattr(Distiller, "__call__", spy_call)
    assert main(["distill", str(_student(tmp_path, teacher_run))]) == 0
    assert len(calls) == len(mixes) == 3  # 18 images, batches of 6
    for (x, lam, perm, mixed), (images, step) in zip(mixes, calls):
        assert images is mixed
        want_lam, want_perm = mixup.draw(0.4, 6, TINY["seed"], step)
        assert lam == want_lam and torch.equal(perm, want_perm) and 0 < lam < 1
        torch.testing.assert_close(mixed, lam * x + (1 - lam) * x[perm])


def test_a_teacher_trains_with_mixup_on_mixed_images_and_mixed_labels(tmp_path, monkeypatch):
    """Each step's label loss is the mixed one, with that step's λ and π and the batch's labels,
    on logits of the mixed images; the logged loss is that value."""
    import csv

    import e2kd.experiment as experiment

    seen, real_loss, real_mix = [], mixup.mixed_label_loss, mixup.mix
    mixed = []
    monkeypatch.setattr(
        mixup, "mix", lambda x, lam, perm: mixed.append((x.clone(), lam, perm)) or real_mix(x, lam, perm)
    )

    def spy(logits, labels, lam, perm):
        value = real_loss(logits, labels, lam, perm)
        seen.append((labels.clone(), lam, perm.clone(), value.item()))
        return value

    monkeypatch.setattr(mixup, "mixed_label_loss", spy)
    monkeypatch.setattr(experiment, "label_loss", lambda *a: pytest.fail("an unmixed label loss under mixup"))
    cfg = _write(
        tmp_path / "t.yaml",
        {**TINY, "train": {**TINY["train"], "mixup": 0.2, "batch_size": 6}, "out_dir": str(tmp_path / "t")},
    )
    assert main(["train-teacher", str(cfg)]) == 0
    steps = list(csv.DictReader((tmp_path / "t" / "steps.csv").open()))
    assert len(seen) == len(mixed) == len(steps) == 6  # 18 images, batch 6, 2 epochs
    for index, ((labels, lam, perm, value), (_images, mix_lam, mix_perm), row) in enumerate(zip(seen, mixed, steps)):
        want_lam, want_perm = mixup.draw(0.2, 6, 0, index)
        assert lam == mix_lam == want_lam and torch.equal(perm, want_perm) and torch.equal(mix_perm, want_perm)
        assert labels.shape == (6,) and float(row["loss"]) == pytest.approx(value, rel=1e-6)
    assert len({tuple(p.tolist()) for _, _, p, _ in seen}) > 1


def test_config_errors_are_one_line(tmp_path, teacher_run, capsys):
    _fails_with(capsys, ["distill", str(_student(tmp_path, teacher_run, train={"mixup": 0}))], "train.mixup")
    _fails_with(
        capsys,
        ["distill", str(_student(tmp_path, teacher_run, distill={"teacher_mode": "frozen"}))],
        "train.mixup: a frozen teacher's outputs are stored for unmixed images",
    )
    _fails_with(
        capsys,
        ["distill", str(_student(tmp_path, teacher_run, distill={"ce_weight": 0.5}))],
        "train.mixup: a mixed image has two labels",
    )
    guided = _write(tmp_path / "g.yaml", {**TINY, "train": {**TINY["train"], "mixup": 0.2, "guidance": {}}})
    _fails_with(capsys, ["train-teacher", str(guided)], "train.mixup: mixed images have no boxes to guide towards")
