"""Small helpers of the scripts: logging, running one script from another, running means, JSON-lines logs,
file copies.

Everything that writes is meant to run on the main process only; the callers check
:func:`utils.dist.is_main_process`.
"""
from __future__ import annotations

import argparse
import ast
import errno
import importlib
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import threading
from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import torch

from . import checkpoint as checkpoint_io
from .dist import collective_device, reduce

__all__ = [
    'available_cores', 'default_workers', 'make_dirs', 'remove_created_empty_dirs',
    'EXIT_BAD_INPUT', 'EXIT_FAILED', 'describe_os_error', 'positive_int', 'setup_logging', 'user_message', 'MetricMeter',
    'append_json_line', 'copy_atomic', 'check_writable_dir', 'OutputDirError', 'parse_model_kwargs',
    'architecture_from_checkpoint', 'log_thread_os_errors', 'remove_log_handler', 'SCRIPTS', 'run_script',
]

PathLike = Union[str, os.PathLike]

#: Exit status of every script: bad input or configuration (a one-line message says what; the
#: argparse convention), and a run that started but failed (e.g. a non-finite training loss).
EXIT_BAD_INPUT = 2
EXIT_FAILED = 1


class OutputDirError(RuntimeError):
    """The output folder cannot be created or written (message meant for a person)."""


def setup_logging(is_main: bool, level: int = logging.INFO) -> None:
    """Log to stderr on the main process; other processes report warnings and errors only.

    Calling it again replaces the handler, so scripts run in-process (tests) do not stack them.
    """
    remove_log_handler()
    root = logging.getLogger()
    handler = logging.StreamHandler(sys.stderr)
    handler._cfvit = True  # type: ignore[attr-defined]
    handler.setFormatter(logging.Formatter('%(asctime)s %(levelname)s %(message)s', datefmt='%H:%M:%S'))
    root.addHandler(handler)
    root.setLevel(level if is_main else logging.WARNING)


def remove_log_handler() -> None:
    """Remove the handler :func:`setup_logging` installed (if any)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, '_cfvit', False):
            root.removeHandler(handler)


#: The command-line scripts at the repository's top level, which :func:`run_script` can run.
SCRIPTS = ('main_deit', 'main_lvvit', 'dynamic_inference', 'visualize', 'make_token_labels')


def run_script(name: str, argv: Sequence[str]) -> int:
    """Run the script ``name`` (one of :data:`SCRIPTS`) as ``python name.py *argv`` would, in this process,
    and return its exit status; its log handler is removed afterwards.

    The one way a script runs another (the quick start runs the trainer, the evaluation and the
    visualization): no script imports another, and the script's own flag handling and error
    messages apply. In-process, so the libraries are imported once.
    """
    if name not in SCRIPTS:
        raise ValueError(f'unknown script {name!r}; one of {", ".join(SCRIPTS)}')
    try:
        return importlib.import_module(name).main(list(argv))
    finally:
        remove_log_handler()


def user_message(error: BaseException) -> str:
    """The message of a user error; for one re-raised from a loader worker, without the traceback."""
    text = str(error)
    if 'Original Traceback' in text:  # torch.utils.data re-raises worker errors with the traceback inside
        last = [line for line in text.strip().splitlines() if line.strip()][-1]
        text = last.split(': ', 1)[1] if ': ' in last else last
    return text


class MetricMeter:
    """Sample-weighted running means of named scalars, reducible over processes.

    >>> meter = MetricMeter()
    >>> meter.update(n=8, loss=0.5)
    >>> meter.means()['loss']
    0.5
    """

    def __init__(self) -> None:
        self.sums: Dict[str, float] = defaultdict(float)
        self.counts: Dict[str, float] = defaultdict(float)

    def update(self, n: int = 1, **values: Union[float, torch.Tensor]) -> None:
        """Add ``values``, each the mean over ``n`` samples."""
        for name, value in values.items():
            value = float(value.item() if isinstance(value, torch.Tensor) else value)
            self.sums[name] += value * n
            self.counts[name] += n

    def means(self) -> Dict[str, float]:
        """This process's means."""
        return {k: self.sums[k] / self.counts[k] for k in self.sums if self.counts[k] > 0}

    def global_means(self, device: Optional[torch.device] = None) -> Dict[str, float]:
        """Means over every process (a collective: every process must call it, with the same names)."""
        names = sorted(self.sums)
        if not names:
            return {}
        t = torch.tensor([[self.sums[k], self.counts[k]] for k in names], dtype=torch.float64,
                         device=device or collective_device())
        t = reduce(t, 'sum')
        return {k: (s / c if c > 0 else math.nan) for k, (s, c) in zip(names, t.tolist())}


def append_json_line(path: PathLike, record: Mapping[str, Any]) -> None:
    """Append ``record`` as one JSON line to ``path`` (the DeiT ``log.txt`` format)."""
    from .safe_io import UnsafeInputError, open_regular_nofollow
    try:  # a link or a named pipe called log.txt is refused, never written through or waited on
        fd = open_regular_nofollow(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644, what='the log')
    except UnsafeInputError as e:
        raise OSError(errno.EINVAL, str(e)) from None
    with os.fdopen(fd, 'a', encoding='utf-8') as f:
        f.write(json.dumps(record, sort_keys=False) + '\n')
        f.flush()


def copy_atomic(src: PathLike, dst: PathLike) -> None:
    """Copy ``src`` to ``dst`` through a temporary file and a rename (``dst`` is never half-written)."""
    with open(src, 'rb') as fin, checkpoint_io.atomic_file(dst) as fout:
        shutil.copyfileobj(fin, fout)


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


def check_writable_dir(path: PathLike) -> Path:
    """Create ``path`` if needed and prove that files can be written in it.

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
        raise OutputDirError(f'cannot write to the output folder {path}: {e.strerror or e}') from e
    return path


def describe_os_error(e: OSError, doing: str = 'cannot write') -> str:
    """One line for an OSError that reached a script's entry point (a full disk, a vanished folder)."""
    where = f' {e.filename}' if getattr(e, 'filename', None) else ''
    return f'{doing}{where}: {e.strerror or e}'


def log_thread_os_errors() -> None:
    """An OSError that ends a background thread (TensorBoard's event writer on a full disk) is logged
    as one line instead of the thread's traceback; other thread errors keep Python's report."""
    if getattr(threading.excepthook, '_cfvit', False):
        return
    default = threading.excepthook

    def hook(args: Any) -> None:
        if isinstance(args.exc_value, OSError):
            name = args.thread.name if args.thread is not None else 'a background thread'
            logging.getLogger(__name__).error('%s (in %s)', describe_os_error(args.exc_value), name)
            return
        default(args)
    hook._cfvit = True  # type: ignore[attr-defined]
    threading.excepthook = hook


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one, else the machine's)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def default_workers(wanted: int) -> int:
    """A loader-worker default: ``wanted`` (the released value), capped by :func:`available_cores`, so a
    small machine neither oversubscribes its cores nor gets torch's "exceeds the suggested maximum"
    warning; an explicit flag value is always used as given."""
    return min(wanted, available_cores())


def positive_int(text: str) -> int:
    """argparse ``type`` of counts and sizes that must be at least 1 (grid sides, batch sizes)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected a positive integer, got {text!r}') from None
    if value < 1:
        raise argparse.ArgumentTypeError(f'must be at least 1, got {value}')
    if value > 2 ** 31 - 1:  # utils.safe_io.MAX_COUNT: e.g. --batch-size 2**63 overflowed the loaders
        raise argparse.ArgumentTypeError(f'must be at most {2 ** 31 - 1}, got {value}')
    return value


def parse_model_kwargs(items: Sequence[str]) -> Dict[str, Any]:
    """``['depth=4', 'patch_size=8']`` (or one JSON object) -> ``{'depth': 4, 'patch_size': 8}``.

    Values are Python literals when they parse as one, else strings.

    Raises:
        ValueError: an item that is not ``KEY=VALUE``.
    """
    items = [items] if isinstance(items, str) else list(items or [])
    if len(items) == 1 and items[0].lstrip().startswith('{'):
        try:
            return dict(json.loads(items[0]))
        except json.JSONDecodeError as e:
            raise ValueError(f'--model-kwargs is not valid JSON: {e}') from e
    out: Dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition('=')
        if not sep or not key.isidentifier():
            raise ValueError(f'--model-kwargs expects KEY=VALUE, got {item!r}')
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def architecture_from_checkpoint(checkpoint: Mapping[str, Any]) -> Dict[str, Any]:
    """Model name, grid and size overrides recorded in a training checkpoint's ``args``.

    Returns:
        ``{'model': ..., 'coarse_stage_size': ..., 'kwargs': {...}}`` with what is known, or ``{}``
        for checkpoints without training arguments (e.g. the released ones).
    """
    args = checkpoint.get('args') if isinstance(checkpoint, Mapping) else None
    if args is None:
        return {}
    get = (lambda k: args.get(k)) if isinstance(args, Mapping) else (lambda k: getattr(args, k, None))
    kwargs = {k: get(k) for k in ('embed_dim', 'depth', 'num_heads') if get(k) is not None}
    from .validation import checkpoint_model_kwargs  # the allow-list: a checkpoint never names files to open
    kwargs.update(checkpoint_model_kwargs(args, 'the checkpoint'))
    out: Dict[str, Any] = {'kwargs': kwargs}
    if get('model'):
        out['model'] = get('model')
    if get('coarse_stage_size'):
        out['coarse_stage_size'] = int(get('coarse_stage_size'))
    return out
