"""Process-group setup and the few collectives the training scripts use.

One process (``python main_deit.py``) and many (``torchrun``, ``python -m torch.distributed.launch``,
SLURM ``srun``) run the same code: every helper here degrades to the single-process answer when no
process group is initialized.

How the rank is found, first match wins:

1. ``RANK`` and ``WORLD_SIZE`` in the environment (torchrun and ``torch.distributed.launch`` set
   them); the local rank comes from ``LOCAL_RANK``, else from ``--local_rank``/``--local-rank``.
2. ``SLURM_PROCID`` with ``SLURM_NTASKS > 1`` (as the DeiT release read it); the local rank is
   ``SLURM_LOCALID``, else the rank; the CUDA index is the local rank modulo the number of visible
   GPUs (clusters that show each task only its own GPU).
3. Otherwise: one process.

The backend is NCCL when the device is CUDA and gloo otherwise.
"""
from __future__ import annotations

import errno
import logging
import os
import random
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, List, Mapping, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist

from utils.common.errors import DistributedSetupError, UserError
from utils.common.flags import device_problem

__all__ = [
    'DistInfo', 'DistributedSetupError', 'init_distributed', 'is_dist_initialized', 'get_rank', 'get_world_size',
    'is_main_process', 'barrier', 'reduce', 'all_agree', 'collective_device', 'seed_everything', 'epoch_seed',
    'cleanup', 'PeerFailedError', 'step_status', 'gather_objects', 'broadcast_object',
    'check_dist_env',
]

_logger = logging.getLogger(__name__)


class PeerFailedError(UserError):
    """Another process failed (its message is in this one); ``exit_code`` is the one that process exits with."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits.

    Attributes:
        distributed: a process group is initialized (also for a launcher's single process).
        rank: global rank (0 for one process).
        world_size: number of processes (1 for one process).
        local_rank: rank on this node; selects the CUDA device.
        device: the device this process computes on.
        backend: ``'nccl'``, ``'gloo'`` or None for one process.
    """
    distributed: bool
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: Optional[str]


def _env_int(name: str) -> Optional[int]:
    value = os.environ.get(name)
    if value is None or value == '':
        return None
    try:
        return int(value)
    except ValueError as e:
        raise DistributedSetupError(f'environment variable {name}={value!r} is not an integer') from e


@dataclass(frozen=True)
class _Launch:
    """What a launcher's environment says about this process (:func:`_read_launch`)."""
    rank: int
    world: int
    local: int
    source: str  # where rank and world size came from, for messages
    slurm: bool


def _read_launch(dist_url: str, local_rank: Optional[int], world_size: Optional[int]) -> Optional[_Launch]:
    """Rank, world size and local rank from the launch environment (module docstring: first match wins),
    or None for a single process; a SLURM launch also sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``."""
    rank, env_world, env_local = _env_int('RANK'), _env_int('WORLD_SIZE'), _env_int('LOCAL_RANK')
    if rank is not None and env_world is not None:
        local = env_local if env_local is not None else (local_rank if local_rank is not None else 0)
        return _Launch(rank, env_world, local, 'RANK/WORLD_SIZE', False)
    if _env_int('SLURM_PROCID') is None or (_env_int('SLURM_NTASKS') or world_size or 1) <= 1:
        return None
    rank = _env_int('SLURM_PROCID')
    world = _env_int('SLURM_NTASKS') or int(world_size)
    local = _env_int('SLURM_LOCALID')
    if local is None:
        local = rank % max(torch.cuda.device_count(), 1)
    if dist_url == 'env://' and not ('MASTER_ADDR' in os.environ and 'MASTER_PORT' in os.environ):
        raise DistributedSetupError(
            f'SLURM task {rank} of {world}: set MASTER_ADDR and MASTER_PORT, or pass --dist_url '
            f'(e.g. tcp://HOST:PORT or file:///shared/path/init) so the tasks can find each other')
    os.environ.setdefault('RANK', str(rank))
    os.environ.setdefault('WORLD_SIZE', str(world))
    os.environ.setdefault('LOCAL_RANK', str(local))
    return _Launch(rank, world, local, 'SLURM_PROCID/SLURM_NTASKS', True)


def _pick_device(device: str, launch: _Launch) -> Tuple[torch.device, str, int]:
    """``(device, backend, local rank)`` of one of many processes: ``cuda:<local rank>`` and NCCL on CUDA,
    else the requested device and gloo."""
    dev = torch.device(device)
    if dev.type != 'cuda':
        return dev, 'gloo', launch.local
    problem = device_problem(torch.device('cuda'))
    if problem is not None:
        raise DistributedSetupError(f'--device {device}: {problem}')
    local = launch.local
    if launch.slurm:  # as DeiT: clusters that show each task only its own GPU(s) make the local id too high
        local = local % torch.cuda.device_count()
    if local >= torch.cuda.device_count():
        raise DistributedSetupError(
            f'local rank {local} but only {torch.cuda.device_count()} GPUs are visible: '
            f'launch at most that many processes per node')
    dev = torch.device('cuda', local)
    torch.cuda.set_device(dev)
    return dev, 'nccl', local


def _connect(dev: torch.device, backend: str, rank: int, world: int, dist_url: str, timeout_minutes: float) -> None:
    """Join the process group (then wait for every process)."""
    timeout = timedelta(minutes=timeout_minutes)
    bound = {'device_id': dev} if backend == 'nccl' else {}  # NCCL communicators bound to this process's GPU
    attempt = os.environ.get('TORCHELASTIC_RESTART_COUNT', '')
    if dist_url == 'env://' and attempt:
        # Restarted by torchrun (--max-restarts): the processes of this attempt meet under their own keys,
        # never reading the addresses that the processes of an earlier attempt (now dead) left in the store.
        store, _, _ = next(dist.rendezvous(dist_url, rank=rank, world_size=world, timeout=timeout))
        dist.init_process_group(backend=backend, store=dist.PrefixStore(f'cfvit/attempt_{attempt}', store),
                                world_size=world, rank=rank, timeout=timeout, **bound)
    else:
        dist.init_process_group(backend=backend, init_method=dist_url, world_size=world, rank=rank, timeout=timeout,
                                **bound)
    dist.barrier()


def init_distributed(
        device: str,
        dist_url: str = 'env://',
        local_rank: Optional[int] = None,
        world_size: Optional[int] = None,
        timeout_minutes: float = 30.0,
) -> DistInfo:
    """Initialize the process group if this process was launched as one of many.

    Args:
        device: the requested device type or name (``'cuda'``, ``'cuda:1'``, ``'cpu'``); with
            several processes on CUDA each takes ``cuda:<local_rank>``.
        dist_url: the rendezvous (``env://`` reads ``MASTER_ADDR``/``MASTER_PORT``).
        local_rank: ``--local_rank`` as passed by ``torch.distributed.launch`` (the environment's
            ``LOCAL_RANK`` wins when both are present).
        world_size: ``--world_size``; used for SLURM launches without ``SLURM_NTASKS``.
        timeout_minutes: collective timeout.

    Returns:
        A :class:`DistInfo`.

    Raises:
        DistributedSetupError: a launch environment that cannot work (e.g. more processes than GPUs).
    """
    launch = _read_launch(dist_url, local_rank, world_size)
    if launch is None:
        return DistInfo(False, 0, 1, 0, torch.device(device), None)
    rank, world = launch.rank, launch.world
    if world < 1:
        raise DistributedSetupError(f'WORLD_SIZE={world}: a launch needs at least one process')
    # before connecting: a bad rank or address would wait for the timeout
    problem = check_dist_env(rank, world, launch.local, dist_url, launch.source) if world > 1 or rank != 0 else None
    if problem is not None:
        raise DistributedSetupError(problem)
    if world == 1 and dist_url == 'env://' and not ('MASTER_ADDR' in os.environ and 'MASTER_PORT' in os.environ):
        return DistInfo(False, 0, 1, 0, torch.device(device), None)  # RANK=0 WORLD_SIZE=1 without a launcher
    # a launcher's single process (torchrun --nproc_per_node=1) still gets a process group: one-GPU runs use
    # NCCL and DistributedDataParallel as multi-GPU runs do
    dev, backend, local = _pick_device(device, launch)
    _logger.debug('process group: rank %d/%d, local rank %d, %s on %s', rank, world, local, backend, dist_url)
    _connect(dev, backend, rank, world, dist_url, timeout_minutes)
    return DistInfo(True, rank, world, local, dev, backend)


def check_dist_env(rank: int, world: int, local: int, dist_url: str, source: str,
                   environ: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """What makes a distributed launch environment unusable, in one line, or None; checked before
    connecting (a wrong rank or address otherwise waits for the rendezvous timeout or fails inside torch).

    ``source`` names where rank and world size came from (``RANK/WORLD_SIZE``, ``SLURM_PROCID/SLURM_NTASKS``).
    """
    env = os.environ if environ is None else environ
    if not 0 <= rank < world:  # (a world size below 1 is refused by init_distributed before this)
        return f'{source}: rank {rank} is not below the world size {world} (ranks are 0..{world - 1})'
    if local < 0:
        return f'the local rank is {local}, expected at least 0'
    if world == 1 or dist_url != 'env://':
        return None
    addr, port_text = env.get('MASTER_ADDR', ''), env.get('MASTER_PORT', '')
    if not addr:
        return f'{source} ask for {world} processes but MASTER_ADDR is not set: set it to the address of rank 0'
    if not port_text:
        return f'{source} ask for {world} processes but MASTER_PORT is not set: set it to a free port of rank 0'
    try:
        port = int(port_text)
    except ValueError:
        return f'MASTER_PORT={port_text!r} is not a port number'
    if not 1 <= port <= 65535:
        return f'MASTER_PORT={port} is outside 1..65535'
    # rank 0 serves the rendezvous on MASTER_PORT unless torchrun's agent already does
    if rank == 0 and env.get('TORCHELASTIC_USE_AGENT_STORE', '').lower() != 'true':
        try:
            infos = socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM)
        except OSError as e:
            return f'MASTER_ADDR={addr!r} cannot be resolved: {e.strerror or e}'
        for family, kind, proto, _, sockaddr in infos[:1]:
            with socket.socket(family, kind, proto) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the store's own socket
                try:
                    s.bind(('' if family == socket.AF_INET else '::', port))
                except OSError as e:
                    if e.errno == errno.EADDRINUSE:
                        return f'MASTER_PORT {port} is already in use on this machine: choose another free port'
    return None


def is_dist_initialized() -> bool:
    """A process group is up."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """Global rank, 0 without a process group."""
    return dist.get_rank() if is_dist_initialized() else 0


def get_world_size() -> int:
    """Number of processes, 1 without a process group."""
    return dist.get_world_size() if is_dist_initialized() else 1


def is_main_process() -> bool:
    """True on rank 0: the only process that logs and writes files."""
    return get_rank() == 0


def barrier() -> None:
    """Wait for every process (no-op for one process)."""
    if is_dist_initialized():
        dist.barrier()


def reduce(tensor: torch.Tensor, op: str = 'sum') -> torch.Tensor:
    """All-reduce a copy of ``tensor`` over the processes.

    Args:
        tensor: any shape, on this process's device.
        op: ``'sum'``, ``'mean'``, ``'max'`` or ``'min'``.

    Returns:
        The reduced tensor (same shape); ``tensor`` itself is left unchanged.
    """
    out = tensor.detach().clone()
    if not is_dist_initialized():
        return out
    ops = {'sum': dist.ReduceOp.SUM, 'mean': dist.ReduceOp.SUM, 'max': dist.ReduceOp.MAX, 'min': dist.ReduceOp.MIN}
    if op not in ops:
        raise ValueError(f'unknown reduction {op!r}')
    dist.all_reduce(out, op=ops[op])
    if op == 'mean':
        out = out / get_world_size()
    return out


def collective_device() -> torch.device:
    """Where tensors for collectives must live: the current GPU under NCCL, else the CPU."""
    if is_dist_initialized() and dist.get_backend() == 'nccl':
        return torch.device('cuda', torch.cuda.current_device())
    return torch.device('cpu')


def all_agree(ok: bool, device: Optional[torch.device] = None) -> bool:
    """True only if ``ok`` holds on every process (a collective: every process must call it).

    Lets one process (e.g. rank 0 checking the output folder) stop all of them together instead
    of leaving the others waiting in the next collective.
    """
    if not is_dist_initialized():
        return bool(ok)
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=device or collective_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def step_status(failure_code: int, stop: bool, message: str = '') -> Tuple[int, bool, Optional[Tuple[int, str]]]:
    """The per-step agreement of the training loop (a collective: every process calls it once per step).

    Args:
        failure_code: 0 when this process's step went well, else the exit status its failure means
            (2: bad input such as an unreadable training set, 1: a failed run).
        stop: this process was asked to stop (SIGTERM).
        message: this process's one-line error message when ``failure_code`` is not 0.

    Returns:
        ``(highest failure code, whether any process was asked to stop, (rank, message) of the first
        failed process or None)``. One all-reduce per step; the messages are gathered only on a failure,
        so every process learns within the step that one of them failed, instead of waiting for it in the
        next collective until the process-group timeout.
    """
    if not is_dist_initialized():
        return failure_code, stop, ((0, message) if failure_code else None)
    flags = torch.tensor([failure_code, int(stop)], dtype=torch.int32, device=collective_device())
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    code, any_stop = int(flags[0].item()), bool(flags[1].item())
    first = None
    if code:
        messages = gather_objects((failure_code, message))
        first = next((r, m) for r, (c, m) in enumerate(messages) if c)
    return code, any_stop, first


def gather_objects(obj: Any) -> List[Any]:
    """Every process's ``obj`` (picklable), in rank order (a collective); ``[obj]`` for one process."""
    if not is_dist_initialized():
        return [obj]
    out: List[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every process (a collective); ``obj`` itself for one process."""
    if not is_dist_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (all devices)."""
    seed = int(seed) % (2 ** 32)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int, rank: int, world_size: int) -> int:
    """Seed of one epoch on one process: distinct per (epoch, rank), fixed by ``--seed``.

    Re-seeding at every epoch start makes the data order, augmentation, mixup and drop path of
    epoch ``e`` independent of what ran before it, so resuming at ``e`` repeats an uninterrupted
    run exactly.
    """
    return int(seed) + int(epoch) * int(world_size) + int(rank)


def cleanup() -> None:
    """Tear the process group down (safe to call without one)."""
    if is_dist_initialized():
        dist.destroy_process_group()
