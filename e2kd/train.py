"""A generic training loop: progress bar, per-epoch checkpoints, resume. Knows no method."""

from __future__ import annotations

import functools
import math
from collections import defaultdict
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from .errors import ModelError
from .runs import atomic_torch_save

StepFn = Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]


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


def make_schedule(optimizer: torch.optim.Optimizer, name: str, total_steps: int,
                  warmup_steps: int = 0) -> torch.optim.lr_scheduler.LRScheduler:
    if name not in ("cosine", "constant"):
        raise ValueError(f"unknown schedule {name!r} (known: cosine, constant)")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(
        lr_factor, name=name, total_steps=total_steps, warmup_steps=warmup_steps))


def fit(
    model: nn.Module,
    step: StepFn,
    loader: Iterable[dict[str, torch.Tensor]],
    *,
    epochs: int,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    checkpoint: str | Path | None = None,
    progress: bool = True,
    desc: str = "train",
) -> list[dict[str, float]]:
    """Train ``model`` for ``epochs``; ``step(batch)`` returns a dict with a scalar ``loss``.

    With ``checkpoint`` set, the state after every epoch is written there atomically and a
    later call resumes from it. Returns the per-epoch means of every scalar ``step`` returns.
    """
    start, history = 0, []
    if checkpoint is not None and Path(checkpoint).is_file():
        try:
            state = torch.load(checkpoint, map_location="cpu", weights_only=False)
            model.load_state_dict(state["model"])
        except Exception as exc:
            raise ModelError(
                f"{checkpoint}: cannot resume from this checkpoint ({type(exc).__name__}); delete it to start over"
            ) from None
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and state.get("scheduler") is not None:
            scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        start, history = state["epoch"], state["history"]
    bar = tqdm(range(start, epochs), desc=desc, initial=start, total=epochs, disable=not progress, leave=False)
    for epoch in bar:
        model.train()
        sums: dict[str, float] = defaultdict(float)
        batches = 0
        for batch in loader:
            out = step(batch)
            optimizer.zero_grad(set_to_none=True)
            out["loss"].backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            for key, value in out.items():
                if value.dim() == 0:
                    sums[key] += float(value.detach())
            batches += 1
        means = {k: v / max(batches, 1) for k, v in sums.items()}
        history.append({"epoch": epoch + 1, **means})
        bar.set_postfix({k: f"{v:.3f}" for k, v in means.items() if k in ("loss", "kd", "explanation", "ce")})
        if checkpoint is not None:
            atomic_torch_save(
                {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "scheduler": scheduler.state_dict() if scheduler is not None else None,
                 "rng": torch.get_rng_state(), "epoch": epoch + 1, "history": history},
                checkpoint,
            )
    bar.close()
    return history
