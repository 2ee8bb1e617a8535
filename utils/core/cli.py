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
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Type, Union

import torch

from utils.core.errors import EXIT_BAD_INPUT
from utils.core.run_folder import release_locks
from utils.core.signals import exit_status, handle_stop_signals, stop_requested

__all__ = [
    'available_cores', 'default_workers', 'describe_os_error', 'positive_int', 'int_at_least', 'float_in',
    'finite_float', 'device_name', 'setup_logging', 'remove_log_handler', 'user_message', 'parse_model_kwargs',
    'log_thread_os_errors', 'run_entry_point',
]

PathLike = Union[str, os.PathLike]


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


def run_entry_point(script: str, work: Callable[[], Any], user_errors: Tuple[Type[BaseException], ...],
                    writing: str, one_line: bool = False) -> int:
    """An evaluation script's ``main``: run ``work()`` under :func:`handle_stop_signals` and turn what ends it
    into an exit status with one line on stderr: 0; 130 / 143 on SIGINT / SIGTERM (also when a loader
    worker's error reaches the main process while it stops); 2 (:data:`utils.core.errors.EXIT_BAD_INPUT`) for
    ``user_errors`` and for an ``OSError`` while writing (``writing`` names what: "cannot write the results").
    Run locks are released on the way out. ``one_line``: fold a multi-line message onto one line."""
    with handle_stop_signals():  # SIGINT / SIGTERM: exit 130 / 143
        try:
            work()
        except KeyboardInterrupt as e:  # SIGINT / SIGTERM: every file written so far is complete
            print(f'{script}: interrupted', file=sys.stderr)
            return exit_status(e)
        except user_errors as e:
            print(f'{script}: error: {" ".join(str(e).split()) if one_line else e}', file=sys.stderr)
            return EXIT_BAD_INPUT
        except OSError as e:  # writing failed (full disk, ...); earlier files are intact
            print(f'{script}: error: {describe_os_error(e, writing)}', file=sys.stderr)
            return EXIT_BAD_INPUT
        except RuntimeError:  # a loader worker's error while the run stops on a signal
            if stop_requested() is None:
                raise
            print(f'{script}: interrupted', file=sys.stderr)
            return exit_status()
        finally:
            release_locks()
    return 0
