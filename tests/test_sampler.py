"""EpochBatches, the training loop's sampler: each epoch a new permutation of every sample, a
function of (seed, epoch) alone; process shards that do not overlap (beyond the padding) and
together cover the data; resume inside an epoch; the batch count and the last partial batch."""

import pytest

from e2kd.train import EpochBatches


def _epoch(sampler: EpochBatches, epoch: int, skip: int = 0) -> list[list[int]]:
    sampler.set_epoch(epoch, skip)
    return list(sampler)


def test_an_epoch_is_a_permutation_and_the_next_epoch_another():
    sampler = EpochBatches(12, 4, seed=3)
    orders = [sum(_epoch(sampler, e), []) for e in range(3)]
    for order in orders:
        assert sorted(order) == list(range(12))  # every sample once
    assert orders[0] != orders[1] != orders[2] != orders[0]  # the order is drawn again each epoch
    assert orders[0] != list(range(12))  # and it is shuffled
    assert sum(_epoch(EpochBatches(12, 4, seed=3), 1), []) == orders[1]  # a function of (seed, epoch) alone
    assert sum(_epoch(EpochBatches(12, 4, seed=4), 1), []) != orders[1]  # and of the seed


def test_process_shards_are_disjoint_and_cover_the_data():
    n, world = 10, 3  # 10 samples on 3 processes: 4 each, the permutation padded with its first 2 entries
    shards = []
    for rank in range(world):
        sampler = EpochBatches(n, 2, seed=1, rank=rank, world_size=world)
        assert sampler.per_rank == 4 and len(sampler) == 2
        shards.append(sum(_epoch(sampler, 0), []))
    assert [len(s) for s in shards] == [4, 4, 4]
    everything = sum(shards, [])
    assert sorted(set(everything)) == list(range(n))
    # only the padding repeats: 12 slots for 10 samples
    assert len(everything) - len(set(everything)) == 2
    # rank r takes every world-th entry of the (padded) permutation, as DistributedSampler does
    single = sum(_epoch(EpochBatches(n, 12, seed=1), 0), [])
    padded = single + single[: 3 * 4 - n]
    for rank in range(world):
        assert shards[rank] == padded[rank::world]
    # two processes of an even split share nothing
    halves = [set(sum(_epoch(EpochBatches(8, 2, seed=0, rank=r, world_size=2), 0), [])) for r in (0, 1)]
    assert not halves[0] & halves[1] and halves[0] | halves[1] == set(range(8))


def test_a_global_batch_of_two_processes_is_the_single_process_batch():
    """With batch b per process, step s of two processes together sees the samples of step s of one
    process with batch 2b: the same global batches, so the logged losses can equal."""
    one = _epoch(EpochBatches(16, 8, seed=2), 0)
    ranks = [_epoch(EpochBatches(16, 4, seed=2, rank=r, world_size=2), 0) for r in (0, 1)]
    for step, batch in enumerate(one):
        assert sorted(ranks[0][step] + ranks[1][step]) == sorted(batch)


def test_resuming_inside_an_epoch_skips_the_batches_done():
    sampler = EpochBatches(20, 3, seed=5)
    whole = _epoch(sampler, 2)
    assert _epoch(sampler, 2, skip=4) == whole[4:]
    assert _epoch(sampler, 2, skip=len(whole)) == []
    assert _epoch(sampler, 3) != whole  # set_epoch(epoch) resets the skip and changes the order


@pytest.mark.parametrize(
    "n, batch, expected_batches, last",
    [
        (20, 3, 6, 3),  # 6 full batches and a partial one of 2: dropped (at least two full batches exist)
        (7, 3, 2, 3),  # exactly two full batches: the partial one of 1 is dropped
        (5, 3, 2, 2),  # one full batch: the partial one is kept
        (4, 8, 1, 4),  # a batch larger than the data: clamped to the data
        (12, 4, 3, 4),  # no remainder
        (3, 1, 3, 1),  # one sample a batch
    ],
)
def test_batch_count_and_the_last_partial_batch(n, batch, expected_batches, last):
    sampler = EpochBatches(n, batch, seed=0)
    batches = _epoch(sampler, 0)
    assert len(sampler) == len(batches) == expected_batches
    assert len(batches[-1]) == last
    assert all(len(b) == min(batch, n) for b in batches[:-1])
    assert len(set(sum(batches, []))) == len(sum(batches, []))  # no sample twice in an epoch


def test_before_set_epoch_it_is_epoch_0_of_seed_0():
    assert list(EpochBatches(12, 4)) == _epoch(EpochBatches(12, 4, seed=0), 0) != _epoch(EpochBatches(12, 4), 1)
