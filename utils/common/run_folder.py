"""Output folders: created, proven writable, placed outside the inputs, locked for one run.

- :func:`prepare_output_dir`: all of the below, in this order, for every script;
- :func:`new_run_folder`: the default output folder of a script whose runs are results to compare
  (``output/<script>/<name>_<time>``, a new one per run, never an earlier run's);
- :func:`make_dirs` / :func:`check_writable_dir`: the folder is created (remembering what this process
  created, so a run that fails before writing anything leaves no empty folder behind) and a
  temporary file proves that it can be written;

- :func:`check_outside_inputs` refuses an output folder equal to or inside an input data folder
  (checkpoints, label maps or TensorBoard files written into ``DATA/train`` would become part of the
  dataset of the next run).
- :func:`check_fixed_names` refuses a file the run writes under a fixed name (its log) that is a link, a
  pipe or a device; :func:`refuse_overwriting_inputs` refuses an output file that is one of the run's inputs.
- :class:`RunLock` holds an exclusive ``flock`` on a lock file in the run folder while a script
  writes there, so a second run on the same folder is refused with one line instead of
  interleaving ``log.txt`` or overwriting checkpoints. The kernel drops the lock when its process
  dies, so the lock file of a killed run is taken over (and the log says so). A clean exit removes
  the file. Every lock a process takes is released by :func:`release_locks` (scripts call it on exit).
  Its waiting mode (``wait=True``) guards a short critical section instead (make_token_labels.py's shards).
"""
from __future__ import annotations

import atexit
import fcntl
import logging
import os
import socket
import stat
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple, Type, Union

from datasets.safe_read import UnsafeFileError, file_kind, open_regular
from utils.common.errors import OutputDirError

__all__ = ['LOCK_NAME', 'RunLock', 'check_outside_inputs', 'check_fixed_names', 'refuse_overwriting_inputs',
           'release_locks', 'same_file', 'make_dirs', 'remove_created_empty_dirs', 'check_writable_dir',
           'prepare_output_dir', 'new_run_folder']

_logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

#: Lock file in a run folder (hidden; removed when the run ends normally).
LOCK_NAME = '.cfvit-run.lock'

_HELD: List['RunLock'] = []


_CREATED_DIRS: List[Path] = []


def make_dirs(path: PathLike) -> Path:
    """``mkdir -p path``, remembering the folders this process created, so that a run which fails before
    writing anything leaves no empty folder behind (:func:`remove_created_empty_dirs`)."""
    path = Path(path)
    missing = []
    for folder in (path, *path.parents):
        if folder.exists():
            break
        missing.append(folder)
    path.mkdir(parents=True, exist_ok=True)
    _CREATED_DIRS.extend(reversed(missing))
    return path


def remove_created_empty_dirs() -> None:
    """Remove, deepest first, the folders :func:`make_dirs` created that are still empty (never a folder
    that existed before, never one with anything in it)."""
    for folder in sorted(set(_CREATED_DIRS), key=lambda p: len(p.parts), reverse=True):
        try:
            folder.rmdir()  # fails, and is left alone, when anything is inside
        except OSError:
            pass
    _CREATED_DIRS.clear()


def check_writable_dir(path: PathLike, unwritable: str = 'cannot write to the output folder {path}') -> Path:
    """Create ``path`` if needed and prove that files can be written in it (a temporary file, removed).

    Args:
        unwritable: the start of the message when it cannot (``{path}`` is filled in); the reason follows.

    Raises:
        OutputDirError: it cannot be created, is not a folder, or is read-only.
    """
    path = Path(path)
    try:
        make_dirs(path)
        fd, probe = tempfile.mkstemp(prefix='.write-test.', dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputDirError(f'{unwritable.format(path=path)}: {e.strerror or e}') from e
    return path


def prepare_output_dir(path: PathLike, inputs: Iterable[Optional[PathLike]], flag: str = '--output',
                       lock: Optional[str] = LOCK_NAME,
                       unwritable: str = 'cannot write to the output folder {path}') -> Path:
    """The one preparation of a script's output folder: outside every input folder
    (:func:`check_outside_inputs`), created and proven writable (:func:`check_writable_dir`), then locked
    for this run (:class:`RunLock` on the file ``lock``; None: no lock, for a run that writes nothing there).

    Raises:
        OutputDirError: one line saying which of these failed.
    """
    check_outside_inputs(path, inputs, flag)
    out = check_writable_dir(path, unwritable)
    if lock:
        RunLock(out, lock)
    return out


def new_run_folder(script: str, name: str, root: PathLike = 'output') -> Path:
    """The default output folder of one run of ``script``: ``root/script/name_YYYYmmdd-HHMMSS``, relative to
    the current folder; ``-2``, ``-3``, ... appended when a run of the same second already made that folder,
    so a run never writes into an earlier run's folder. The rule for every script whose runs are results
    (dynamic_inference.py, visualize.py); a script whose output is reused by its path (export_onnx.py,
    a training run) has a fixed default and refuses to replace it instead (docs/safety.md)."""
    base = Path(root) / script / f'{name}_{time.strftime("%Y%m%d-%H%M%S")}'
    folder, n = base, 1
    while folder.exists():
        n += 1
        folder = base.with_name(f'{base.name}-{n}')
    return folder


def check_outside_inputs(output: PathLike, inputs: Iterable[Optional[PathLike]], flag: str = '--output') -> None:
    """Raise :class:`OutputDirError` if ``output`` is one of the ``inputs`` folders or inside one (links resolved)."""
    out = Path(output).expanduser().resolve()
    for given in inputs:
        if not given:
            continue
        folder = Path(given).expanduser().resolve()
        if not folder.is_dir():
            continue
        if out == folder or folder in out.parents:
            raise OutputDirError(f'{flag} {output} is inside the input folder {given}: its files would become part '
                                 f'of the data; choose a folder outside it')


def same_file(a: PathLike, b: Optional[PathLike]) -> bool:
    """``a`` and ``b`` name the same existing file."""
    try:
        return bool(b) and os.path.samefile(a, b)  # type: ignore[arg-type]
    except OSError:
        return False


def check_fixed_names(folder: PathLike, names: Iterable[str], what: str = 'output folder') -> None:
    """Refuse a ``folder/<name>`` that exists and is not a regular file, a link included: the files a run
    writes under fixed names (its log, which is appended in place) must not lead elsewhere or block.

    Raises:
        OutputDirError: such an entry, or one that cannot be inspected.
    """
    for name in names:
        path = Path(folder) / name
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            continue
        except OSError as e:
            raise OutputDirError(f'cannot inspect {path}: {e.strerror or e}') from None
        if not stat.S_ISREG(st.st_mode):
            raise OutputDirError(f'{path} in the {what} is {file_kind(st.st_mode)}: refused (the run writes a '
                                 f'regular file of that name; remove it or choose another folder)')


def refuse_overwriting_inputs(outputs: Iterable[PathLike], inputs: Iterable[Optional[PathLike]],
                              error: Type[Exception] = OutputDirError) -> None:
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


class RunLock:
    """An exclusive ``flock`` on ``folder/name``, in one of two modes.

    - ``wait=False`` (a run folder, for the life of a run): refused at once while another live process holds
      it (its pid and host, written in the file, are named); the file is removed on release, and
      :func:`release_locks` releases it when the process ends.
    - ``wait=True`` (a short critical section: the shards of ``make_token_labels.py`` checking and writing one
      metadata file): waits for the holder; the file stays (removing it would let two processes lock two files).

    Either way the file is never opened through a link, a pipe or a device (``what`` names it in the message),
    and a file system without locks leaves the run unguarded rather than stopped.

    Raises:
        OutputDirError: the lock file is not a regular file, or (``wait=False``) another live process holds it.
    """

    def __init__(self, folder: PathLike, name: str = LOCK_NAME, wait: bool = False,
                 what: str = 'the run lock') -> None:
        self.path = Path(folder) / name
        self.wait = wait
        self.fd: Optional[int] = None
        while True:
            try:  # never through a link, never a pipe or device
                fd = open_regular(self.path, os.O_RDWR | os.O_CREAT, 0o644, what=what, follow=False)
            except UnsafeFileError as e:
                raise OutputDirError(str(e)) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read(fd)
                os.close(fd)
                raise OutputDirError(f'{folder} is in use by another run ({holder or "a live process"}); wait for it '
                                     f'to end or choose another output folder') from None
            except OSError as e:  # file systems without locks: run unguarded rather than not at all
                os.close(fd)
                if not wait:
                    _logger.warning('cannot lock %s (%s): another run on this folder would not be detected',
                                    self.path, e.strerror or e)
                return
            try:  # the previous holder may have removed the file between our open and our lock: retry
                if os.fstat(fd).st_ino == os.lstat(self.path).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        self.fd = fd
        if not wait:
            self._claim(folder)

    def _claim(self, folder: PathLike) -> None:
        """Say who holds the run lock, for the message of a refused run (best effort: the disk may be full)."""
        assert self.fd is not None
        previous = _read(self.fd)
        if previous:
            _logger.warning('took over the lock of %s in %s: that process is no longer running', previous, folder)
        try:
            os.ftruncate(self.fd, 0)
            os.write(self.fd, f'pid {os.getpid()} on {socket.gethostname()}: {" ".join(sys.argv[:3])}\n'.encode())
        except OSError:
            pass
        _HELD.append(self)

    def release(self) -> None:
        """Drop the lock, removing the file of a run lock (idempotent)."""
        if self.fd is None:
            return
        if not self.wait:
            try:
                os.unlink(self.path)
            except OSError:
                pass
        os.close(self.fd)
        self.fd = None
        if self in _HELD:
            _HELD.remove(self)

    def __enter__(self) -> 'RunLock':
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        return os.read(fd, 4096).decode(errors='replace').strip()
    except OSError:
        return ''


def release_locks() -> None:
    """Release every :class:`RunLock` this process holds, then remove the output folders it created that
    stayed empty (a run that failed before writing anything leaves no empty folder behind)."""
    for lock in list(_HELD):
        lock.release()
    remove_created_empty_dirs()


atexit.register(release_locks)
