"""Faults survived: a loss that stops being finite, logged losses under several processes, and a
torchrun worker killed mid-training that is restarted and resumes to the weights of an uninterrupted run."""

import csv
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml

import e2kd
from e2kd.cli import main
from e2kd.distill import Distiller
from e2kd.errors import TrainingError
from e2kd.runtime import Runtime
from e2kd.testing import TinyCNN
from e2kd.train import fit

from .conftest import TINY, end_spawned_worker
from .test_runtime import KILL_AFTER_A_CHECKPOINT

ROOT = Path(__file__).resolve().parent.parent


class Images(torch.utils.data.Dataset):
    def __init__(self, n: int = 16) -> None:
        self.x = torch.rand(n, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(5))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return {"image": self.x[i], "label": torch.tensor(i % 3)}


def test_a_loss_that_becomes_nan_stops_before_the_update_and_keeps_the_last_checkpoint(tmp_path):
    model = torch.nn.Linear(3, 1).double()
    seen = []

    def step(batch, index):
        seen.append(index)
        loss = model(batch["image"].mean((2, 3))).pow(2).mean()
        return {"loss": loss * float("nan") if index == 2 else loss, "kd": loss.detach()}

    checkpoint = tmp_path / "checkpoint.pt"
    kwargs = dict(
        epochs=2,
        batch_size=4,
        optimizer_fn=lambda p: torch.optim.SGD(p, lr=0.1),
        checkpoint=checkpoint,
        checkpoint_every=2,
        log_dir=tmp_path,
        progress=False,
    )
    with pytest.raises(TrainingError) as err:
        fit(model, step, Images(), **kwargs)
    message = str(err.value)
    assert message.startswith("step 3: the loss is nan (kd ")
    assert f"{checkpoint} (after step 2), is kept" in message and "\n" not in message
    state = torch.load(checkpoint, weights_only=True)
    assert (state["epoch"], state["position"]) == (0, 2)
    # the weights at the failure are those of step 2: the NaN step made no update
    torch.testing.assert_close(model.state_dict(), state["model"], rtol=0, atol=0)
    assert [int(r["step"]) for r in csv.DictReader((tmp_path / "steps.csv").open())] == [1, 2]

    # infinity too, and the message says when nothing was saved yet
    def infinite(batch, index):
        loss = model(batch["image"].mean((2, 3))).pow(2).sum()
        return {"loss": loss * float("inf"), "kd": torch.tensor(0.5), "ce": torch.tensor(0.25)}

    with pytest.raises(TrainingError) as err:
        fit(
            model,
            infinite,
            Images(),
            epochs=1,
            batch_size=4,
            optimizer_fn=lambda p: torch.optim.SGD(p, lr=0.1),
            progress=False,
        )
    assert str(err.value) == (
        "step 1: the loss is inf (kd 0.5, ce 0.25); training stopped before the update and no "
        "checkpoint was written yet; lower train.lr, use train.precision fp32 or bf16, or check "
        "the data, then rerun to resume"
    )


def test_a_nan_loss_through_the_command_line_is_one_line(tmp_path, capsys, monkeypatch):
    import e2kd.experiment as experiment

    real, calls = experiment.label_loss, []

    def nan_at_third_step(logits, labels):
        calls.append(1)
        loss = real(logits, labels)
        return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(experiment, "label_loss", nan_at_third_step)
    path = tmp_path / "t.yaml"
    path.write_text(
        yaml.safe_dump(
            {**TINY, "train": {**TINY["train"], "batch_size": 4, "checkpoint_every": 2}, "out_dir": str(tmp_path / "t")}
        )
    )
    assert main(["train-teacher", str(path)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("e2kd: error: step 3: the loss is nan")
    assert torch.load(tmp_path / "t" / "checkpoint.pt", weights_only=True)["position"] == 2


def _distill_steps(rank: int, world: int, folder: str) -> None:
    """Four e2KD steps (global batch 8) through ``fit``: TinyCNN has no batch statistics, so one process
    and two see the same losses."""
    torch.manual_seed(0)
    Path(folder).mkdir(exist_ok=True)
    teacher, student = TinyCNN(width=6).double(), TinyCNN(width=4).double()
    forward = student
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        forward = DistributedDataParallel(student)
    distiller = Distiller(
        teacher,
        student,
        explainer=e2kd.get_explainer("gradcam"),
        similarity=e2kd.get_similarity("cosine"),
        lam=2.0,
        student_forward=forward,
    )
    fit(
        student,
        lambda batch, index: distiller(batch["image"]),
        Images(),
        epochs=2,
        batch_size=8 // world,
        optimizer_fn=lambda p: torch.optim.SGD(p, lr=0.5),
        runtime=Runtime(torch.device("cpu"), rank=rank, world_size=world),
        log_dir=folder,
        progress=False,
    )


def _logged_worker(rank: int, world: int, init_file: str, folder: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        _distill_steps(rank, world, folder)
        dist.barrier()
    except BaseException:
        dist.destroy_process_group()
        raise
    end_spawned_worker()


def test_logged_losses_under_two_processes_are_the_global_batchs(tmp_path):
    _distill_steps(0, 1, str(tmp_path / "one"))
    mp.spawn(_logged_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "two")), nprocs=2, join=True)
    one = list(csv.DictReader((tmp_path / "one" / "steps.csv").open()))
    two = list(csv.DictReader((tmp_path / "two" / "steps.csv").open()))
    assert [r["step"] for r in one] == [r["step"] for r in two] == ["1", "2", "3", "4"]
    for a, b in zip(one, two):
        for key in ("loss", "kd", "explanation"):
            assert float(b[key]) == pytest.approx(float(a[key]), rel=1e-9), (a["step"], key)
    # the two halves of a global batch differ, so rank 0's own half would not pass the check above
    assert float(one[1]["kd"]) > 0 and float(one[1]["explanation"]) > 0
    epochs_one = list(csv.DictReader((tmp_path / "one" / "epochs.csv").open()))
    epochs_two = list(csv.DictReader((tmp_path / "two" / "epochs.csv").open()))
    assert float(epochs_two[1]["loss"]) == pytest.approx(float(epochs_one[1]["loss"]), rel=1e-9)


def _torchrun(script: Path, *args: str, restarts: int = 0) -> subprocess.CompletedProcess:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    env["KILL_AFTER"] = "1"  # rank 0 (the one that saves) dies after its first checkpoint, in the first attempt
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            "--max-restarts",
            str(restarts),
            str(script),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env=env,
    )


@pytest.mark.slow
def test_a_killed_torchrun_worker_restarts_and_ends_with_the_uninterrupted_weights(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(KILL_AFTER_A_CHECKPOINT)
    train = {**TINY["train"], "epochs": 2, "batch_size": 2, "checkpoint_every": 2}  # 9 per process: 4 steps an epoch
    configs = {}
    for name in ("straight", "killed"):
        configs[name] = tmp_path / f"{name}.yaml"
        configs[name].write_text(yaml.safe_dump({**TINY, "train": train, "out_dir": str(tmp_path / name)}))
    plain = tmp_path / "plain.py"
    plain.write_text("import sys\nfrom e2kd.cli import main\nsys.exit(main(sys.argv[1:]))\n")
    run = _torchrun(plain, "train-teacher", str(configs["straight"]))
    assert run.returncode == 0, run.stderr[-3000:]
    run = _torchrun(script, "train-teacher", str(configs["killed"]), restarts=1)
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"failed (exitcode: -{signal.SIGKILL.value}) local_rank: 0" in run.stderr  # the kill did happen
    a = torch.load(tmp_path / "straight" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "killed" / "model.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [int(r["step"]) for r in csv.DictReader((tmp_path / "killed" / "steps.csv").open())]
    assert steps == list(range(1, 9))  # resumed mid-epoch after step 2: nothing repeated or lost


class Interrupted(Exception):
    pass


def test_a_run_stopped_before_its_first_checkpoint_starts_its_logs_over(tmp_path):
    """Killed at step 3 of the first epoch, before any checkpoint: the rerun starts from step 1, and
    the rows the first attempt logged are dropped, not kept beside the new ones."""
    model = torch.nn.Linear(3, 1).double()

    def step(batch, index, fail_at=None):
        if index == fail_at:
            raise Interrupted
        return {"loss": model(batch["image"].mean((2, 3))).pow(2).mean()}

    kwargs = dict(
        epochs=2,
        batch_size=4,
        optimizer_fn=lambda p: torch.optim.SGD(p, lr=0.1),
        checkpoint=tmp_path / "checkpoint.pt",
        log_dir=tmp_path,
        progress=False,
    )
    with pytest.raises(Interrupted):
        fit(model, lambda b, i: step(b, i, fail_at=2), Images(), **kwargs)
    assert [int(r["step"]) for r in csv.DictReader((tmp_path / "steps.csv").open())] == [1, 2]
    assert not (tmp_path / "checkpoint.pt").exists()
    fit(model, step, Images(), **kwargs)
    assert [int(r["step"]) for r in csv.DictReader((tmp_path / "steps.csv").open())] == list(range(1, 9))


def test_a_loss_alone_that_is_nan_names_no_other_terms():
    model = torch.nn.Linear(3, 1).double()
    with pytest.raises(TrainingError) as err:
        fit(
            model,
            lambda b, i: {"loss": model(b["image"].mean((2, 3))).sum() * float("nan")},
            Images(),
            epochs=1,
            batch_size=4,
            optimizer_fn=lambda p: torch.optim.SGD(p, lr=0.1),
            progress=False,
        )
    assert str(err.value).startswith("step 1: the loss is nan; training stopped before the update and no checkpoint")
