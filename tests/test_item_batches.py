"""The item view's batch source: persistent workers draw exactly what fresh workers of each epoch drew,
uint8 images become float on the device, and a resumed epoch draws what the uninterrupted one did."""

import torch
from torch.utils.data import DataLoader, Dataset

from e2kd.data.item_batches import ItemBatches, to_float_images, worker_base_seed
from e2kd.train import EpochBatches

CPU = torch.device("cpu")


class Draws(Dataset):
    """Item i: its index as a uint8 image and one draw of the worker's torch RNG (an augmentation)."""

    def __len__(self):
        return 12

    def __getitem__(self, i):
        return {"image": torch.full((1, 2, 2), i, dtype=torch.uint8), "draw": torch.rand(())}


def _fresh(epoch, skip=0, seed=4):
    """The batches of ``epoch`` as fit read them before workers were kept: a new DataLoader whose
    generator is seeded by (seed, epoch)."""
    sampler = EpochBatches(12, 3, seed=seed)
    sampler.set_epoch(epoch, skip=skip)
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return list(DataLoader(Draws(), batch_sampler=sampler, num_workers=2, generator=generator))


def _pairs(batches):
    """(sample index, its draw) of every item, from float (x 255) or uint8 images."""
    pairs = []
    for b in batches:
        index = b["image"][:, 0, 0, 0]
        index = (index * 255).round() if index.is_floating_point() else index
        pairs += [(int(i), float(d)) for i, d in zip(index, b["draw"], strict=True)]
    return pairs


def test_kept_workers_draw_what_fresh_workers_of_each_epoch_draw():
    source = ItemBatches(Draws(), num_workers=2, seed=4)
    sampler = EpochBatches(12, 3, seed=4)
    seen, workers = {}, []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        seen[epoch] = list(source.batches(sampler, CPU))
        workers.append(tuple(w.pid for w in source.loader._iterator._workers))
    assert workers[0] == workers[1] == workers[2]  # the same two processes served every epoch
    for epoch in range(3):
        assert _pairs(seen[epoch]) == _pairs(_fresh(epoch)), epoch
        assert all(b["image"].dtype == torch.float32 for b in seen[epoch])
    draws = [sorted(d for _, d in _pairs(seen[e])) for e in range(3)]
    assert draws[0] != draws[1] != draws[2]  # (each epoch draws anew)
    resumed = ItemBatches(Draws(), num_workers=2, seed=4)  # a run resumed at the start of epoch 2
    sampler = EpochBatches(12, 3, seed=4)
    sampler.set_epoch(2)
    assert _pairs(resumed.batches(sampler, CPU)) == _pairs(seen[2])
    sampler.set_epoch(2, skip=1)  # resumed inside the epoch: what a fresh loader of that epoch draws
    assert _pairs(ItemBatches(Draws(), num_workers=2, seed=4).batches(sampler, CPU)) == _pairs(_fresh(2, skip=1))


def test_without_workers_the_batches_come_from_the_process_itself():
    sampler = EpochBatches(12, 4, seed=1)
    sampler.set_epoch(0)
    torch.manual_seed(9)
    batches = list(ItemBatches(Draws(), seed=1).batches(sampler, CPU))
    torch.manual_seed(9)
    expected = [[Draws()[i] for i in b] for b in sampler]
    assert _pairs(batches) == [(int(x["image"][0, 0, 0]), float(x["draw"])) for b in expected for x in b]
    assert len({d for _, d in _pairs(batches)}) == 12


def test_worker_seeds_are_a_dataloaders_of_that_epoch():
    generator = torch.Generator().manual_seed(7 * 100_003 + 3)
    loader = DataLoader(Draws(), batch_size=2, generator=generator)
    assert worker_base_seed(7, 3) == iter(loader)._base_seed != worker_base_seed(7, 4)


def test_uint8_images_become_float_in_the_unit_range_and_others_stay():
    batch = {"image": torch.tensor([0, 51, 255], dtype=torch.uint8), "mask": torch.tensor([1], dtype=torch.uint8)}
    out = to_float_images(batch)
    assert torch.equal(out["image"], torch.tensor([0.0, 0.2, 1.0])) and out["mask"].dtype == torch.uint8
    floats = {"image": torch.tensor([0.5])}
    assert to_float_images(floats)["image"] is floats["image"] and float(floats["image"]) == 0.5


def test_a_worker_reseeds_at_the_first_sample_of_each_epoch_as_a_fresh_worker(monkeypatch):
    """In-process, as worker 1: the first key of an epoch seeds torch, random and numpy as DataLoader
    seeds a fresh worker 1 of that epoch; later keys of the epoch continue the stream."""
    import random
    from types import SimpleNamespace

    import numpy as np
    from torch.utils.data._utils.worker import _generate_state

    from e2kd.data import item_batches

    monkeypatch.setattr(item_batches, "get_worker_info", lambda: SimpleNamespace(id=1))
    items = item_batches._EpochItems(Draws(), seed=4)
    saved = (random.getstate(), np.random.get_state())
    with torch.random.fork_rng(devices=[]):
        draws = [float(items[(0, 3)]["draw"]), float(items[(0, 5)]["draw"])]
        after = (random.random(), float(np.random.rand()))
        torch.manual_seed(worker_base_seed(4, 0) + 1)
        assert draws == [float(torch.rand(())), float(torch.rand(()))]
        random.seed(worker_base_seed(4, 0) + 1)
        np.random.seed(_generate_state(worker_base_seed(4, 0), 1))
        assert after == (random.random(), float(np.random.rand()))
        second = float(items[(1, 0)]["draw"])
        torch.manual_seed(worker_base_seed(4, 1) + 1)
        assert second == float(torch.rand(())) and items.epoch == 1
    random.setstate(saved[0])
    np.random.set_state(saved[1])


def test_nested_batches_reach_the_device_whole():
    from e2kd.data.prefetch import _to

    value = {"a": [torch.ones(1), {"b": torch.zeros(2)}], "c": "text", "d": 3}
    moved = _to(value, torch.device("cpu"))
    assert moved["c"] == "text" and moved["d"] == 3 and torch.equal(moved["a"][1]["b"], torch.zeros(2))
    assert torch.equal(moved["a"][0], torch.ones(1))
    from e2kd.data.prefetch import tensors

    found = list(tensors({"x": torch.ones(2), "y": [torch.zeros(1), {"z": torch.full((3,), 2.0)}, "w"], "n": 1}))
    assert [t.tolist() for t in found] == [[1.0, 1.0], [0.0], [2.0, 2.0, 2.0]]
