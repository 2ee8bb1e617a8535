"""What every script does at its edges: flag types, KEY=VALUE parsing, logging, and the entry point.

- argparse types (:func:`positive_int`, :func:`int_at_least`, :func:`float_in`, :func:`device_name`)
  check ranges and finiteness at parse time, so a bad value ends the run before anything starts, with
  argparse's one line naming the flag (``argument --lr: must be a finite number, got nan``), exit 2;
- :func:`parse_model_kwargs`: ``--model-kwargs KEY=VALUE ...`` (or one JSON object);
- :func:`setup_logging`: the log handler of a script;
- :func:`run_entry_point`: a script's ``main`` around its work: signals, and what ends the run turned
  into one line and an exit status.
"""
from __future__ import annotations

import argparse
import ast
import json
import logging
import math
import os
import sys
import threading
from typing import IO, Any, Callable, Dict, Iterable, Optional, Sequence, Tuple, Type, Union

import torch

from datasets.folder import DatasetError
from utils.core.dist import PeerFailedError
from utils.core.errors import EXIT_BAD_INPUT, UserError
from utils.core.run_folder import release_locks
from utils.core.signals import StopRequested, exit_status, handle_stop_signals, stop_requested

__all__ = [
    'available_cores', 'busy_cpu_hint', 'default_workers', 'describe_os_error', 'positive_int', 'int_at_least', 'float_in',
    'finite_float', 'device_name', 'worker_count', 'MAX_WORKERS', 'setup_logging', 'remove_log_handler',
    'user_message', 'parse_model_kwargs', 'shown_name',
    'log_thread_os_errors', 'run_entry_point', 'LOG_FORMATS', 'grid_side', 'MAX_COARSE_STAGE_SIZE', 'MAX_LR',
    'MAX_COUNT', 'MAX_SEED',
]

_logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]


#: The log line formats of the scripts: ``timed`` (training, label maps: a long run's progress),
#: ``plain`` (dynamic_inference.py, export_onnx.py: the log is the printed result), ``named`` (visualize.py).
LOG_FORMATS = {
    'timed': ('%(asctime)s %(levelname)s %(message)s', '%H:%M:%S'),
    'plain': ('%(message)s', None),
    'named': ('%(levelname)s %(name)s: %(message)s', None),
}


def setup_logging(is_main: bool = True, level: int = logging.INFO, stream: Optional[IO[str]] = None,
                  style: str = 'timed', if_unconfigured: bool = False) -> None:
    """The log handler of a script: on the main process ``level`` and up, on the others warnings and errors.

    Args:
        stream: where the lines go (default: the current ``sys.stderr``).
        style: a key of :data:`LOG_FORMATS`.
        if_unconfigured: install nothing when the root logger already has handlers (an application or a
            test harness that configured logging itself).

    Calling it again replaces the handler, so scripts run in-process (tests) do not stack them;
    :func:`run_entry_point` removes it when the script's run ends (:func:`remove_log_handler`).
    """
    remove_log_handler()
    root = logging.getLogger()
    if if_unconfigured and root.handlers:
        return
    fmt, datefmt = LOG_FORMATS[style]
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler._cfvit_level = root.level  # type: ignore[attr-defined]  (restored on removal)
    handler.setFormatter(_EscapingFormatter(fmt, datefmt=datefmt))
    root.addHandler(handler)
    root.setLevel(level if is_main else logging.WARNING)


def remove_log_handler() -> None:
    """Remove the handler :func:`setup_logging` installed (if any) and restore the root level it found."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if hasattr(handler, '_cfvit_level'):
            root.removeHandler(handler)
            root.setLevel(handler._cfvit_level)  # type: ignore[attr-defined]


def shown_name(text: str) -> str:
    """``text`` as it can be printed, drawn or logged: bytes of a name that is not UTF-8 (decoded by Python
    with ``surrogateescape``) become ``\\xNN`` escapes instead of reaching matplotlib or a stream that
    refuses them."""
    return text.encode('utf-8', 'surrogateescape').decode('utf-8', 'backslashreplace')


class _EscapingFormatter(logging.Formatter):
    """A log line with names that are not UTF-8 escaped (:func:`shown_name`): never a logging error."""

    def format(self, record: logging.LogRecord) -> str:
        return shown_name(super().format(record))


def user_message(error: BaseException) -> str:
    """The message of a user error; for one re-raised from a loader worker, without the traceback."""
    text = str(error)
    if 'Original Traceback' in text:  # torch.utils.data re-raises worker errors with the traceback inside
        last = [line for line in text.strip().splitlines() if line.strip()][-1]
        text = last.split(': ', 1)[1] if ': ' in last else last
    return text


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


def busy_cpu_hint(device: Union[str, torch.device] = 'cpu', threads: Optional[int] = None,
                  load: Optional[float] = None) -> Optional[str]:
    """A one-line hint when a CPU run starts on cores other work already keeps busy, else None.

    torch runs its intra-op threads on every core it may use (``torch.get_num_threads()``); when other
    processes keep those cores busy, its threads spin while their siblings wait, and a run can take several
    times longer than the load explains (issue 32 measured a CPU smoke run beside two busy loops: 48.8 s wall
    with the default threads, 26.4 s with ``OMP_NUM_THREADS=1``). Nothing is changed: the hint says what to
    set. None when the device is not the CPU, ``OMP_NUM_THREADS`` is set already, torch uses one thread, or
    the 1-minute load average is under half the cores.
    """
    if torch.device(device).type != 'cpu' or os.environ.get('OMP_NUM_THREADS'):
        return None
    threads = torch.get_num_threads() if threads is None else threads
    if threads <= 1:
        return None
    if load is None:
        try:
            load = os.getloadavg()[0]
        except (AttributeError, OSError):
            return None
    cores = available_cores()
    if load < cores / 2:
        return None
    return (f'the CPUs are busy with other work (load average {load:.1f} on {cores} cores) and torch runs '
            f'{threads} threads: on shared cores a run is often much faster with fewer, e.g. OMP_NUM_THREADS=1 '
            f'before the command (docs/training.md, "On shared CPUs")')


def default_workers(wanted: int) -> int:
    """A loader-worker default: ``wanted`` (the released value), capped by :func:`available_cores`, so a
    small machine neither oversubscribes its cores nor gets torch's "exceeds the suggested maximum"
    warning; an explicit flag value is always used as given."""
    return min(wanted, available_cores())


#: Largest coarse grid side a script builds: (2 * 32)^2 = 4096 fine tokens. The released models use 7 and 9;
#: --coarse-stage-size 1000 would allocate position embeddings and attention maps of many gigabytes.
MAX_COARSE_STAGE_SIZE = 32


def grid_side(text: str) -> int:
    """argparse type of ``--coarse-stage-size``: an integer in ``[1, MAX_COARSE_STAGE_SIZE]`` (refused
    before any model is built)."""
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


#: Most loader worker processes a flag takes: each is a process with its own copy of the dataset state, and
#: --num-workers 2147483647 forked until the process limit, then hung. 256 is far above any useful count.
MAX_WORKERS = 256


def worker_count(text: str) -> int:
    """argparse type: loader worker processes, 0 to :data:`MAX_WORKERS`."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected a number of worker processes, got {text!r}') from None
    if value < 0:
        raise argparse.ArgumentTypeError(f'must be at least 0, got {value}')
    if value > MAX_WORKERS:
        raise argparse.ArgumentTypeError(
            f'must be at most {MAX_WORKERS} loader processes (this machine has {available_cores()} cores), got {value}')
    return value


def positive_int(text: str) -> int:
    """argparse ``type`` of counts and sizes that must be at least 1 (grid sides, batch sizes)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected a positive integer, got {text!r}') from None
    if value < 1:
        raise argparse.ArgumentTypeError(f'must be at least 1, got {value}')
    if value > MAX_COUNT:  # e.g. --batch-size 2**63 overflowed the loaders
        raise argparse.ArgumentTypeError(f'must be at most {MAX_COUNT}, got {value}')
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


def int_at_least(low: int, high: Optional[int] = None) -> Callable[[str], int]:
    """argparse type: an integer in ``[low, high]`` (no upper bound when ``high`` is None)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f'expected an integer, got {text!r}') from None
        if value < low:
            raise argparse.ArgumentTypeError(f'must be at least {low}, got {value}')
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f'must be at most {high}, got {value}')
        return value
    parse.__name__ = f'int>={low}'
    return parse


def float_in(low: float = -math.inf, high: float = math.inf, low_open: bool = False,
             high_open: bool = False) -> Callable[[str], float]:
    """argparse type: a finite float in the interval from ``low`` to ``high`` (open ends if asked)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f'expected a number, got {text!r}') from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f'must be a finite number, got {text}')
        below = value <= low if low_open else value < low
        above = value >= high if high_open else value > high
        if below or above:
            interval = f'{"(" if low_open else "["}{low:g}, {high:g}{")" if high_open else "]"}'
            raise argparse.ArgumentTypeError(f'must be in {interval}, got {value:g}')
        return value
    parse.__name__ = 'float'
    return parse


finite_float = float_in()


def device_name(text: str) -> str:
    """argparse type: a torch device this machine has (``cpu``, ``cuda``, ``cuda:1``, ``mps``)."""
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f'not a device: {text!r} (cpu, cuda, cuda:N)') from None
    if device.type == 'cuda':
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f'{text}: CUDA is not available on this machine (use cpu)')
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f'{text}: this machine has {torch.cuda.device_count()} CUDA devices')
    elif device.type == 'mps' and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f'{text}: MPS is not available on this machine')
    elif device.type not in ('cpu', 'cuda', 'mps'):
        raise argparse.ArgumentTypeError(f'unsupported device {text!r} (cpu, cuda, cuda:N)')
    return text


def run_entry_point(work: Callable[[], Any], script: Optional[str] = None, *,
                    user_errors: Tuple[Type[BaseException], ...] = (), writing: str = 'cannot write',
                    interrupted: str = 'interrupted', kept: str = '', one_line: bool = False,
                    deferred: Iterable[int] = (), cleanup: Optional[Callable[[], None]] = None) -> int:
    """Every script's ``main``: run ``work()`` and turn what ends it into an exit status and one line.

    Exit status: 0; 130 / 143 on SIGINT / SIGTERM (also when an error, e.g. a loader worker's, reaches the
    main process while it stops); a :class:`~utils.core.errors.UserError`'s own ``exit_code`` (2 for bad
    input, 1 for a run that failed on its own, another process's code for
    :class:`~utils.core.dist.PeerFailedError`); 2 for ``datasets.DatasetError``, the ``user_errors`` and an
    ``OSError`` (a full disk: ``writing`` names what could not be done). Anything else is a bug and keeps
    its traceback. Run locks are released and the log handler removed on the way out.

    Args:
        work: the script's run; it may return an int, the exit status of a run that reports its own failure
            (the quick start: a script it ran failed).
        script: report on stderr as ``SCRIPT: error: ...`` / ``SCRIPT: interrupted`` (argparse's form);
            None: through the log (``logging.error``), as the training scripts and make_token_labels.py.
        user_errors: more error types reported as bad input (exit 2).
        interrupted: the line of an interrupt; a :class:`~utils.core.signals.StopRequested` brings its own.
        kept: appended to the line of an ``OSError`` (what stays intact).
        one_line: fold a multi-line message onto one line.
        deferred: signals that only set the stop state (training defers SIGTERM to its step boundary).
        cleanup: called last on the way out (the training scripts' process group).
    """
    def report(text: str) -> None:
        text = ' '.join(text.split()) if one_line else text
        if script is None:
            _logger.error('%s', text)
        else:
            print(f'{script}: {text}', file=sys.stderr)

    error = '' if script is None else 'error: '
    code = 0
    with handle_stop_signals(deferred):  # SIGINT / SIGTERM: exit 130 / 143
        try:
            status = work()
            code = status if isinstance(status, int) else 0
        except KeyboardInterrupt as e:  # every file written so far is complete
            report(str(e) if isinstance(e, StopRequested) else interrupted)
            code = exit_status(e)
        except Exception as e:
            if isinstance(e, PeerFailedError):  # another process failed with its own message; this one stops with it
                report(str(e))
                code = e.exit_code
            elif stop_requested() is not None:  # e.g. a loader worker's error while the run was stopping
                report(interrupted)
                code = exit_status()
            elif isinstance(e, (UserError, DatasetError) + tuple(user_errors)):
                report(error + user_message(e))
                code = getattr(e, 'exit_code', EXIT_BAD_INPUT)
            elif isinstance(e, OSError):  # e.g. a full disk; the files written before are intact
                report(error + describe_os_error(e, writing) + kept)
                code = EXIT_BAD_INPUT
            else:
                raise
        finally:
            release_locks()
            remove_log_handler()
            if cleanup is not None:
                cleanup()
    return code
