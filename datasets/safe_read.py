"""Reading files and structures that come from outside the run so that they cannot hurt it (plain
functions, no ``utils/`` import: the data sets and the scripts use them alike).

- :func:`open_regular`: the one open of a file from outside or under a fixed name: never blocking on a
  named pipe, anything but a regular file refused, a symbolic link too when asked (``follow=False``: a
  link named ``.cfvit-run.lock`` never lets a run truncate the file it points to, a FIFO named ``log.txt``
  never blocks it).
- :func:`read_structured`: a JSON file read from outside (an export manifest, ``token_labels.json``, a
  class-index file, iNaturalist annotations): regular files only (a pipe or ``/dev/zero`` is refused,
  never read), at most ``max_bytes``, nesting at most ``max_depth`` deep, optionally checked against a
  small schema (:func:`check_schema`).
- :func:`bounded_depth`: the nesting of an already loaded structure (a checkpoint's extra fields), walked
  without recursion, so a list nested 200,000 deep is refused instead of raising ``RecursionError``.
- :func:`check_like`: a loaded state (a scheduler's ``state_dict``) has the keys, types and lengths of
  the run's own one (a string where a number belongs is refused before it is used).
- :func:`special_filesystem` / :func:`link_above_root`: what a data-folder walk must not enter
  (``/proc``-like file systems; a link to a folder that contains the walk's own root).

Every refusal is :class:`UnsafeFileError` (a ``ValueError``), which every script's entry point
(``utils.common.entry.run_entry_point``) reports as bad input: one line, exit status 2.
"""
from __future__ import annotations

import errno
import fcntl
import json
import math
import numbers
import os
import stat
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Set, Tuple, Type, Union

__all__ = ['UnsafeFileError', 'open_regular', 'read_structured', 'read_capped', 'bounded_depth', 'check_schema',
           'check_like', 'is_number', 'short_repr', 'file_kind', 'special_filesystem', 'link_above_root', 'MAX_JSON_BYTES',
           'MAX_DEPTH']

PathLike = Union[str, os.PathLike]

#: Largest JSON file read from outside (manifests, label metadata, class-index files).
MAX_JSON_BYTES = 16 << 20
#: Deepest nesting accepted in a structured file or a checkpoint's plain-data fields.
MAX_DEPTH = 32

_NOFOLLOW = getattr(os, 'O_NOFOLLOW', 0)
_NONBLOCK = getattr(os, 'O_NONBLOCK', 0)
_CLOEXEC = getattr(os, 'O_CLOEXEC', 0)


class UnsafeFileError(ValueError):
    """A file or structure that is refused before use (message meant for a person)."""


def file_kind(mode: int) -> str:
    """What a file of ``st_mode`` ``mode`` is, for a message (``'a named pipe'``, ``'a folder'``...)."""
    for test, name in ((stat.S_ISDIR, 'a folder'), (stat.S_ISFIFO, 'a named pipe'), (stat.S_ISSOCK, 'a socket'),
                       (stat.S_ISCHR, 'a character device'), (stat.S_ISBLK, 'a block device'),
                       (stat.S_ISLNK, 'a symbolic link')):
        if test(mode):
            return name
    return 'not a regular file'


def open_regular(path: PathLike, flags: int = os.O_RDONLY, mode: int = 0o644, what: str = 'file',
                 follow: bool = True) -> int:
    """``os.open(path, flags)`` of a regular file, never blocking on a named pipe: the one open of a file from
    outside or under a fixed name (the readers here, the image decoder, the run lock, ``log.txt``).

    The file is opened with ``O_NONBLOCK`` (a FIFO is refused at once, never waited on; ``O_NONBLOCK`` is
    cleared again for a regular file) and, when ``follow`` is False, ``O_NOFOLLOW`` (a symbolic link at
    ``path`` is refused). Pass ``O_CREAT`` to create it; never pass ``O_TRUNC`` (truncate after this check,
    with ``os.ftruncate``).

    Returns:
        The file descriptor (the caller closes it).

    Raises:
        UnsafeFileError: a pipe, a device, a folder... (``what`` names the file in the message); with
            ``follow`` False also a link.
        OSError: any other failure to open (a missing file, permissions); with ``follow`` every failure
            to open.
    """
    if flags & os.O_TRUNC:
        raise ValueError('open_regular: truncate after the check (os.ftruncate), not with O_TRUNC')
    try:
        fd = os.open(path, flags | (0 if follow else _NOFOLLOW) | _NONBLOCK | _CLOEXEC, mode)
    except OSError as e:
        if follow:
            raise
        if e.errno == errno.ELOOP or (e.errno == errno.EMLINK and os.path.islink(path)):
            raise UnsafeFileError(f'{what} {path} is a symbolic link: refused (the run never writes through a link '
                                  f'there; remove it)') from None
        if e.errno in (errno.ENXIO, errno.EISDIR, errno.ENODEV):  # a FIFO without reader, a folder, a device
            try:
                kind = file_kind(os.lstat(path).st_mode)
            except OSError:
                kind = 'not a regular file'
            raise UnsafeFileError(f'{what} {path} is {kind}: refused (expected a regular file)') from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafeFileError(f'{what} {path} is {file_kind(st.st_mode)}: refused (expected a regular file)')
        if _NONBLOCK:
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_capped(path: PathLike, max_bytes: int, what: str, follow: bool = True) -> bytes:
    """At most ``max_bytes`` of a regular file (links to one are followed unless ``follow`` is False)."""
    try:
        fd = open_regular(path, what=what, follow=follow)
    except OSError as e:
        if not follow or e.errno == errno.ENOENT:
            raise
        raise UnsafeFileError(f'cannot read {what} {path}: {e.strerror or e}') from None
    try:
        if os.fstat(fd).st_size > max_bytes:
            raise UnsafeFileError(f'{what} {path} is larger than {max_bytes} bytes: refused')
        chunks, size = [], 0
        while True:  # the size may grow while reading: the cap holds anyway
            chunk = os.read(fd, min(1 << 20, max_bytes + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
            if size > max_bytes:
                raise UnsafeFileError(f'{what} {path} is larger than {max_bytes} bytes: refused')
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
        UnsafeFileError: everything else, in one line.
    """
    data = read_capped(path, max_bytes, what, follow)
    try:
        text = data.decode('utf-8')
    except UnicodeDecodeError as e:
        raise UnsafeFileError(f'{what} {path} is not UTF-8 text: {e.reason} at byte {e.start}') from None
    try:
        obj = json.loads(text)
    except RecursionError:
        raise UnsafeFileError(f'{what} {path} is nested deeper than {max_depth} levels: refused') from None
    except ValueError as e:  # JSONDecodeError, and int() of a 10,000-digit number
        raise UnsafeFileError(f'{what} {path} is not valid JSON: {" ".join(str(e).split())}') from None
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
    """Raise :class:`UnsafeFileError` unless ``obj`` is a dict with every key of ``schema`` of its type."""
    if not isinstance(obj, dict):
        raise UnsafeFileError(f'{where} holds {type(obj).__name__}, expected an object with '
                               f'{", ".join(schema)}')
    missing = [k for k in schema if k not in obj]
    if missing:
        raise UnsafeFileError(f'{where} lacks {", ".join(missing)}')
    for key, kind in schema.items():
        if not _type_ok(obj[key], kind):
            raise UnsafeFileError(f'{where}: {key} is {short_repr(obj[key])}, expected {_type_name(kind)}')


def short_repr(value: Any, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters, for a one-line message (never raises)."""
    try:
        text = repr(value)
    except (RecursionError, ValueError):
        text = f'a {type(value).__name__}'
    return text if len(text) <= limit else text[:limit] + '...'


def bounded_depth(obj: Any, max_depth: int = MAX_DEPTH, where: str = 'the data',
                  error: Type[Exception] = UnsafeFileError, leaves: Tuple[type, ...] = ()) -> int:
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


def check_like(value: Any, reference: Any, where: str, error: Type[Exception] = UnsafeFileError,
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
        ok = value is None or is_number(value) or (isinstance(value, (list, tuple)) and len(value) <= 16
                                                 and all(is_number(v) for v in value))
    elif isinstance(reference, str):
        ok = isinstance(value, str)
    elif isinstance(reference, Mapping):
        if not isinstance(value, Mapping):
            raise error(f'{where}: {name} is {short_repr(value)}, expected an object')
        extra = [k for k in value if k not in reference]
        if extra:
            raise error(f'{where}: {name} has entries this run does not know: {", ".join(map(str, extra[:5]))}')
        for k, v in value.items():
            check_like(v, reference[k], where, error, f'{_path}.{k}' if _path else str(k))
        return
    elif isinstance(reference, (list, tuple)):
        if not isinstance(value, (list, tuple)) or len(value) != len(reference):
            raise error(f'{where}: {name} is {short_repr(value)}, expected a list of {len(reference)} values')
        for i, (v, r) in enumerate(zip(value, reference)):
            check_like(v, r, where, error, f'{_path}[{i}]')
        return
    elif type(reference).__name__ == 'Tensor' and hasattr(reference, 'dtype'):
        ok = (type(value) is type(reference) and value.dtype == reference.dtype
              and tuple(value.shape) == tuple(reference.shape))
    else:
        ok = isinstance(value, type(reference))
    if not ok:
        raise error(f'{where}: {name} is {short_repr(value)}, expected {short_repr(reference)}-like '
                    f'({type(reference).__name__})')


def is_number(value: Any) -> bool:
    """A real number that is not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


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
