"""Host memory used again for batches: a buffer is handed out again only when nothing uses it any
more (no alias, view, NumPy array or saved autograd input is left), and the views that use it give
the values they gave with fresh memory while batches are held."""

import threading
import time

import pytest
import torch

from e2kd.data.batch_views import DeviceView, resized_crops
from e2kd.data.item_batches import ItemBatches, to_float_images
from e2kd.data.prefetch import ReusedBuffers
from e2kd.train import EpochBatches

CPU = torch.device("cpu")


def _taken_again(buffers: ReusedBuffers, ptr: int, shape=(2, 3)) -> bool:
    """Whether the next tensor of ``shape`` lies at ``ptr`` (dropped at once)."""
    return buffers.take(shape).data_ptr() == ptr


@pytest.mark.parametrize("holder", ["alias", "view", "numpy", "saved input", "dict"])
def test_a_buffer_is_taken_again_only_when_nothing_uses_it(holder):
    buffers = ReusedBuffers(keep=4)
    first = buffers.take((2, 3))
    ptr = first.data_ptr()
    assert first._base is not None  # an alias of the kept buffer
    linear = torch.nn.Linear(3, 1)
    hold = {
        "alias": lambda t: t,
        "view": lambda t: t[1:],
        "numpy": lambda t: t.numpy(),
        "saved input": lambda t: linear(t),  # the graph keeps ``t`` for the weight's gradient
        "dict": lambda t: {"image": t},
    }[holder](first)
    del first
    assert not _taken_again(buffers, ptr)  # still in use through ``hold``
    del hold
    assert _taken_again(buffers, ptr)


def test_buffers_are_kept_up_to_keep_and_a_free_one_of_another_shape_makes_room():
    buffers = ReusedBuffers(keep=1)
    a = buffers.take((2, 3))
    b = buffers.take((2, 3))  # the kept one is in use: a fresh tensor, not kept
    assert b._base is None and a.data_ptr() != b.data_ptr()
    del b
    ptr = a.data_ptr()
    c = buffers.take((4,))  # the only buffer is in use: not replaced
    assert c._base is None
    del a, c
    assert _taken_again(buffers, ptr)
    d = buffers.take((5,))  # the free buffer of another shape is dropped for this one
    assert d._base is not None
    ptr = d.data_ptr()
    del d
    assert _taken_again(buffers, ptr, (5,))
    e = buffers.take((5,), torch.uint8)  # another dtype is another buffer
    assert e.dtype == torch.uint8 and e.shape == (5,) and e.data_ptr() != ptr


def test_without_use_counts_every_tensor_is_fresh(monkeypatch):
    monkeypatch.delattr(torch._C, "_storage_Use_Count")
    buffers = ReusedBuffers(keep=4)
    for _ in range(3):
        taken = buffers.take((2, 3))
        assert taken._base is None and taken.shape == (2, 3) and taken.dtype == torch.float32


def test_threads_never_hold_the_same_buffer_at_once(monkeypatch):
    """Eight threads take, fill with their own number, let the others run, and read it back; counting
    a buffer's users is made slow, so without the lock two threads would see one buffer free at once."""
    from e2kd.data import prefetch

    count = prefetch._storage_users

    def slow_count(tensor):
        users = count(tensor)
        time.sleep(0.0005)  # between the count and the handing out
        return users

    monkeypatch.setattr(prefetch, "_storage_users", slow_count)
    buffers, start, wrong = ReusedBuffers(keep=3), threading.Barrier(8), []

    def work(number: int) -> None:
        start.wait()
        for _ in range(20):
            taken = buffers.take((64,))
            taken.fill_(number)
            time.sleep(0.001)  # the others run
            if not bool((taken == number).all()):
                wrong.append(number)
            del taken  # free for the others while this one waits
            time.sleep(0.001)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not wrong


class Images(torch.utils.data.Dataset):
    def __init__(self, n: int = 20, same_size: bool = False) -> None:
        g = torch.Generator().manual_seed(3)
        sizes = [(30, 40) if same_size else (30 + i % 7, 40 - i % 5) for i in range(n)]
        self.items = [{"image": torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)} for h, w in sizes]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def _epoch(source, epoch: int, batch_size: int = 4):
    sampler = EpochBatches(len(source), batch_size, seed=2)
    sampler.set_epoch(epoch)
    return sampler, source.batches(sampler, CPU)


def test_the_device_view_on_the_cpu_reuses_dropped_batches_and_gives_held_ones_their_own_memory():
    images = Images()
    view = DeviceView(images, kind="resized_crop_flip", image_size=16, seed=5)
    for epoch in (2, 3):  # dropped as they are read: the kept buffers are used again
        bases = [b["image"]._base for b in _epoch(view, epoch)[1]]
        assert all(base is not None for base in bases) and len({id(base) for base in bases}) < len(bases)
    sampler, batches = _epoch(view, 1)
    held = list(batches)  # every batch of the epoch kept at once
    assert len({b["image"].data_ptr() for b in held}) == len(held) == 5
    later = [b["image"].data_ptr() for b in _epoch(view, 4)[1]]
    assert {b["image"].data_ptr() for b in held}.isdisjoint(later)  # none written while held
    draws = view.draws(1)
    for indices, batch in zip(sampler, held, strict=True):
        sizes = torch.tensor([list(images[i]["image"].shape[-2:]) for i in indices])
        boxes, flips = draws.take(torch.tensor(indices)).geometry(sizes, "resized_crop_flip", 16)
        expected = resized_crops([images[i]["image"] for i in indices], sizes, boxes, flips, 16)
        assert torch.equal(batch["image"], expected)


def test_uint8_batches_become_float_in_reused_memory_on_the_cpu():
    buffers = ReusedBuffers(keep=2)
    image = torch.tensor([[0, 51], [204, 255]], dtype=torch.uint8)
    out = to_float_images({"image": image}, buffers)["image"]
    assert torch.equal(out, image.float().div(255)) and out._base is not None
    ptr = out.data_ptr()
    del out
    assert to_float_images({"image": image}, buffers)["image"].data_ptr() == ptr
    source = ItemBatches(Images(12, same_size=True), seed=1)
    bases = [b["image"]._base for b in _epoch(source, 0, 2)[1]]  # the loader's batches, dropped as read
    assert len(bases) == 6 and all(base is not None for base in bases) and len({id(b) for b in bases}) < 6
