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
    assert to_float_images(floats)["image"] is floats["image"]
