"""The training loop's parts, each against a value computed independently: RNG state round trips,
the checkpoint loader's refusal of pickles, the TensorBoard calls, the runtime's precision and layout
decisions and its process-group set-up (with a real TCP store)."""

import random
import socket
import sys
import types

import numpy as np
import pytest
import torch
from torch import nn

from e2kd import runtime as runtime_module
from e2kd import train
from e2kd.config import load_config_dict
from e2kd.errors import ConfigError, ModelError, TrainingError
from e2kd.runtime import Runtime, device_of, progress_enabled, runtime_of
from e2kd.tracking import Tracking
from e2kd.train import _load_checkpoint, rng_state, set_rng_state

from .conftest import TINY


def _draws() -> tuple:
    return torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)], random.gauss(0, 1)


def test_rng_state_survives_a_checkpoint_round_trip_for_torch_numpy_and_python(tmp_path):
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    random.gauss(0, 1)  # leaves a cached second Gaussian in Python's state (its third field)
    torch.save(rng_state(), tmp_path / "rng.pt")  # as the checkpoint stores it
    expected = _draws()
    torch.manual_seed(7), np.random.seed(8), random.seed(9)
    assert _draws() != expected
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert _draws() == expected


class _Pickled:
    pass


def test_a_resume_checkpoint_that_needs_unpickling_is_refused_in_one_line(tmp_path):
    path = tmp_path / "last.pt"
    torch.save({"model": _Pickled()}, path)
    with pytest.raises(ModelError) as caught:
        _load_checkpoint(path)
    assert str(caught.value) == (
        f"{path}: cannot resume from this checkpoint (UnpicklingError); delete it to start over"
    )
    torch.save({"epoch": torch.tensor(3)}, path)
    assert _load_checkpoint(path)["epoch"].device == torch.device("cpu")


class _Writer:
    """Records what the tensorboard tracker hands TensorBoard."""

    made: list = []

    def __init__(self, folder, purge_step=None):
        self.folder, self.purge_step, self.scalars, self.closed = folder, purge_step, [], False
        _Writer.made.append(self)

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def close(self):
        self.closed = True


@pytest.fixture
def tensorboard(monkeypatch):
    _Writer.made = []
    module = types.ModuleType("torch.utils.tensorboard")
    module.SummaryWriter = _Writer
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", module)
    return _Writer.made


def test_tensorboard_gets_every_scalar_but_the_counters_at_its_step(tmp_path, tensorboard):
    log = Tracking.named(["tensorboard"], tmp_path)
    log.start()
    log.log_results({"splits": {"val": {"accuracy": 0.25}}})  # before any step: at step 0
    log.log_step({"step": 3, "epoch": 1, "loss": 0.5, "lr": 0.1})
    log.log_epoch({"epoch": 2, "last_step": 8, "loss": 0.25})
    log.log_results({"splits": {"test": {"accuracy": 0.75, "curve": [1, 2]}}})
    log.close()
    (writer,) = tensorboard
    assert writer.folder == str(tmp_path / "tensorboard") and writer.purge_step is None
    assert writer.scalars == [
        ("val/accuracy", 0.25, 0),
        ("step/epoch", 1, 3),
        ("step/loss", 0.5, 3),
        ("step/lr", 0.1, 3),
        ("epoch/loss", 0.25, 2),
        ("test/accuracy", 0.75, 3),
    ]
    assert writer.closed
    resumed = Tracking.named(["tensorboard"], tmp_path)
    resumed.start(resume_step=5)  # events after step 5 of the killed run are purged
    assert tensorboard[1].purge_step == 6
    Tracking.named(["tensorboard"], None).start()  # no run folder (not the main process): no writer made
    assert len(tensorboard) == 2


def test_resuming_drops_the_log_rows_written_after_the_checkpoint(tmp_path):
    log = Tracking.named(["csv"], tmp_path)
    log.start()
    for step in range(1, 7):
        log.log_step({"step": step, "loss": step / 10})
    log.log_epoch({"epoch": 1, "last_step": 3, "loss": 0.2})
    log.log_epoch({"epoch": 2, "last_step": 6, "loss": 0.5})
    Tracking.named(["csv"], tmp_path).start(resume_step=4)
    steps = (tmp_path / "steps.csv").read_text().splitlines()
    assert steps == ["step,loss", "1,0.1", "2,0.2", "3,0.3", "4,0.4"]
    assert (tmp_path / "epochs.csv").read_text().splitlines() == ["epoch,last_step,loss", "1,3,0.2"]
    Tracking.named(["csv"], tmp_path).start(
        resume_step=0
    )  # nothing kept: the files go, the next rows write a header again
    assert not (tmp_path / "steps.csv").exists() and not (tmp_path / "epochs.csv").exists()


@pytest.mark.parametrize(
    "precision, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32)]
)
def test_autocast_computes_in_the_configured_precision(precision, dtype):
    a = torch.randn(4, 4)
    with Runtime(torch.device("cpu"), precision).autocast():
        assert (a @ a).dtype == dtype


def test_only_fp16_scales_the_loss():
    assert [Runtime(torch.device("cpu"), p).grad_scaler().is_enabled() for p in ("fp32", "bf16", "fp16")] == [
        False,
        False,
        True,
    ]


def test_channels_last_applies_to_image_batches_and_models_only_when_asked():
    images, labels = torch.randn(2, 3, 4, 5), torch.arange(2)
    last = Runtime(torch.device("cpu"), channels_last=True)
    assert last.batch(images).is_contiguous(memory_format=torch.channels_last)
    assert not images.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(last.batch(images), images) and torch.equal(last.batch(labels), labels)
    assert not Runtime(torch.device("cpu")).batch(images).is_contiguous(memory_format=torch.channels_last)
    conv = nn.Conv2d(3, 2, 3)
    assert last.model(conv).weight.is_contiguous(memory_format=torch.channels_last)
    assert (
        not Runtime(torch.device("cpu"))
        .model(nn.Conv2d(3, 2, 3))
        .weight.is_contiguous(memory_format=torch.channels_last)
    )


def test_one_process_passes_values_through_and_does_not_wrap():
    single = Runtime(torch.device("cpu"))
    assert single.mean_over_processes({"loss": torch.tensor(0.1, dtype=torch.float64), "kd": torch.tensor([1.5])}) == {
        "loss": 0.1,
        "kd": 1.5,
    }  # in float64: 0.1 is not rounded to float32's 0.10000000149
    assert single.mean_over_processes({}) == {}
    model = nn.Linear(2, 2)
    assert single.ddp(model) is model and single.is_main and not single.distributed
    order = []
    with single.main_first():
        order.append("block")
    assert order == ["block"]
    assert not Runtime(torch.device("cpu"), rank=1, world_size=2).is_main


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_each_restart_attempt_uses_its_own_keys_of_the_agents_store(monkeypatch):
    port = _free_port()
    agent = torch.distributed.TCPStore("127.0.0.1", port, 2, is_master=True, wait_for_workers=False)
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "3")
    runtime_module._attempt_store().set("address", "x")
    assert agent.get("e2kd/attempt_3/address") == b"x"
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT")
    runtime_module._attempt_store().set("address", "y")
    assert agent.get("e2kd/attempt_0/address") == b"y"
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "False")
    assert runtime_module._attempt_store() is None


def test_the_process_group_is_joined_with_torchruns_rank_and_world(monkeypatch):
    calls = []
    fake = types.SimpleNamespace(
        is_initialized=lambda: False,
        get_rank=lambda: 1,
        get_world_size=lambda: 2,
        init_process_group=lambda backend, **kw: calls.append((backend, kw)),
    )
    monkeypatch.setattr(torch, "distributed", fake)
    monkeypatch.setitem(sys.modules, "torch.distributed", fake)
    monkeypatch.setattr(runtime_module, "_attempt_store", lambda: "store")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert runtime_module._process_group() == (1, 2, 1)
    assert calls == [("gloo", {"store": "store", "rank": 1, "world_size": 2})]
    monkeypatch.setattr(runtime_module, "_attempt_store", lambda: None)
    runtime_module._process_group()
    assert calls[-1] == ("gloo", {})
    monkeypatch.delenv("LOCAL_RANK")  # (torchrun always sets it; without it, device 0)
    devices = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", devices.append)
    assert runtime_module._process_group() == (1, 2, 0)
    assert calls[-1] == ("nccl", {}) and devices == [0]  # NCCL on CUDA, on this process's GPU
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert runtime_module._process_group() == (0, 1, 0) and len(calls) == 3


def _config(**train):
    return load_config_dict({**TINY, "train": {**TINY["train"], **train}})


def test_device_and_layout_follow_the_config(monkeypatch):
    assert device_of(_config(device="cpu")) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert device_of(_config(device="auto")) == torch.device("cpu")
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert device_of(_config(device="cuda")) == torch.device("cuda", 3)
    assert device_of(_config(device="cuda:1")) == torch.device("cuda", 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert device_of(_config(device="auto")) == torch.device("cuda", 3)
    monkeypatch.delenv("LOCAL_RANK")
    assert device_of(_config(device="cuda")) == torch.device("cuda", 0)
    got = runtime_of(_config(device="cpu", precision="bf16"))
    assert (got.device, got.precision, got.rank, got.world_size, got.channels_last) == (
        torch.device("cpu"),
        "bf16",
        0,
        1,
        False,
    )
    assert runtime_of(_config(device="cpu", channels_last=True)).channels_last


def test_bf16_on_a_gpu_without_it_is_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: f"Tesla V100 ({device})")
    monkeypatch.setattr(runtime_module, "device_of", lambda config: torch.device("cuda", 0))
    with pytest.raises(
        ConfigError,
        match=r"^config: train.precision: bf16 is not supported by Tesla V100 \(cuda:0\); "
        r"use fp16 or fp32$",
    ):
        runtime_of(_config(precision="bf16"))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    got = runtime_of(_config(precision="bf16"))
    assert got.channels_last  # channels-last by default on CUDA


def test_progress_bars_only_on_the_main_process_of_a_terminal(monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert progress_enabled(_config(progress=True))
    assert not progress_enabled(_config(progress=False))
    monkeypatch.setenv("RANK", "1")
    assert not progress_enabled(_config(progress=True))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    assert not progress_enabled(_config(progress=True))


# -- fit: what its defaults and its resume restore, seen from outside --------------------------------


class _Recorded(torch.utils.data.Dataset):
    """Sample i is the float i."""

    def __init__(self, n: int = 12) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):
        return {"image": torch.tensor([float(i)])}


def _fit(**kwargs):
    """fit over _Recorded (12 samples, batches of 4, lr 0); the batches seen, as lists of floats."""
    model = nn.Linear(1, 1)
    seen = []

    def step(batch, index):
        seen.append(batch["image"].flatten().tolist())
        return {"loss": model(batch["image"]).pow(2).mean()}

    train.fit(
        model,
        step,
        _Recorded(),
        batch_size=4,
        optimizer_fn=lambda p: torch.optim.SGD(p, lr=0.0),
        **{"progress": False, "epochs": 1, **kwargs},
    )
    return seen


def test_fit_draws_the_batches_of_its_seed_with_the_workers_asked_for(monkeypatch):
    def order(seed):
        sampler = train.EpochBatches(12, 4, seed=seed)
        sampler.set_epoch(0)
        return [[float(i) for i in b] for b in sampler]

    assert _fit() == order(0)
    assert _fit(seed=3) == order(3) != order(0)
    workers = []  # (no worker process is started: one forked from a test runner may hang)

    def loader(dataset, *, num_workers, persistent_workers, **kwargs):
        workers.append((num_workers, persistent_workers))
        return torch.utils.data.DataLoader(dataset, num_workers=0, **kwargs)

    from e2kd.data import item_batches

    monkeypatch.setattr(item_batches, "DataLoader", loader)
    _fit(), _fit(num_workers=3, epochs=2)
    assert workers == [(0, False), (3, True)]  # started once for both epochs, kept between them


def test_fit_shows_a_progress_bar_named_by_desc_unless_asked_not_to(capsys, tmp_path):
    _fit(progress=True)
    err = capsys.readouterr().err
    assert "train:" in err and "3/3" in err and "step/s" in err
    _fit(progress=True, checkpoint=tmp_path / "c.pt")
    capsys.readouterr()
    _fit(progress=True, checkpoint=tmp_path / "c.pt", epochs=2)  # resumed after epoch 1: the bar starts at 3 of 6
    err = capsys.readouterr().err
    assert "3/6" in err and "6/6" in err and "0/6" not in err
    assert "img/s=" in err and "loss=" in err  # throughput and loss beside the bar
    assert err.endswith("\r")  # and the finished bar is cleared, not left on screen
    (tmp_path / "c.pt").unlink()
    _fit(progress=True, checkpoint=tmp_path / "c.pt", checkpoint_every=2, epochs=2)
    capsys.readouterr()
    state = torch.load(tmp_path / "c.pt", weights_only=True)
    state.update(epoch=1, position=1)  # as if killed after step 4 of 6
    torch.save(state, tmp_path / "c.pt")
    _fit(progress=True, checkpoint=tmp_path / "c.pt", epochs=2)
    err = capsys.readouterr().err
    assert "4/6" in err and "3/6" not in err
    _fit(progress=True, desc="distill run_a")
    assert "distill run_a:" in capsys.readouterr().err
    _fit(progress=False)
    assert capsys.readouterr().err == ""
    model = nn.Linear(1, 1)
    train.fit(
        model,
        lambda b, i: {"loss": model(b["image"]).sum()},
        _Recorded(),
        epochs=1,
        batch_size=4,
        optimizer_fn=lambda p: torch.optim.SGD(p, lr=0.0),
    )  # the default shows it
    assert "train:" in capsys.readouterr().err


def test_a_resumed_run_that_diverges_names_the_checkpoint_it_resumed_from(tmp_path):
    """Resumed at epoch 1, position 1 of 3 batches an epoch (step 4), the NaN at step 6 keeps that one."""
    model = nn.Linear(1, 1)
    checkpoint = tmp_path / "checkpoint.pt"
    kwargs = dict(
        batch_size=4,
        optimizer_fn=lambda p: torch.optim.SGD(p, lr=0.01),
        checkpoint=checkpoint,
        checkpoint_every=4,
        progress=False,
    )

    def step(batch, index, fail_at=None):
        if index == fail_at:
            raise KeyboardInterrupt
        loss = model(batch["image"]).pow(2).mean()
        return {"loss": loss * float("nan") if index == 5 and fail_at is None else loss}

    with pytest.raises(KeyboardInterrupt):
        train.fit(model, lambda b, i: step(b, i, fail_at=4), _Recorded(), epochs=3, **kwargs)
    state = torch.load(checkpoint, weights_only=True)
    assert (state["epoch"], state["position"]) == (1, 1)
    with pytest.raises(TrainingError) as err:
        train.fit(model, step, _Recorded(), epochs=3, **kwargs)
    assert str(err.value).startswith(
        f"step 6: the loss is nan; training stopped before the update and the last good "
        f"checkpoint, {checkpoint} (after step 4), is kept"
    )


def _resumable(model, step, epochs, checkpoint, *, lr, **kwargs):
    """fit over _Recorded (12 samples, batches of 4) with SGD at ``lr``, resuming from ``checkpoint``."""
    train.fit(
        model,
        step,
        _Recorded(),
        epochs=epochs,
        batch_size=4,
        progress=False,
        checkpoint=checkpoint,
        optimizer_fn=lambda p: torch.optim.SGD(p, lr=lr),
        **kwargs,
    )


def test_the_loss_scalers_state_survives_a_resume(tmp_path):
    """fp16 on the CPU: a loss whose scaled gradient overflows at the initial scale (2^16) makes the
    scaler skip steps and halve its scale until it fits; a resumed run must keep the lowered scale (a
    fresh scaler would skip, i.e. drop, the first steps after the resume again), so both runs end equal."""

    def run(epochs, model, checkpoint):
        def step(batch, index):
            return {"loss": (model(batch["image"]) * 1e34).mean()}

        _resumable(model, step, epochs, checkpoint, runtime=Runtime(torch.device("cpu"), "fp16"), lr=1e-36)
        return model.weight.item()

    torch.manual_seed(0)
    whole = run(2, nn.Linear(1, 1), tmp_path / "whole.pt")
    torch.manual_seed(0)
    model = nn.Linear(1, 1)
    run(1, model, tmp_path / "split.pt")
    assert torch.load(tmp_path / "split.pt", weights_only=True)["scaler"]["scale"] < 2.0**16  # steps were skipped
    after_one = model.weight.item()
    assert run(2, model, tmp_path / "split.pt") == whole != after_one


class _Trackers:
    """What fit tells its trackers (a stand-in for :class:`e2kd.tracking.Tracking`)."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.steps: list[dict] = []
        self.epochs: list[dict] = []

    def start(self, resume_step: int = 0) -> None:
        self.calls.append(("start", resume_step))

    def log_step(self, row: dict) -> None:
        self.calls.append(("step", row["step"]))
        self.steps.append(row)

    def log_epoch(self, row: dict) -> None:
        self.calls.append(("epoch", row["epoch"]))
        self.epochs.append(row)

    def close(self, failed: bool = False) -> None:
        self.calls.append(("close", failed))


def test_a_resume_continues_the_schedule_and_starts_the_trackers_after_the_steps_done(tmp_path, monkeypatch):
    """Two epochs of three steps, the learning rate falling every step, a checkpoint every two steps,
    the run stopped by an error in step 5 (index 4): resumed from the checkpoint after step 4 (epoch 2,
    one step in), it logs steps 5 and 6 at the uninterrupted run's learning rates and ends with its
    weight; its trackers are started after step 4 (a fresh run's after 0) and left open for the caller
    who made them — fit closes only the trackers it made itself."""

    def run(epochs, checkpoint, tracking, fail_at=None):
        torch.manual_seed(0)
        model = nn.Linear(1, 1)

        def step(batch, index):
            if index == fail_at:
                raise RuntimeError("stopped")
            return {"loss": (model(batch["image"]) - 1).pow(2).mean()}

        _resumable(
            model,
            step,
            epochs,
            checkpoint,
            lr=0.01,
            checkpoint_every=2,
            tracking=tracking,
            scheduler_fn=lambda opt, total: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 / (1 + s)),
        )
        return model.weight.item()

    whole = _Trackers()
    weight = run(2, tmp_path / "whole.pt", whole)
    assert whole.calls == [("start", 0), *[("step", i) for i in (1, 2, 3)], ("epoch", 1)] + [
        *[("step", i) for i in (4, 5, 6)],
        ("epoch", 2),
    ]
    with pytest.raises(RuntimeError, match="stopped"):
        run(2, tmp_path / "split.pt", _Trackers(), fail_at=4)
    resumed = _Trackers()
    assert run(2, tmp_path / "split.pt", resumed) == weight
    assert resumed.calls == [("start", 4), ("step", 5), ("step", 6), ("epoch", 2)]
    # (the rate a step logs is the one after its scheduler step: 0.01 / (1 + steps done))
    assert [r["lr"] for r in resumed.steps] == [r["lr"] for r in whole.steps[4:]] == pytest.approx([0.01 / 6, 0.01 / 7])
    made = _Trackers()  # the trackers fit makes itself (log_dir) are closed at the end
    monkeypatch.setattr(train.Tracking, "named", classmethod(lambda cls, loggers, folder, config=None: made))
    _fit(log_dir=tmp_path / "logs")
    assert made.calls[0] == ("start", 0) and made.calls[-1] == ("close", False)


@pytest.fixture
def half_second_clock(monkeypatch):
    """The training loop's clock, 0.5 s later at each reading (the time module itself untouched)."""
    readings = iter(0.5 * i for i in range(1000))
    monkeypatch.setattr(train, "time", types.SimpleNamespace(perf_counter=lambda: next(readings)))


def test_fit_logs_each_step_and_epoch_with_its_counters_means_and_throughput(tmp_path, half_second_clock):
    """2 epochs of 3 batches of 4, the loss of step i equal to i: epoch means 1 and 4. A clock that
    advances 0.5 s a reading: an epoch starts with a reading; each step reads it when its batch arrives
    (a wait of 0.5 s since the last step ended), when it is done (its step time: from the previous step's
    end, 1 s for the first step of an epoch, else 1.5 s: 4 or 8/3 images a second) and when its
    bookkeeping ends; the epoch's wait share is 3 × 0.5 / (1 + 1.5 + 1.5)."""
    import csv

    model = nn.Linear(1, 1)

    def step(batch, index):
        return {"loss": model(batch["image"]).sum() * 0 + index, "kd": torch.tensor(2.0 * index)}

    history = train.fit(
        model,
        step,
        _Recorded(),
        epochs=2,
        batch_size=4,
        log_dir=tmp_path,
        progress=False,
        optimizer_fn=lambda p: torch.optim.SGD(p, lr=0.0),
    )
    assert history == [{"epoch": 1, "loss": 1.0, "kd": 2.0}, {"epoch": 2, "loss": 4.0, "kd": 8.0}]
    steps = list(csv.DictReader((tmp_path / "steps.csv").open()))
    assert [(int(r["step"]), int(r["epoch"])) for r in steps] == [(1, 1), (2, 1), (3, 1), (4, 2), (5, 2), (6, 2)]
    assert [float(r["images_per_s"]) for r in steps] == pytest.approx([4.0, 8 / 3, 8 / 3] * 2)
    assert [float(r["data_wait_s"]) for r in steps] == [0.5] * 6
    epochs = list(csv.DictReader((tmp_path / "epochs.csv").open()))
    assert [(r["epoch"], r["last_step"], r["loss"], r["kd"], r["data_wait_share"]) for r in epochs] == [
        ("1", "3", "1.0", "2.0", "0.375"),
        ("2", "6", "4.0", "8.0", "0.375"),
    ]
    # one batch an epoch: its mean is its value; the wait share of a 1-s epoch is there too (0.5 / 1)
    recorded = _Trackers()
    one = train.fit(
        model,
        lambda b, i: step(b, i + 3),
        _Recorded(4),
        epochs=1,
        batch_size=4,
        progress=False,
        tracking=recorded,
        optimizer_fn=lambda p: torch.optim.SGD(p, lr=0.0),
    )
    assert one == [{"epoch": 1, "loss": 3.0, "kd": 6.0}]
    assert recorded.epochs == [{"epoch": 1, "last_step": 1, "loss": 3.0, "kd": 6.0, "data_wait_share": 0.5}]


def test_a_process_of_two_logs_the_global_batchs_throughput(monkeypatch, half_second_clock):
    class Half(Runtime):  # rank 0 of 2, with the mean over processes of one process
        def mean_over_processes(self, scalars):
            return Runtime(torch.device("cpu")).mean_over_processes(scalars)

    model = nn.Linear(1, 1)
    rows = []
    monkeypatch.setattr(train.Tracking, "log_step", lambda self, row: rows.append(row))
    train.fit(
        model,
        lambda b, i: {"loss": model(b["image"]).sum()},
        _Recorded(),
        epochs=1,
        batch_size=3,
        runtime=Half(torch.device("cpu"), rank=0, world_size=2),
        progress=False,
        optimizer_fn=lambda p: torch.optim.SGD(p, lr=0.0),
    )
    assert [r["images_per_s"] for r in rows] == [6.0, 4.0]  # 2 x 3 images in 1 s, then in 1.5 s (see above)


def test_a_parameter_without_a_gradient_in_a_step_is_not_updated():
    """Gradients are cleared to None, not zero: AdamW skips a parameter the step did not use (a zero
    gradient would still move it by its momentum and weight decay)."""
    model = nn.Linear(1, 1)
    after = []

    def step(batch, index):
        after.append(model.bias.detach().clone())
        used = model(batch["image"]) if index == 0 else batch["image"] * model.weight
        return {"loss": used.sum()}

    train.fit(
        model,
        step,
        _Recorded(),
        epochs=1,
        batch_size=4,
        progress=False,
        optimizer_fn=lambda p: torch.optim.AdamW(p, lr=0.1, weight_decay=0.1),
    )
    assert not torch.equal(after[0], after[1]) and torch.equal(after[1], after[2])
    assert torch.equal(after[2], model.bias.detach())


def test_checkpoints_are_written_every_k_steps_inside_an_epoch_and_at_its_end(tmp_path, monkeypatch):
    saved = []
    monkeypatch.setattr(
        train, "atomic_torch_save", lambda state, path: saved.append((state["epoch"], state["position"]))
    )
    _fit(checkpoint=tmp_path / "c.pt", checkpoint_every=1, epochs=2)
    # the end of an epoch is saved once, as the start of the next (never as position 3 of 3)
    assert saved == [(0, 1), (0, 2), (1, 0), (1, 1), (1, 2), (2, 0)]


def test_logged_scalars_are_python_floats_whatever_the_tensors_dtype():
    got = Runtime(torch.device("cpu")).mean_over_processes(
        {"loss": torch.tensor(0.5, dtype=torch.bfloat16), "count": torch.tensor(3)}
    )
    assert got == {"loss": 0.5, "count": 3.0} and all(type(v) is float for v in got.values())
    (count,) = Runtime(torch.device("cpu")).mean_over_processes({"count": torch.tensor(3)}).values()
    assert type(count) is float  # an integer tensor alone too


def test_batches_and_models_go_to_the_runtimes_device():
    meta = Runtime(torch.device("meta"))
    assert meta.batch(torch.ones(2, 3)).is_meta and meta.model(nn.Linear(2, 2)).weight.is_meta


def test_distributed_wrapping_and_buffer_sync_use_this_processs_gpu_and_rank_0(monkeypatch):
    """What the runtime hands torch.distributed, recorded without a process group (the real thing
    runs under torchrun in tests/test_faults.py and tests/test_ddp.py)."""
    import torch.nn.parallel

    wrapped, sent = [], []
    monkeypatch.setattr(
        torch.nn.parallel, "DistributedDataParallel", lambda model, **kw: wrapped.append((model, kw)) or "wrapped"
    )
    monkeypatch.setattr(torch.distributed, "broadcast", lambda tensor, src: sent.append((tensor, src)))
    model = nn.BatchNorm1d(2)
    assert Runtime(torch.device("cuda", 1), rank=1, world_size=2).ddp(model) == "wrapped"
    assert Runtime(torch.device("cpu"), rank=1, world_size=2).ddp(model) == "wrapped"
    assert wrapped == [(model, {"device_ids": [1]}), (model, {"device_ids": None})]
    Runtime(torch.device("cpu"), rank=1, world_size=2).sync_buffers(model)
    assert [(id(t), src) for t, src in sent] == [(id(b), 0) for b in model.buffers()] and len(sent) == 3
    Runtime(torch.device("cpu")).sync_buffers(model)  # one process: nothing to send
    assert len(sent) == 3
