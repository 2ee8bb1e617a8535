"""Reading files and structures that come from outside the run so that they cannot hurt it (plain
functions, no ``utils/`` import: the data sets use them, and ``utils.core.safe_io`` builds on them).

- :func:`open_regular_nofollow`: open a file without following a symbolic link and without blocking on a
  named pipe; anything but a regular file is refused.
- :func:`read_structured`: a JSON file read from outside (an export manifest, ``token_labels.json``, a
  class-index file, iNaturalist annotations): regular files only (a pipe or ``/dev/zero`` is refused,
  never read), at most ``max_bytes``, nesting at most ``max_depth`` deep, optionally checked against a
  small schema.
- :func:`bounded_depth`: the nesting of an already loaded structure, walked without recursion.
- :func:`special_filesystem` / :func:`link_above_root`: what a data-folder walk must not enter
  (``/proc``-like file systems; a link to a folder that contains the walk's own root).

Every refusal is :class:`UnsafeFileError` (a ``ValueError``); ``utils.core.safe_io`` re-raises it as its
``UnsafeInputError``, a user error (one line, exit status 2 in every script).
"""
from __future__ import annotations

import errno
import json
import math
import numbers
import os
import stat
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Set, Tuple, Type, Union

__all__ = ['UnsafeFileError', 'open_regular_nofollow', 'read_structured', 'read_capped', 'bounded_depth',
           'check_schema', 'special_filesystem', 'link_above_root', 'MAX_JSON_BYTES', 'MAX_DEPTH']

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
        UnsafeFileError: a link, a pipe, a device, a folder... (``what`` names the file in the message).
        OSError: any other failure to open (permissions, a missing folder).
    """
    if flags & os.O_TRUNC:
        raise ValueError('open_regular_nofollow: truncate after the check (os.ftruncate), not with O_TRUNC')
    try:
        fd = os.open(path, flags | _NOFOLLOW | _NONBLOCK | _CLOEXEC, mode)
    except OSError as e:
        if e.errno == errno.ELOOP or (e.errno == errno.EMLINK and os.path.islink(path)):
            raise UnsafeFileError(f'{what} {path} is a symbolic link: refused (the run never writes through a link '
                                   f'there; remove it)') from None
        if e.errno in (errno.ENXIO, errno.EISDIR, errno.ENODEV):  # a FIFO without reader, a folder, a device
            try:
                kind = _kind(os.lstat(path).st_mode)
            except OSError:
                kind = 'not a regular file'
            raise UnsafeFileError(f'{what} {path} is {kind}: refused (expected a regular file)') from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafeFileError(f'{what} {path} is {_kind(st.st_mode)}: refused (expected a regular file)')
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
            raise UnsafeFileError(f'cannot read {what} {path}: {e.strerror or e}') from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise UnsafeFileError(f'{what} {path} is {_kind(st.st_mode)}: refused (expected a regular file)')
        except BaseException:
            os.close(fd)
            raise
    else:
        fd = open_regular_nofollow(path, what=what)
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
            raise UnsafeFileError(f'{where}: {key} is {_short(obj[key])}, expected {_type_name(kind)}')


def _short(value: Any, limit: int = 60) -> str:
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
