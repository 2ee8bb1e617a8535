"""Files written so that an interruption never leaves one half-written, and appends of log lines.

Every file the project writes goes through :func:`atomic_file`: a temporary file in the target
folder, flushed and fsynced, then renamed over the target, so an interruption (a signal, a full
disk, a power loss) leaves the previous file intact. A user's file is never modified in place.
"""
from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, Any, Iterator, List, Mapping, Optional, Sequence, Union

import torch
from safetensors.torch import save as safetensors_save

from datasets.safe_read import UnsafeFileError, open_regular
from utils.common.errors import first_line

__all__ = ['atomic_file', 'save_atomic', 'write_json_atomic', 'copy_atomic', 'append_json_line',
           'remove_stale_temp_files', 'sha256_file', 'temp_prefix', 'NAME_MAX']

PathLike = Union[str, os.PathLike]

# the process umask, read once (os.umask can only be read by setting it, which is not thread-safe later)
_UMASK = os.umask(0o022)
os.umask(_UMASK)


#: Longest file name (bytes) of the file systems Linux uses (NAME_MAX): a temporary name never exceeds it.
NAME_MAX = 255
#: What a temporary name adds to its file's: the dot before, the dot after, mkstemp's 8 characters, '.tmp'.
_TEMP_OVERHEAD = 14


def temp_prefix(name: str) -> str:
    """``.<name>.``, the prefix of :func:`atomic_file`'s temporary names beside ``name``, with ``name`` cut to
    the bytes that leave the whole temporary name within :data:`NAME_MAX` (a legal 250-byte name still gets
    a temporary file). Names that are not UTF-8 (``surrogateescape``) keep their bytes."""
    raw = os.fsencode(name)[:NAME_MAX - _TEMP_OVERHEAD]
    return f'.{os.fsdecode(raw)}.'


@contextlib.contextmanager
def atomic_file(path: PathLike, mode: str = 'wb') -> Iterator[IO]:
    """Open a temporary file beside ``path`` (its name at most :data:`NAME_MAX` bytes, :func:`temp_prefix`);
    on success fsync it and rename it over ``path``.

    On any error the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path.name), suffix='.tmp', dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        try:
            os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the permissions open() would
        except OSError:  # file systems without modes (vfat, some network mounts): keep what it has
            pass
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def remove_stale_temp_files(folder: PathLike, names: Sequence[str],
                            keep: Sequence[Optional[PathLike]] = ()) -> List[Path]:
    """Delete the temporary files that :func:`atomic_file` left beside ``folder/<name>`` when its
    process was killed mid-write (``.<name>.*.tmp``; never loaded by anything), except the files in
    ``keep`` (those the user named, e.g. ``--resume``). Call it only where no other process is writing
    these files (the run lock). Returns the deleted paths."""
    kept = {os.path.realpath(k) for k in keep if k}
    removed = []
    for name in names:
        for tmp in Path(folder).glob(f'{glob.escape(temp_prefix(name))}*.tmp'):
            if os.path.realpath(tmp) in kept:
                continue
            try:
                tmp.unlink()
            except FileNotFoundError:
                continue
            removed.append(tmp)
    return removed


def save_atomic(obj: Any, path: PathLike) -> None:
    """``torch.save`` (or safetensors for ``.safetensors``) to ``path`` atomically."""
    path = Path(path)
    with atomic_file(path) as f:
        if path.suffix == '.safetensors':
            f.write(safetensors_save({k: v.contiguous() for k, v in obj.items()}))
        else:
            try:
                torch.save(obj, f)
            except RuntimeError as e:  # torch's zip writer reports a failed write (a full disk) this way
                if 'inline_container' not in str(e) and 'PytorchStreamWriter' not in str(e):
                    raise
                raise _write_error(path, e) from e


def _write_error(path: Path, error: BaseException) -> OSError:
    """An OSError for a write that torch reported as a RuntimeError: ENOSPC when the disk is (nearly) full."""
    try:
        st = os.statvfs(path.parent)
        full = st.f_bavail * st.f_frsize < 1 << 20
    except OSError:
        full = False
    if full:
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    return OSError(errno.EIO, f'the write failed ({first_line(error)})', str(path))


def write_json_atomic(obj: Any, path: PathLike) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    with atomic_file(path, 'w') as f:
        json.dump(obj, f, indent=2)
        f.write('\n')


def append_json_line(path: PathLike, record: Mapping[str, Any]) -> None:
    """Append ``record`` as one JSON line to ``path`` (the DeiT ``log.txt`` format)."""
    try:  # a link or a named pipe called log.txt is refused, never written through or waited on
        fd = open_regular(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644, what='the log', follow=False)
    except UnsafeFileError as e:
        raise OSError(errno.EINVAL, str(e)) from None
    with os.fdopen(fd, 'a', encoding='utf-8') as f:
        f.write(json.dumps(record, sort_keys=False) + '\n')
        f.flush()


def copy_atomic(src: PathLike, dst: PathLike) -> None:
    """Copy ``src`` to ``dst`` through a temporary file and a rename (``dst`` is never half-written)."""
    with open(src, 'rb') as fin, atomic_file(dst) as fout:
        shutil.copyfileobj(fin, fout)


def sha256_file(path: PathLike) -> str:
    """The SHA-256 of a file's bytes, read in 1 MiB blocks (export graphs, a teacher checkpoint)."""
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            h.update(block)
    return h.hexdigest()
