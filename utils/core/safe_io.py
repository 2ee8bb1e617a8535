"""Files and structures that come from outside the run, opened and read so that they cannot hurt it.

The readers live in :mod:`datasets.safe_read` (the data sets use them and import nothing from ``utils/``);
here they raise :class:`UnsafeInputError`, a :class:`utils.core.errors.BadInputError`.

- :func:`open_regular_nofollow`: open a file the code names itself in an output folder (the run lock,
  ``log.txt``, a write probe) without following a symbolic link and without blocking on a named pipe;
  anything but a regular file is refused (a link named ``.cfvit-run.lock`` never lets the run truncate
  the file it points to, a FIFO named ``log.txt`` never blocks the run).
- :func:`read_structured`: a JSON file read from outside (an export manifest, ``token_labels.json``, a
  class-index file): regular files only (a pipe or ``/dev/zero`` is refused, never read), at most
  ``max_bytes``, nesting at most ``max_depth`` deep, and optionally checked against a small schema.
- :func:`bounded_depth`: the nesting of an already loaded structure (a checkpoint's extra fields), walked
  without recursion, so a list nested 200,000 deep is refused instead of raising ``RecursionError``.
- :func:`check_like`: a loaded state (a scheduler's ``state_dict``) has the keys, types and lengths of
  the run's own one (a string where a number belongs is refused before it is used).
- :func:`refuse_overwriting_inputs`: no output file of a run is one of its input files.
- :func:`special_filesystem` / :func:`link_above_root`: what a data-folder walk must not enter.
- :func:`check_dist_env`: a distributed launch environment that cannot work, found before connecting.

Every error is :class:`UnsafeInputError` (a :class:`utils.core.errors.BadInputError`): one line for a
person, exit status 2 in every script.
"""
from __future__ import annotations

import errno
import functools
import math
import numbers
import os
import socket
import stat
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Tuple, Type, TypeVar, Union

from datasets import safe_read
from datasets.safe_read import MAX_DEPTH, MAX_JSON_BYTES, UnsafeFileError, link_above_root, special_filesystem

from .errors import BadInputError

__all__ = ['UnsafeInputError', 'open_regular_nofollow', 'read_structured', 'read_capped', 'bounded_depth',
           'check_step_checkpoint',
           'check_like', 'check_scheduler_state', 'check_schema', 'check_fixed_names',
           'refuse_overwriting_inputs', 'special_filesystem', 'link_above_root', 'check_dist_env',
           'MAX_JSON_BYTES', 'MAX_DEPTH']

PathLike = Union[str, os.PathLike]
_F = TypeVar('_F', bound=Callable[..., Any])


class UnsafeInputError(BadInputError, UnsafeFileError):
    """A file or structure that is refused before use (message meant for a person)."""


def _user_error(fn: _F) -> _F:
    """``fn`` of :mod:`datasets.safe_read`, its refusals raised as :class:`UnsafeInputError`."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except UnsafeInputError:
            raise
        except UnsafeFileError as e:
            raise UnsafeInputError(str(e)) from None
    return wrapper  # type: ignore[return-value]


open_regular_nofollow = _user_error(safe_read.open_regular_nofollow)
read_capped = _user_error(safe_read.read_capped)
read_structured = _user_error(safe_read.read_structured)
check_schema = _user_error(safe_read.check_schema)
_kind = safe_read._kind
_short = safe_read._short


def bounded_depth(obj: Any, max_depth: int = MAX_DEPTH, where: str = 'the data',
                  error: Type[Exception] = UnsafeInputError, leaves: Tuple[type, ...] = ()) -> int:
    """:func:`datasets.safe_read.bounded_depth`, raising ``error`` (by default :class:`UnsafeInputError`)."""
    return safe_read.bounded_depth(obj, max_depth, where, error, leaves)


def check_like(value: Any, reference: Any, where: str, error: Type[Exception] = UnsafeInputError,
               _path: str = '') -> None:
    """Raise ``error`` unless ``value`` has the shape of ``reference`` (e.g. a loaded scheduler state
    against the run's own): dict keys among the reference's, numbers where numbers are (finite or not,
    never a bool or text), text where text is, lists of the same length item by item. A reference None
    takes None or a number; anything else must be of the reference's type."""
    name = _path or 'it'
    if isinstance(reference, bool):
        ok = isinstance(value, bool)
    elif isinstance(reference, numbers.Real):
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    elif reference is None:  # an optional number (timm: metric, noise_range_t), or a list of numbers
        ok = value is None or _number(value) or (isinstance(value, (list, tuple)) and len(value) <= 16
                                                 and all(_number(v) for v in value))
    elif isinstance(reference, str):
        ok = isinstance(value, str)
    elif isinstance(reference, Mapping):
        if not isinstance(value, Mapping):
            raise error(f'{where}: {name} is {_short(value)}, expected an object')
        extra = [k for k in value if k not in reference]
        if extra:
            raise error(f'{where}: {name} has entries this run does not know: {", ".join(map(str, extra[:5]))}')
        for k, v in value.items():
            check_like(v, reference[k], where, error, f'{_path}.{k}' if _path else str(k))
        return
    elif isinstance(reference, (list, tuple)):
        if not isinstance(value, (list, tuple)) or len(value) != len(reference):
            raise error(f'{where}: {name} is {_short(value)}, expected a list of {len(reference)} values')
        for i, (v, r) in enumerate(zip(value, reference)):
            check_like(v, r, where, error, f'{_path}[{i}]')
        return
    elif type(reference).__name__ == 'Tensor' and hasattr(reference, 'dtype'):
        ok = (type(value) is type(reference) and value.dtype == reference.dtype
              and tuple(value.shape) == tuple(reference.shape))
    else:
        ok = isinstance(value, type(reference))
    if not ok:
        raise error(f'{where}: {name} is {_short(value)}, expected {_short(reference)}-like '
                    f'({type(reference).__name__})')


def _number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_scheduler_state(saved: Any, own: Mapping[str, Any], where: str,
                          error: Type[Exception] = UnsafeInputError) -> None:
    """A saved timm scheduler state fits the run's own (:func:`check_like`; timm's ``load_state_dict``
    copies every entry onto the scheduler, so the names of the fields it writes must also be the run's)."""
    check_like(saved, own, where, error)
    for key in ('param_group_field', '_initial_param_group_field'):
        if key in saved and saved[key] != own.get(key):
            raise error(f'{where}: {key} is {_short(saved[key])}, this run schedules {_short(own.get(key))}')


def refuse_overwriting_inputs(outputs: Iterable[PathLike], inputs: Iterable[Optional[PathLike]],
                              error: Type[Exception] = UnsafeInputError) -> None:
    """Raise ``error`` if a file the run will write (``outputs``, replaced by a rename) is one of its input files:
    the same file as an input (followed through links and any spelling), so that the input's path would then
    hold the run's output. Only outputs that already exist are compared, by device and inode (cheap for the
    50,000 images of a validation set: one ``stat`` each, and none when the output folder is new)."""
    existing: Dict[Tuple[int, int], str] = {}
    for out in outputs:
        try:
            st = os.lstat(out)  # the entry the rename replaces (a link there is replaced, not its target)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode):
            existing[(st.st_dev, st.st_ino)] = os.fspath(out)
    if not existing:
        return
    for given in inputs:
        if not given:
            continue
        try:
            st = os.stat(given)
        except OSError:
            continue
        out = existing.get((st.st_dev, st.st_ino))
        if out is not None:
            raise error(f'the output {out} is the input {os.fspath(given)}: the run would replace its own input; '
                        f'choose another output folder')


# ------------------------------------------------------------------------------------- distributed
def check_dist_env(rank: int, world: int, local: int, dist_url: str, source: str,
                   environ: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """What makes a distributed launch environment unusable, in one line, or None; checked before
    connecting (a wrong rank or address otherwise waits for the rendezvous timeout or fails inside torch).

    ``source`` names where rank and world size came from (``RANK/WORLD_SIZE``, ``SLURM_PROCID/SLURM_NTASKS``).
    """
    env = os.environ if environ is None else environ
    if world < 1:
        return f'{source}: the world size is {world}, expected at least 1'
    if not 0 <= rank < world:
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


def check_fixed_names(folder: PathLike, names: Iterable[str], what: str = 'output folder') -> None:
    """Refuse a ``folder/<name>`` that exists and is not a regular file, a link included: the files a run
    writes under fixed names (its log, which is appended in place) must not lead elsewhere or block."""
    for name in names:
        path = Path(folder) / name
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            continue
        except OSError as e:
            raise UnsafeInputError(f'cannot inspect {path}: {e.strerror or e}') from None
        if not stat.S_ISREG(st.st_mode):
            raise UnsafeInputError(f'{path} in the {what} is {_kind(st.st_mode)}: refused (the run writes a '
                                   f'regular file of that name; remove it or choose another folder)')


def check_step_checkpoint(checkpoint: Mapping[str, Any], world_size: int, steps_per_epoch: int, rank: int,
                          capture: Callable[[], Any], restore: Callable[[Any], None], where: str,
                          error: Type[Exception] = UnsafeInputError) -> None:
    """What a mid-epoch checkpoint says about its position and its per-process states fits this run: the step
    lies inside its epoch, there is one state per process, the running means are numbers, and this
    process's RNG states have the run's own layout and are accepted by the generators (tried, then the
    run's states are put back). ``capture`` / ``restore``: :func:`utils.train.checkpointing.capture_rng_state` and
    :func:`utils.train.checkpointing.restore_rng_state`."""
    step = checkpoint.get('step_in_epoch')
    if not (_number(step) and float(step).is_integer() and 0 <= step <= steps_per_epoch):
        raise error(f'{where}: step_in_epoch is {_short(step)}, but its epoch has {steps_per_epoch} steps (a step '
                    f'beyond its epoch would skip the epoch and save it as trained)')
    states = checkpoint.get('process_states')
    if not isinstance(states, (list, tuple)) or len(states) != world_size:
        raise error(f'{where}: process_states is {_short(states)}, expected one state per process ({world_size})')
    state = states[rank]
    if not (isinstance(state, Mapping) and isinstance(state.get('rng'), Mapping)
            and isinstance(state.get('meter'), Mapping)):
        raise error(f'{where}: the state of process {rank} is {_short(state)}, expected its rng and meter')
    meter = state['meter']
    for part in ('sums', 'counts'):
        values = meter.get(part)
        if not (isinstance(values, Mapping) and all(isinstance(k, str) and _number(v) and math.isfinite(v)
                                                     for k, v in values.items())):
            raise error(f'{where}: meter.{part} of process {rank} is {_short(values)}, expected named finite numbers')
    if any(v < 0 for v in meter['counts'].values()):
        raise error(f'{where}: meter.counts of process {rank} holds a negative count')
    rng, own = state['rng'], capture()
    check_like({k: v for k, v in rng.items() if k != 'cuda'}, {k: v for k, v in own.items() if k != 'cuda'},
               f'{where}: rng of process {rank}', error)
    cuda = rng.get('cuda', [])
    if not (isinstance(cuda, (list, tuple)) and all(type(t).__name__ == 'Tensor' for t in cuda)):
        raise error(f'{where}: rng.cuda of process {rank} is {_short(cuda)}, expected generator states')
    try:
        restore(rng)
    except Exception as e:  # noqa: BLE001 (the generators reject garbage with many types)
        raise error(f'{where}: the RNG states of process {rank} are not valid generator states '
                    f'({type(e).__name__}: {" ".join(str(e).split())[:120]})') from None
    finally:
        restore(own)
