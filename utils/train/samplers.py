"""The samplers of the training loaders: evaluation shards, and a training sampler that can start mid-epoch."""
from __future__ import annotations

from typing import Callable, Iterator, Optional

from torch.utils.data import Dataset, Sampler

__all__ = ['ShardSampler', 'ResumableSampler']


class ShardSampler(Sampler):
    """Every ``world_size``-th index from ``rank``: disjoint shards, no padding (exact evaluation)."""

    def __init__(self, dataset: Dataset, rank: int, world_size: int) -> None:
        self.indices = list(range(rank, len(dataset), world_size))  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class ResumableSampler(Sampler):
    """The training sampler (RepeatAugSampler, DistributedSampler, RandomSampler) with a mid-epoch start.

    After :meth:`start_after` ``(k, restore)``, the next pass draws the wrapped sampler's order as usual
    (the same global-RNG draws as a pass from the start), drops its first ``k`` indices, calls
    ``restore()`` (which sets the RNG states saved at that point), and yields the rest. The length stays
    the full epoch's, so step counts and the schedule are those of an uninterrupted run.
    """

    def __init__(self, sampler: Sampler) -> None:
        self.sampler = sampler
        self._skip = 0
        self._restore: Optional[Callable[[], None]] = None

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.sampler, 'set_epoch'):
            self.sampler.set_epoch(epoch)

    def start_after(self, num_indices: int, restore: Optional[Callable[[], None]] = None) -> None:
        self._skip, self._restore = int(num_indices), restore

    def __iter__(self) -> Iterator[int]:
        it = iter(self.sampler)
        skip, restore = self._skip, self._restore
        self._skip, self._restore = 0, None
        for _ in range(skip):
            next(it)
        if restore is not None:
            restore()
        yield from it

    def __len__(self) -> int:
        return len(self.sampler)  # type: ignore[arg-type]
