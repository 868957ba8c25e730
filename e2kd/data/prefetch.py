"""Batches ahead of the step: loaded in background threads, copied to the device on a side stream.

A batch is a dict of tensors (and lists). :func:`loaded_ahead` runs ``load(key)`` for the next keys
in background threads (NumPy and torch copies and kernels release the GIL, so gathering
memory-mapped pixels overlaps the step); :func:`on_device_ahead` issues the host-to-device copy of batch k + 1 on a CUDA side
stream while the step of batch k runs (pinned memory makes the copy asynchronous). On the CPU both
are plain iteration of the same values.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from threading import Lock
from typing import Any, TypeVar

import torch

K = TypeVar("K")
Batch = dict[str, Any]


def loaded_ahead(load: Callable[[K], Batch], keys: Iterable[K], *, threads: int = 1, depth: int = 2) -> Iterator[Batch]:
    """``load(key)`` for each key, in order, with ``threads`` background threads and up to
    ``threads + depth`` loads started ahead. An exception in ``load`` is raised here, at the batch it
    belongs to."""
    keys = iter(keys)
    pending: deque[Future] = deque()
    depth += threads - 1
    # each thread runs its kernels on one core: the threads are the parallelism (OpenMP's thread
    # count is per thread, so the step's own count is left as it is)
    with ThreadPoolExecutor(
        threads, thread_name_prefix="e2kd-batches", initializer=torch.set_num_threads, initargs=(1,)
    ) as pool:
        try:
            for key in keys:
                pending.append(pool.submit(load, key))
                if len(pending) > depth:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:  # stopped early (an error in the step, a break): drop what was not started
            for future in pending:
                future.cancel()


def _storage_users(tensor: torch.Tensor) -> int | None:
    """How many tensors (views, saved autograd inputs, NumPy arrays through their tensor) use
    ``tensor``'s memory, or None where this torch cannot tell."""
    count = getattr(torch._C, "_storage_Use_Count", None)
    return None if count is None else int(count(tensor.untyped_storage()._cdata))


class ReusedBuffers:
    """Host tensors that are handed out again once nothing uses them any more.

    A batch-sized tensor allocated afresh is new memory to the operating system, and filling it
    costs a page fault per 4 KiB page: converting images into a fresh float batch took three times
    as long as into one already touched on the 2-core VM measured (docs/performance.md, "The data
    path"). :meth:`take` hands out an alias (a view of the whole
    buffer), so every user of the batch — the alias itself, views of it, a graph that saved it —
    holds the buffer's memory; a buffer is taken again only when none is left, which the storage's
    use count tells. Up to ``keep`` buffers are kept; where none is free (or torch cannot count the
    users) a fresh tensor is returned, so reuse never changes a value, only where it is written.
    """

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self._held: list[tuple[torch.Tensor, int]] = []  # (buffer, its use count with nobody else)
        self._lock = Lock()

    def take(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """An uninitialised tensor of ``shape`` and ``dtype``, in reused memory where some is free."""
        with self._lock:  # the check and the handing out must not interleave between threads
            for buffer, alone in self._held:
                if buffer.shape == shape and buffer.dtype == dtype and _storage_users(buffer) == alone:
                    return buffer.view(shape)
            fresh = torch.empty(shape, dtype=dtype)
            alone = _storage_users(fresh)
            if alone is None:
                return fresh
            if len(self._held) == self.keep:  # make room: drop a free buffer of another shape
                free = [i for i, (b, a) in enumerate(self._held) if _storage_users(b) == a]
                if not free:
                    return fresh
                del self._held[free[0]]
            self._held.append((fresh, alone))
            return fresh.view(shape)


def _to(value: Any, device: torch.device) -> Any:
    if torch.is_tensor(value):
        return value.to(device, non_blocking=True)
    if isinstance(value, list):
        return [_to(v, device) for v in value]
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


def tensors(value: Any) -> Iterator[torch.Tensor]:
    """Every tensor in a batch value (nested lists and dicts walked)."""
    if torch.is_tensor(value):
        yield value
    elif isinstance(value, (list, dict)):
        for v in value.values() if isinstance(value, dict) else value:
            yield from tensors(v)


def on_device_ahead(batches: Iterable[Batch], device: torch.device) -> Iterator[Batch]:
    """Each batch's tensors on ``device``. On CUDA the copy of the next batch is issued on a side
    stream before the current one is handed out, so it overlaps the step; the step's stream waits
    for the copy, and the copied tensors are recorded on it so their memory is not reused early."""
    if device.type != "cuda":
        for batch in batches:
            yield {k: _to(v, device) for k, v in batch.items()}
        return
    side = torch.cuda.Stream(device)

    def issue(batch: Batch) -> Batch:
        with torch.cuda.stream(side):
            return {k: _to(v, device) for k, v in batch.items()}

    def ready(batch: Batch) -> Batch:
        current = torch.cuda.current_stream(device)
        current.wait_stream(side)
        for t in tensors(batch):
            if t.device.type == "cuda":
                t.record_stream(current)
        return batch

    yield from one_ahead(batches, issue, ready)


def one_ahead(
    batches: Iterable[Batch], issue: Callable[[Batch], Batch], ready: Callable[[Batch], Batch]
) -> Iterator[Batch]:
    """``ready(issue(b))`` for each batch ``b``, with ``issue`` of the next batch called before the
    current one is handed out (the next copy overlaps the step of the current batch)."""
    pending: list[Batch] = []
    for batch in batches:
        if not pending:
            pending.append(issue(batch))
            continue
        out = ready(pending.pop())
        pending.append(issue(batch))
        yield out
    if pending:
        yield ready(pending.pop())
