"""Files and structures that come from outside the run, opened and read so that they cannot hurt it.

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
- :func:`special_filesystem` / :func:`link_above_root`: what a data-folder walk must not enter
  (``/proc``-like file systems; a link to a folder that contains the walk's own root).
- :func:`check_dist_env`: a distributed launch environment that cannot work, found before connecting.

Every error is :class:`UnsafeInputError` (a :class:`utils.validation.BadInputError`): one line for a
person, exit status 2 in every script.
"""
from __future__ import annotations

import errno
import json
import math
import numbers
import os
import socket
import stat
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Set, Tuple, Type, Union

from .validation import BadInputError

__all__ = ['UnsafeInputError', 'open_regular_nofollow', 'read_structured', 'read_capped', 'bounded_depth',
           'check_step_checkpoint',
           'check_like', 'check_scheduler_state', 'check_schema', 'check_fixed_names',
           'refuse_overwriting_inputs', 'special_filesystem', 'link_above_root', 'check_dist_env',
           'MAX_JSON_BYTES', 'MAX_DEPTH']

PathLike = Union[str, os.PathLike]

#: Largest JSON file read from outside (manifests, label metadata, class-index files).
MAX_JSON_BYTES = 16 << 20
#: Deepest nesting accepted in a structured file or a checkpoint's plain-data fields.
MAX_DEPTH = 32

_NOFOLLOW = getattr(os, 'O_NOFOLLOW', 0)
_NONBLOCK = getattr(os, 'O_NONBLOCK', 0)
_CLOEXEC = getattr(os, 'O_CLOEXEC', 0)


class UnsafeInputError(BadInputError):
    """A file or structure that is refused before use (message meant for a person)."""


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, 'a folder'), (stat.S_ISFIFO, 'a named pipe'), (stat.S_ISSOCK, 'a socket'),
                       (stat.S_ISCHR, 'a character device'), (stat.S_ISBLK, 'a block device'),
                       (stat.S_ISLNK, 'a symbolic link')):
        if test(mode):
            return name
    return 'not a regular file'


def open_regular_nofollow(path: PathLike, flags: int = os.O_RDONLY, mode: int = 0o644,
                          what: str = 'file') -> int:
    """``os.open(path, flags)`` that refuses a symbolic link at ``path`` and anything but a regular file.

    The file is opened with ``O_NOFOLLOW | O_NONBLOCK`` (a FIFO is refused at once, never waited on;
    ``O_NONBLOCK`` is cleared again for a regular file). Pass ``O_CREAT`` to create it; never pass
    ``O_TRUNC`` (truncate after this check, with ``os.ftruncate``).

    Returns:
        The file descriptor (the caller closes it).

    Raises:
        UnsafeInputError: a link, a pipe, a device, a folder... (``what`` names the file in the message).
        OSError: any other failure to open (permissions, a missing folder).
    """
    if flags & os.O_TRUNC:
        raise ValueError('open_regular_nofollow: truncate after the check (os.ftruncate), not with O_TRUNC')
    try:
        fd = os.open(path, flags | _NOFOLLOW | _NONBLOCK | _CLOEXEC, mode)
    except OSError as e:
        if e.errno == errno.ELOOP or (e.errno == errno.EMLINK and os.path.islink(path)):
            raise UnsafeInputError(f'{what} {path} is a symbolic link: refused (the run never writes through a link '
                                   f'there; remove it)') from None
        if e.errno in (errno.ENXIO, errno.EISDIR, errno.ENODEV):  # a FIFO without reader, a folder, a device
            try:
                kind = _kind(os.lstat(path).st_mode)
            except OSError:
                kind = 'not a regular file'
            raise UnsafeInputError(f'{what} {path} is {kind}: refused (expected a regular file)') from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafeInputError(f'{what} {path} is {_kind(st.st_mode)}: refused (expected a regular file)')
        if _NONBLOCK:
            import fcntl
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_capped(path: PathLike, max_bytes: int, what: str, follow: bool = True) -> bytes:
    """At most ``max_bytes`` of a regular file (links to one are followed unless ``follow`` is False)."""
    if follow:
        try:
            fd = os.open(path, os.O_RDONLY | _NONBLOCK | _CLOEXEC)
        except OSError as e:
            if e.errno == errno.ENOENT:
                raise
            raise UnsafeInputError(f'cannot read {what} {path}: {e.strerror or e}') from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise UnsafeInputError(f'{what} {path} is {_kind(st.st_mode)}: refused (expected a regular file)')
        except BaseException:
            os.close(fd)
            raise
    else:
        fd = open_regular_nofollow(path, what=what)
    try:
        if os.fstat(fd).st_size > max_bytes:
            raise UnsafeInputError(f'{what} {path} is larger than {max_bytes} bytes: refused')
        chunks, size = [], 0
        while True:  # the size may grow while reading: the cap holds anyway
            chunk = os.read(fd, min(1 << 20, max_bytes + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
            if size > max_bytes:
                raise UnsafeInputError(f'{what} {path} is larger than {max_bytes} bytes: refused')
        return b''.join(chunks)
    finally:
        os.close(fd)


def read_structured(path: PathLike, max_bytes: int = MAX_JSON_BYTES, max_depth: int = MAX_DEPTH,
                    what: str = 'file', schema: Optional[Mapping[str, Any]] = None, follow: bool = True) -> Any:
    """The JSON object of a file from outside: a regular file (links to one followed unless ``follow`` is
    False) of at most ``max_bytes``, UTF-8, nested at most ``max_depth`` deep, checked against ``schema``.

    Args:
        schema: ``{key: type or tuple of types}`` the top-level object must have (extra keys are allowed);
            a list ``[type]`` means a list whose every item has that type. ``float`` accepts any finite
            number (not a bool), ``int`` an integer (not a bool).

    Raises:
        FileNotFoundError: no such file (the caller says what it means).
        UnsafeInputError: everything else, in one line.
    """
    data = read_capped(path, max_bytes, what, follow)
    try:
        text = data.decode('utf-8')
    except UnicodeDecodeError as e:
        raise UnsafeInputError(f'{what} {path} is not UTF-8 text: {e.reason} at byte {e.start}') from None
    try:
        obj = json.loads(text)
    except RecursionError:
        raise UnsafeInputError(f'{what} {path} is nested deeper than {max_depth} levels: refused') from None
    except ValueError as e:  # JSONDecodeError, and int() of a 10,000-digit number
        raise UnsafeInputError(f'{what} {path} is not valid JSON: {" ".join(str(e).split())}') from None
    bounded_depth(obj, max_depth, f'{what} {path}')
    if schema is not None:
        check_schema(obj, schema, f'{what} {path}')
    return obj


def _type_ok(value: Any, kind: Any) -> bool:
    if isinstance(kind, list):
        return isinstance(value, list) and all(_type_ok(v, kind[0]) for v in value)
    if isinstance(kind, tuple):
        return any(_type_ok(value, k) for k in kind)
    if kind is float:
        return (isinstance(value, numbers.Real) and not isinstance(value, bool)
                and math.isfinite(float(value)))
    if kind is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if kind is None:
        return value is None
    return isinstance(value, kind)


def _type_name(kind: Any) -> str:
    if isinstance(kind, list):
        return f'a list of {_type_name(kind[0])}'
    if isinstance(kind, tuple):
        return ' or '.join(_type_name(k) for k in kind)
    return {float: 'a finite number', int: 'an integer', str: 'text', bool: 'true/false', dict: 'an object',
            list: 'a list', None: 'null'}.get(kind, getattr(kind, '__name__', str(kind)))


def check_schema(obj: Any, schema: Mapping[str, Any], where: str) -> None:
    """Raise :class:`UnsafeInputError` unless ``obj`` is a dict with every key of ``schema`` of its type."""
    if not isinstance(obj, dict):
        raise UnsafeInputError(f'{where} holds {type(obj).__name__}, expected an object with '
                               f'{", ".join(schema)}')
    missing = [k for k in schema if k not in obj]
    if missing:
        raise UnsafeInputError(f'{where} lacks {", ".join(missing)}')
    for key, kind in schema.items():
        if not _type_ok(obj[key], kind):
            raise UnsafeInputError(f'{where}: {key} is {_short(obj[key])}, expected {_type_name(kind)}')


def _short(value: Any, limit: int = 60) -> str:
    try:
        text = repr(value)
    except (RecursionError, ValueError):
        text = f'a {type(value).__name__}'
    return text if len(text) <= limit else text[:limit] + '...'


def bounded_depth(obj: Any, max_depth: int = MAX_DEPTH, where: str = 'the data',
                  error: Type[Exception] = UnsafeInputError, leaves: Tuple[type, ...] = ()) -> int:
    """The nesting depth of ``obj`` (lists, tuples, dicts, sets and ``argparse.Namespace``), walked without
    recursion; objects of a type in ``leaves`` (e.g. tensors) are not entered.

    Raises:
        ``error``: nested deeper than ``max_depth``.
    """
    deepest = 0
    stack: List[Tuple[Any, int]] = [(obj, 0)]
    seen: Dict[int, int] = {}  # container id -> deepest level it was entered at (shared parts: once per level)
    while stack:
        value, depth = stack.pop()
        if leaves and isinstance(value, leaves):
            continue
        if isinstance(value, dict):
            children: Iterable[Any] = (*value.keys(), *value.values())
        elif isinstance(value, (list, tuple, set, frozenset)):
            children = value
        elif hasattr(value, '__dict__') and type(value).__name__ == 'Namespace':
            children = vars(value).values()
        else:
            continue
        depth += 1
        if depth > max_depth:  # also ends a structure that contains itself (possible in a pickle)
            raise error(f'{where} is nested deeper than {max_depth} levels: refused')
        if seen.get(id(value), 0) >= depth:
            continue
        seen[id(value)] = depth
        deepest = max(deepest, depth)
        stack.extend((child, depth) for child in children)
    return deepest


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


# ------------------------------------------------------------------------------------- folder walks
_SPECIAL_FS = frozenset({'proc', 'sysfs', 'devtmpfs', 'devpts', 'cgroup', 'cgroup2', 'debugfs', 'tracefs',
                         'securityfs', 'pstore', 'bpf', 'configfs', 'fusectl', 'mqueue', 'hugetlbfs',
                         'binfmt_misc', 'efivarfs', 'autofs', 'rpc_pipefs', 'nsfs', 'selinuxfs'})
_special_devices: Optional[Set[int]] = None


def _special_device_ids() -> Set[int]:
    """``st_dev`` of every mounted special file system (from ``/proc/self/mountinfo``; ``/proc``, ``/sys``
    and ``/dev/pts`` where it cannot be read)."""
    global _special_devices
    if _special_devices is None:
        found: Set[int] = set()
        try:
            with open('/proc/self/mountinfo', encoding='utf-8', errors='replace') as f:
                for line in f:
                    fields = line.split()
                    if ' - ' not in line or len(fields) < 5:
                        continue
                    fstype = line.split(' - ', 1)[1].split()[0]
                    if fstype in _SPECIAL_FS:
                        major, minor = fields[2].split(':')
                        found.add(os.makedev(int(major), int(minor)))
        except (OSError, ValueError):
            pass
        if not found:
            for path in ('/proc', '/sys'):
                try:
                    found.add(os.stat(path).st_dev)
                except OSError:
                    pass
        _special_devices = found
    return _special_devices


def special_filesystem(st: os.stat_result) -> bool:
    """The file or folder of ``st`` lies on a kernel pseudo file system (``/proc``, ``/sys``, ...)."""
    return st.st_dev in _special_device_ids()


def link_above_root(path: str, roots: Sequence[str]) -> bool:
    """``path`` (a link to a folder) leads to a folder that contains one of ``roots`` (real paths): walking
    it would walk the root again, or the whole file system (``ln -s / cls/up``)."""
    target = os.path.realpath(path)
    return any(root == target or root.startswith(target.rstrip(os.sep) + os.sep) for root in roots)


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
    run's states are put back). ``capture`` / ``restore``: :func:`utils.preemption.capture_rng_state` and
    :func:`utils.preemption.restore_rng_state`."""
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


#: Largest coarse grid side a script builds: (2 * 32)^2 = 4096 fine tokens. The released models use 7 and 9;
#: --coarse-stage-size 1000 would allocate position embeddings and attention maps of many gigabytes.
MAX_COARSE_STAGE_SIZE = 32


def grid_side(text: str) -> int:
    """argparse type of ``--coarse-stage-size``: an integer in ``[1, MAX_COARSE_STAGE_SIZE]`` (refused
    before any model is built)."""
    import argparse

    from .misc import positive_int
    value = positive_int(text)
    if value > MAX_COARSE_STAGE_SIZE:
        raise argparse.ArgumentTypeError(f'must be at most {MAX_COARSE_STAGE_SIZE} (a {2 * value}x{2 * value} fine '
                                         f'grid), got {value}')
    return value


#: Largest learning rate a flag takes: larger ones overflow float32 in the optimizer (--lr 1e300 was a
#: RuntimeError traceback) and no recipe comes near it.
MAX_LR = 1e3
#: Largest count a size flag takes (batch sizes, sides): larger ones overflow the loaders' index arithmetic.
MAX_COUNT = 2 ** 31 - 1
#: Largest seed (torch.manual_seed takes 64-bit values).
MAX_SEED = 2 ** 63 - 1
