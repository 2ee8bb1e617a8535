"""utils/train/samplers.py: evaluation shards, and the training sampler that starts mid-epoch."""
from __future__ import annotations

import torch
from torch.utils.data import RandomSampler, SequentialSampler
from torch.utils.data.distributed import DistributedSampler

from utils.train.samplers import ResumableSampler, ShardSampler


def test_shards_are_disjoint_cover_the_set_and_are_not_padded():
    data = list(range(10))
    shards = [list(ShardSampler(data, rank, 3)) for rank in range(3)]
    assert shards == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    assert [len(ShardSampler(data, rank, 3)) for rank in range(3)] == [4, 3, 3]
    assert list(ShardSampler(data, 5, 8)) == [5] and list(ShardSampler(data[:2], 3, 4)) == []


def test_a_pass_from_the_start_is_the_wrapped_samplers():
    sampler = ResumableSampler(SequentialSampler(range(6)))
    assert list(sampler) == [0, 1, 2, 3, 4, 5] and len(sampler) == 6


def test_start_after_skips_the_first_indices_once_and_keeps_the_length():
    sampler = ResumableSampler(SequentialSampler(range(6)))
    sampler.start_after(4)
    assert len(sampler) == 6  # the full epoch's: step counts and the schedule stay those of an uninterrupted run
    assert list(sampler) == [4, 5]
    assert list(sampler) == [0, 1, 2, 3, 4, 5]  # the next pass starts from the beginning again


def test_a_resumed_random_pass_continues_the_uninterrupted_order_after_restoring_the_rng():
    torch.manual_seed(7)
    full = list(ResumableSampler(RandomSampler(range(20))))
    calls = []

    def restore():  # called after the skipped draws, before the first index is handed out
        calls.append(len(calls))

    torch.manual_seed(7)
    sampler = ResumableSampler(RandomSampler(range(20)))
    sampler.start_after(8, restore)
    it = iter(sampler)
    assert calls == []  # nothing runs before the first index is asked for
    first = next(it)
    assert calls == [0]
    assert [first, *it] == full[8:]  # the same global-RNG draws as a pass from the start


def test_set_epoch_reaches_a_distributed_sampler_and_is_harmless_without_one():
    inner = DistributedSampler(range(8), num_replicas=2, rank=0, shuffle=True, seed=1)
    sampler = ResumableSampler(inner)
    sampler.set_epoch(0)
    epoch0 = list(sampler)
    sampler.set_epoch(1)
    assert inner.epoch == 1 and len(epoch0) == 4 and list(sampler) != epoch0  # a new shuffle each epoch
    ResumableSampler(SequentialSampler(range(3))).set_epoch(5)  # no set_epoch on the wrapped sampler: no error
