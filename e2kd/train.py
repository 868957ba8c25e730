"""A generic training loop: seeded resumable batches (split over processes), mixed precision,
checkpoints every N steps with every RNG, exact resume, logs to the configured trackers, a progress bar.
Knows no method: ``step(batch, step_index)`` returns the losses."""

from __future__ import annotations

import functools
import math
import random
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, Sampler
from tqdm.auto import tqdm

from .data.item_batches import ItemBatches
from .errors import ModelError, TrainingError
from .runtime import Runtime
from .storage import atomic_torch_save
from .tracking import Tracking

StepFn = Callable[[dict[str, torch.Tensor], int], dict[str, torch.Tensor]]
LOSS_KEYS = ("loss", "kd", "explanation", "ce")


def make_optimizer(params: Iterable[nn.Parameter], name: str, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay, nesterov=True)
    raise ValueError(f"unknown optimizer {name!r} (known: adamw, sgd)")


def lr_factor(step: int, name: str, total_steps: int, warmup_steps: int = 0) -> float:
    """Learning-rate multiplier at ``step``: linear warm-up ``(s + 1) / warmup_steps``, then
    ``cosine`` (half a cosine from 1 to 0 over the remaining steps) or ``constant`` 1."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if name == "constant":
        return 1.0
    span = max(1, total_steps - warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(step - warmup_steps, span) / span))


def make_schedule(
    optimizer: torch.optim.Optimizer, name: str, total_steps: int, warmup_steps: int = 0
) -> torch.optim.lr_scheduler.LRScheduler:
    if name not in ("cosine", "constant"):
        raise ValueError(f"unknown schedule {name!r} (known: cosine, constant)")
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, functools.partial(lr_factor, name=name, total_steps=total_steps, warmup_steps=warmup_steps)
    )


class EpochBatches(Sampler[list[int]]):
    """Batches of sample indices for one epoch, a function of (seed, epoch) alone.

    The epoch's permutation comes from a generator seeded with ``(seed, epoch)``; with several
    processes each takes every ``world_size``-th index (the permutation padded to a multiple of
    ``world_size``, as ``DistributedSampler`` does), so ``batch_size`` is per process. The last
    partial batch is dropped when at least two full ones exist. ``skip`` batches are left out at
    the start (resuming inside an epoch).
    """

    def __init__(self, n: int, batch_size: int, *, seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        self.n, self.seed, self.rank, self.world_size = n, seed, rank, world_size
        self.per_rank = math.ceil(n / world_size)
        self.batch_size = max(1, min(batch_size, self.per_rank))
        self.drop_last = self.per_rank >= 2 * self.batch_size
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def __len__(self) -> int:
        full, rest = divmod(self.per_rank, self.batch_size)
        return full if (self.drop_last or rest == 0) else full + 1

    def __iter__(self) -> Iterator[list[int]]:
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100_003 + self.epoch))
        order = torch.cat([order, order[: self.per_rank * self.world_size - self.n]])  # pad to equal shards
        mine = order[self.rank :: self.world_size].tolist()
        for b in range(self.skip, len(self)):
            yield mine[b * self.batch_size : (b + 1) * self.batch_size]


def rng_state() -> dict[str, Any]:
    """Every RNG a step may draw from (torch CPU and CUDA, numpy, Python), as tensors and lists."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    random.setstate(tuple(v if not isinstance(v, list) else tuple(v) for v in state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelError(
            f"{path}: cannot resume from this checkpoint ({type(exc).__name__}); delete it to start over"
        ) from None


def _diverged(step: int, scalars: dict[str, float], checkpoint: Path | None, saved_step: int | None) -> str:
    """The one-line message of a loss that is not finite."""
    terms = ", ".join(f"{k} {v:.4g}" for k, v in scalars.items() if k != "loss")
    kept = (
        f"the last good checkpoint, {checkpoint} (after step {saved_step}), is kept"
        if saved_step is not None
        else "no checkpoint was written yet"
    )
    return (
        f"step {step}: the loss is {scalars['loss']}"
        + (f" ({terms})" if terms else "")
        + f"; training stopped before the update and {kept}; lower train.lr, use train.precision fp32 or bf16, "
        f"or check the data, then rerun to resume"
    )


def fit(
    model: nn.Module,
    step: StepFn,
    dataset: Dataset,
    *,
    epochs: int,
    batch_size: int,
    optimizer_fn: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer],
    scheduler_fn: Callable[[torch.optim.Optimizer, int], torch.optim.lr_scheduler.LRScheduler] | None = None,
    runtime: Runtime | None = None,
    seed: int = 0,
    num_workers: int = 0,
    checkpoint: str | Path | None = None,
    checkpoint_every: int | None = None,
    log_dir: str | Path | None = None,
    tracking: Tracking | None = None,
    progress: bool = True,
    desc: str = "train",
) -> list[dict[str, float]]:
    """Train ``model`` for ``epochs``; ``step(batch, step_index)`` returns a dict with a scalar ``loss``.

    Batches come from :class:`EpochBatches` (seeded by ``seed`` and the epoch; split over
    processes). With ``checkpoint`` set, the state — model, optimizer, scheduler, loss scaler,
    every RNG, epoch and position inside it — is written there atomically every
    ``checkpoint_every`` steps and at the end of each epoch, and a later call resumes from it
    exactly (bit-identical with ``num_workers=0`` and deterministic kernels). Scalars go to
    ``tracking`` (started here with the step resumed after; closed by its owner), else to the default
    trackers in ``log_dir`` (steps.csv / epochs.csv; closed here), in the main process. The logged scalars
    are the means over processes (the global batch's); a loss that is not finite stops training
    with :class:`e2kd.errors.TrainingError` before the update, leaving the last checkpoint as it
    was. Returns the per-epoch means of every scalar ``step`` returns.

    ``dataset`` is a map-style dataset read by loader workers (``num_workers`` processes, kept across
    epochs; :class:`e2kd.data.item_batches.ItemBatches`), or a batch source with
    ``batches(sampler, device)`` yielding the batches of the sampler's epoch on the device
    (:class:`e2kd.data.batch_views.DeviceView`). Each step's wait for its batch is logged
    (``data_wait_s`` in steps.csv; its share of the epoch's step time in epochs.csv and the bar).
    """
    runtime = runtime or Runtime(torch.device("cpu"))
    sampler = EpochBatches(len(dataset), batch_size, seed=seed, rank=runtime.rank, world_size=runtime.world_size)
    per_epoch = len(sampler)
    optimizer = optimizer_fn(model.parameters())
    scheduler = scheduler_fn(optimizer, epochs * per_epoch) if scheduler_fn is not None else None
    scaler = runtime.grad_scaler()
    epoch, position, history, sums = 0, 0, [], {}
    checkpoint = Path(checkpoint) if checkpoint is not None else None
    if checkpoint is not None and checkpoint.is_file():
        state = _load_checkpoint(checkpoint)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and state.get("scheduler") is not None:
            scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        epoch, position, history, sums = state["epoch"], state["position"], state["history"], state["sums"]
    owned = tracking is None
    if tracking is None:
        tracking = Tracking.named(None, Path(log_dir) if log_dir is not None and runtime.is_main else None)
    tracking.start(resume_step=epoch * per_epoch + position)
    # a batch source (e.g. the device view), else the dataset's items through loader workers
    source = dataset if hasattr(dataset, "batches") else ItemBatches(dataset, num_workers=num_workers, seed=seed)

    saved_step = epoch * per_epoch + position if checkpoint is not None and checkpoint.is_file() else None

    def save(epoch_: int, position_: int) -> None:
        nonlocal saved_step
        if checkpoint is None:
            return
        saved_step = epoch_ * per_epoch + position_
        if not runtime.is_main:
            return
        atomic_torch_save(
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                "rng": rng_state(),
                "epoch": epoch_,
                "position": position_,
                "history": history,
                "sums": dict(sums),
            },
            checkpoint,
        )

    bar = tqdm(
        total=epochs * per_epoch,
        initial=epoch * per_epoch + position,
        desc=desc,
        unit="step",
        disable=not progress,
        leave=False,
    )
    while epoch < epochs:
        model.train()
        sampler.set_epoch(epoch, skip=position)
        epoch_batches = source.batches(sampler, runtime.device)
        sums = defaultdict(float, sums)
        waited, spent = 0.0, 0.0  # this epoch's seconds waiting for batches, and in steps (waits included)
        tick = ready = time.perf_counter()
        while (batch := next(epoch_batches, None)) is not None:
            wait = time.perf_counter() - ready  # from the end of the last step's bookkeeping
            index = epoch * per_epoch + position
            out = step(batch, index)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(out["loss"]).backward()
            # the global batch's values (every process's mean), as one process over the whole batch logs them
            scalars = runtime.mean_over_processes({k: v for k, v in out.items() if torch.is_tensor(v) and v.dim() == 0})
            if not math.isfinite(scalars["loss"]):
                raise TrainingError(_diverged(index + 1, scalars, checkpoint, saved_step))
            scaler.step(optimizer)
            scaler.update()
            if scheduler is not None:
                scheduler.step()
            position += 1
            for key, value in scalars.items():
                sums[key] += value
            sums["batches"] += 1
            now = time.perf_counter()
            images = len(batch["image"]) * runtime.world_size
            waited, spent = waited + wait, spent + (now - tick)
            row = {
                "step": index + 1,
                "epoch": epoch + 1,
                **scalars,
                "lr": optimizer.param_groups[0]["lr"],
                "images_per_s": images / max(now - tick, 1e-9),
                "data_wait_s": wait,
            }
            if runtime.device.type == "cuda":
                row["gpu_memory_mb"] = torch.cuda.max_memory_allocated(runtime.device) / 2**20
            tick = now
            tracking.log_step(row)
            bar.update(1)
            bar.set_postfix(
                {
                    "img/s": f"{row['images_per_s']:.0f}",
                    "wait": f"{waited / max(spent, 1e-9):.0%}",
                    **{k: f"{v:.3f}" for k, v in scalars.items() if k in LOSS_KEYS},
                }
            )
            if checkpoint_every and (index + 1) % checkpoint_every == 0 and position < per_epoch:
                save(epoch, position)
            ready = time.perf_counter()
        batches = max(sums.pop("batches", 0), 1)
        means = {k: v / batches for k, v in sums.items()}
        history.append({"epoch": epoch + 1, **means})
        share = {"data_wait_share": waited / spent} if spent > 0 else {}  # of the steps run in this process
        tracking.log_epoch({"epoch": epoch + 1, "last_step": (epoch + 1) * per_epoch, **means, **share})
        epoch, position, sums = epoch + 1, 0, {}
        save(epoch, 0)
    bar.close()
    if owned:
        tracking.close()
    return history
