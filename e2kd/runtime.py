"""Where and how a run executes: device, precision, process group. The one place for those
decisions; the training loop receives a :class:`Runtime`, methods never look at it.

Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) the process group is initialised here
(NCCL on CUDA, gloo on CPU); each process uses ``cuda:LOCAL_RANK``.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from .config import ExperimentConfig

AMP_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Runtime:
    """Device, precision and process group of one process."""

    device: torch.device
    precision: str = "fp32"
    rank: int = 0
    world_size: int = 1
    channels_last: bool = False

    @property
    def is_main(self) -> bool:
        """Whether this process writes files (run directory, checkpoints, caches, reports)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def autocast(self) -> contextlib.AbstractContextManager:
        """Mixed precision for the forward (and the explanation built inside it); fp32: a no-op."""
        dtype = AMP_DTYPES[self.precision]
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """A loss scaler for fp16 (disabled, i.e. a pass-through, otherwise)."""
        return torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")

    def batch(self, tensor: torch.Tensor) -> torch.Tensor:
        """A batch tensor on this device (channels-last for images when asked)."""
        tensor = tensor.to(self.device, non_blocking=True)
        if self.channels_last and tensor.dim() == 4:
            tensor = tensor.contiguous(memory_format=torch.channels_last)
        return tensor

    def model(self, model: nn.Module) -> nn.Module:
        """A model on this device (channels-last when asked)."""
        model = model.to(self.device)
        return model.to(memory_format=torch.channels_last) if self.channels_last else model

    def ddp(self, model: nn.Module) -> nn.Module:
        """The module to run forwards through: DDP-wrapped when distributed (gradients averaged
        over processes in the backward), else the model itself."""
        if not self.distributed:
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def sync_buffers(self, model: nn.Module) -> None:
        """The main process's buffers (BatchNorm running statistics) on every process: after the
        last training step each process has updated them with its own batch."""
        if self.distributed:
            for buffer in model.buffers():
                torch.distributed.broadcast(buffer, src=0)

    def mean_over_processes(self, scalars: dict[str, torch.Tensor]) -> dict[str, float]:
        """0-d tensors as floats, averaged over the processes when distributed (one transfer and
        one collective for all of them)."""
        if not scalars:
            return {}
        dtype = torch.float32 if self.device.type == "mps" else torch.float64  # (MPS has no float64)
        values = torch.stack([v.detach().reshape(()).to(dtype) for v in scalars.values()])
        if self.distributed:
            values = values.to(self.device)
            torch.distributed.all_reduce(values)
            values = values / self.world_size
        return dict(zip(scalars, values.tolist()))

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Run the block on the main process first (e.g. to write a cache), then on the others."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()


def _process_group() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; initialises the group once."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local)
        store = _attempt_store()
        if store is None:
            dist.init_process_group(backend)
        else:
            dist.init_process_group(backend, store=store, rank=int(os.environ["RANK"]), world_size=world)
    return dist.get_rank(), dist.get_world_size(), local


def _attempt_store():
    """torchrun's agent store, with keys of this restart attempt only (None when the agent hosts no
    store). The agent keeps one store across restarts; without the prefix a restarted worker can read
    the address a killed worker published and fail to connect (seen with gloo, torch 2.14)."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    import torch.distributed as dist
    from torch.distributed.constants import default_pg_timeout

    agent = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        int(os.environ["WORLD_SIZE"]),
        is_master=False,
        timeout=default_pg_timeout,
    )
    return dist.PrefixStore(f"e2kd/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", agent)


def device_of(config: ExperimentConfig) -> torch.device:
    """``train.device``, with ``auto`` = CUDA when available (under torchrun: ``cuda:LOCAL_RANK``)."""
    name = config.train.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def runtime_of(config: ExperimentConfig) -> Runtime:
    """The runtime a config asks for, in this process (joins torchrun's process group)."""
    rank, world, _ = _process_group()
    device = device_of(config)
    channels_last = config.train.channels_last if config.train.channels_last is not None else device.type == "cuda"
    if config.train.precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        from .errors import ConfigError

        raise ConfigError(
            f"{config.source}: train.precision: bf16 is not supported by {torch.cuda.get_device_name(device)}; "
            f"use fp16 or fp32"
        )
    return Runtime(device, config.train.precision, rank, world, channels_last)


def is_main_process() -> bool:
    """Whether this process reports and writes files: rank 0 under torchrun, or the only process.
    Read from torchrun's environment, so it answers before any runtime (or process group) exists;
    it agrees with :attr:`Runtime.is_main`."""
    return int(os.environ.get("RANK", "0")) == 0


def progress_enabled(config: ExperimentConfig) -> bool:
    """Progress bars: when asked for, on the main process, and stderr is a terminal."""
    return config.train.progress and sys.stderr.isatty() and is_main_process()


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """Half-precision tensors (autocast outputs) as float32; float32/float64 unchanged."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
