"""What a preempted, killed or restarted training run needs to continue exactly where it was.

- :func:`capture_rng_state` / :func:`restore_rng_state`: Python's ``random``, NumPy's and torch's global
  generators and those of every CUDA device, as plain data (loads with ``weights_only=True``);
- :class:`ResumableSampler`: wraps the training sampler; an epoch can start after its first ``k``
  indices, restoring the saved RNG states once those are drawn and before any image after them is read;
- :func:`find_auto_resume`: which checkpoint of the output folder ``--resume auto`` continues from;
- :func:`stop_requested`: the predicate the step loop checks at every step boundary (a preemption
  signal asked the run to stop: write the mid-epoch checkpoint, exit 143);
- :class:`FaultInjection`: the hidden ``--debug-fault`` of the tests (a rank SIGKILLed or failing on a
  data error at a given step, on the first attempt of a ``torchrun`` job only).
"""
from __future__ import annotations

import logging
import os
import random
import signal
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Sampler

from datasets.folder import DatasetError

from .checkpoint import CheckpointError, load_checkpoint_file

__all__ = ['capture_rng_state', 'restore_rng_state', 'ResumableSampler', 'find_auto_resume', 'progress_of',
           'stop_requested', 'StopRequested', 'FaultInjection', 'EXIT_STOPPED']

_logger = logging.getLogger(__name__)

#: Exit status of a run stopped by SIGTERM after writing its checkpoint (128 + 15, as a shell reports it).
EXIT_STOPPED = 128 + signal.SIGTERM


# ---------------------------------------------------------------------------------------------- RNG states
def capture_rng_state() -> Dict[str, Any]:
    """Every global generator's state as plain data: ``python``, ``numpy``, ``torch``, ``cuda`` (one per device)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        'python': random.getstate(),
        'numpy': {'kind': kind, 'keys': torch.from_numpy(keys.astype(np.int64)), 'pos': int(pos),
                  'has_gauss': int(has_gauss), 'gauss': float(gauss)},
        'torch': torch.get_rng_state(),
        'cuda': torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        # this process's own GPU, enough to resume where another number of GPUs is visible per process
        'cuda_current': torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
    }


def restore_rng_state(state: Dict[str, Any]) -> None:
    """Set every global generator back to what :func:`capture_rng_state` returned."""
    version, internal, gauss = state['python']
    random.setstate((version, tuple(internal), gauss))
    n = state['numpy']
    np.random.set_state((n['kind'], n['keys'].numpy().astype(np.uint32), n['pos'], n['has_gauss'], n['gauss']))
    torch.set_rng_state(state['torch'])
    if state['cuda'] and torch.cuda.is_available():
        if len(state['cuda']) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state['cuda'])
        elif state.get('cuda_current') is not None:  # e.g. written with all GPUs visible, resumed with one per task
            torch.cuda.set_rng_state(state['cuda_current'])
        else:  # written before 'cuda_current' was recorded
            raise CheckpointError(f'the mid-epoch checkpoint was written with {len(state["cuda"])} visible GPUs per '
                                  f'process, this run sees {torch.cuda.device_count()}')


# ---------------------------------------------------------------------------------------------- sampler
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


# ---------------------------------------------------------------------------------------------- --resume auto
def progress_of(checkpoint: Dict[str, Any]) -> Tuple[int, int]:
    """How far a training checkpoint got, as ``(epoch, optimizer steps done in it)``: a mid-epoch checkpoint
    of epoch e after s steps is ``(e, s)``; an end-of-epoch one of epoch e is ``(e + 1, 0)``."""
    epoch = int(checkpoint['epoch'])
    if checkpoint.get('step_in_epoch') is not None:
        return epoch, int(checkpoint['step_in_epoch'])
    return epoch + 1, 0


def find_auto_resume(output_dir: Path, names: Sequence[str], world_size: int,
                     unsafe: bool = False) -> Optional[Path]:
    """The checkpoint ``--resume auto`` continues from: among ``names`` in ``output_dir``, the readable
    training checkpoint that got furthest (:func:`progress_of`).

    An unreadable file (truncated by a disk error, foreign) is skipped with a warning naming it and the
    next one is used; a mid-epoch checkpoint written by another number of processes is skipped too (its
    per-process states do not fit). Returns None when there is no checkpoint at all (a new run).

    Raises:
        CheckpointError: checkpoint files exist but none can be continued from (never start over silently).
    """
    found: List[Tuple[Tuple[int, int], Path]] = []
    rejected: List[str] = []
    for name in names:
        path = output_dir / name
        if not path.exists():
            continue
        try:
            checkpoint = load_checkpoint_file(path, unsafe=unsafe)
            if not isinstance(checkpoint, dict) or checkpoint.get('optimizer') is None or 'epoch' not in checkpoint:
                raise CheckpointError('no training state in it')
        except CheckpointError as e:
            _logger.warning('--resume auto: skipping %s (%s)', path, e)
            rejected.append(f'{name}: {e}')
            continue
        written_by = checkpoint.get('world_size')
        if checkpoint.get('step_in_epoch') is not None and written_by != world_size:
            _logger.warning('--resume auto: skipping %s (mid-epoch checkpoint of %s processes, this run has %d)',
                            path, written_by, world_size)
            rejected.append(f'{name}: written by {written_by} processes')
            continue
        found.append((progress_of(checkpoint), path))
    if found:
        return max(found, key=lambda item: item[0])[1]
    if rejected:
        raise CheckpointError(f'--resume auto: no checkpoint in {output_dir} can be continued from '
                              f'({"; ".join(rejected)}); not starting over: move them away or pass --resume FILE')
    return None


# ---------------------------------------------------------------------------------------------- stopping
class StopRequested(KeyboardInterrupt):
    """The run stopped at a step boundary on request (SIGTERM) after writing its mid-epoch checkpoint."""


def stop_requested() -> bool:
    """Whether a preemption signal (SIGTERM, which training defers to the step boundary: see
    :func:`utils.signals.handle_stop_signals`) asked this process to stop. SIGINT is not one: it ends the
    run at the step boundary without a new checkpoint (exit 130)."""
    from .signals import stop_requested as signal_received
    return signal_received() == signal.SIGTERM


# ---------------------------------------------------------------------------------------------- tests only
class FaultInjection:
    """``--debug-fault RANK:EPOCH:STEP:KIND`` (tests only): when process RANK is about to fetch batch STEP of
    epoch EPOCH, ``kill`` SIGKILLs it, ``data`` raises the data error of a training set that cannot be
    read, and ``forward`` hands the model a batch one pixel too small, so that its forward fails. Only on a
    job's first attempt (``TORCHELASTIC_RESTART_COUNT`` unset or 0), so a restart succeeds."""

    def __init__(self, spec: str, rank: int) -> None:
        try:
            r, e, s, kind = spec.split(':')
            self.rank, self.epoch, self.step, self.kind = int(r), int(e), int(s), kind
        except ValueError:
            raise ValueError(f'--debug-fault takes RANK:EPOCH:STEP:kill|data|forward, got {spec!r}') from None
        self.active = rank == self.rank and os.environ.get('TORCHELASTIC_RESTART_COUNT', '0') in ('', '0')

    def wrap(self, loader: Any, epoch: int, start_step: int) -> Any:
        """``loader`` itself, or on the chosen rank and epoch an iterable that fails at the chosen step."""
        if not self.active or epoch != self.epoch:
            return loader
        return _FailingLoader(loader, self.step - start_step, self.kind)


class _FailingLoader:
    def __init__(self, loader: Any, at: int, kind: str) -> None:
        self.loader, self.at, self.kind = loader, at, kind
        self.dataset = loader.dataset

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        for i, batch in enumerate(self.loader):
            if i == self.at:
                if self.kind == 'kill':
                    os.kill(os.getpid(), signal.SIGKILL)
                if self.kind == 'forward':
                    images, *rest = batch
                    yield (images[..., 1:, 1:], *rest)
                    continue
                raise DatasetError('32 images in a row could not be read (injected by --debug-fault)')
            yield batch
