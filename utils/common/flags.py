"""The command line of every script: flag types that check their values at parse time, and
``KEY=VALUE`` parsing.

- argparse types (:func:`positive_int`, :func:`int_at_least`, :func:`float_in`, :func:`device_name`,
  :func:`grid_side`, :data:`worker_count`) check ranges and finiteness at parse time, so a bad value ends the
  run before anything starts, with argparse's one line naming the flag (``argument --lr: must be a finite
  number, got nan``), exit 2;
- :func:`parse_model_kwargs` / :class:`KeyValues`: ``--model-kwargs KEY=VALUE ...`` (or one JSON object);
- :func:`device_problem`: what makes a device unusable on this machine, the one check behind every
  ``--device``;
- :func:`available_cores`, :func:`default_workers`, :func:`busy_cpu_hint`: defaults and hints from the
  machine's cores.
"""
from __future__ import annotations

import argparse
import ast
import json
import math
import os
from typing import Any, Callable, Dict, Optional, Sequence, Union

import torch

from utils.common.errors import BadInputError

__all__ = [
    'available_cores', 'busy_cpu_hint', 'default_workers', 'positive_int', 'int_at_least', 'float_in',
    'finite_float', 'default_device', 'device_name', 'device_problem', 'usable_device', 'worker_count', 'MAX_WORKERS',
    'parse_model_kwargs', 'KeyValues', 'grid_side', 'MAX_COARSE_STAGE_SIZE', 'MAX_LR', 'MAX_COUNT', 'MAX_SEED',
]


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


def int_at_least(low: int, high: Optional[int] = None, expected: str = 'an integer',
                 unit: str = '') -> Callable[[str], int]:
    """argparse type: an integer in ``[low, high]`` (no upper bound when ``high`` is None).

    Args:
        expected: what the flag takes, in the message for text that is not an integer.
        unit: after the upper bound in its message (``{cores}``: the cores this process may run on).
    """
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f'expected {expected}, got {text!r}') from None
        if value < low:
            raise argparse.ArgumentTypeError(f'must be at least {low}, got {value}')
        if high is not None and value > high:
            beyond = unit.format(cores=available_cores()) if unit else ''
            raise argparse.ArgumentTypeError(f'must be at most {high}{beyond}, got {value}')
        return value
    parse.__name__ = f'int>={low}'
    return parse


#: argparse type of counts and sizes that must be at least 1 (grid sides, batch sizes); at most
#: :data:`MAX_COUNT` (e.g. --batch-size 2**63 overflowed the loaders).
positive_int = int_at_least(1, MAX_COUNT, expected='a positive integer')
#: argparse type: loader worker processes, 0 to :data:`MAX_WORKERS`.
worker_count = int_at_least(0, MAX_WORKERS, expected='a number of worker processes',
                            unit=' loader processes (this machine has {cores} cores)')


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


def device_problem(device: torch.device) -> Optional[str]:
    """What makes ``device`` unusable on this machine (``'CUDA is not available on this machine (use cpu)'``),
    or None: the one check behind ``--device`` (:func:`device_name`, a distributed launch's device)."""
    if device.type == 'cuda':
        if not torch.cuda.is_available():
            return 'CUDA is not available on this machine (use cpu)'
        if device.index is not None and device.index >= torch.cuda.device_count():
            return f'this machine has {torch.cuda.device_count()} CUDA devices'
    elif device.type == 'mps' and not torch.backends.mps.is_available():
        return 'MPS is not available on this machine'
    return None


def default_device() -> str:
    """``--device``'s default: ``cuda`` when this machine has a GPU, else ``cpu``."""
    return 'cuda' if torch.cuda.is_available() else 'cpu'


def usable_device(name: str) -> torch.device:
    """The device of a ``--device`` value, ready to use: :func:`device_problem`'s check, then one empty
    allocation on it (a GPU whose driver fails shows it here, not half-way through a run).

    Raises:
        BadInputError: not a device, a device this machine lacks, or one that fails to allocate.
    """
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise BadInputError(f'--device {name!r} is not a device: {e}') from e
    problem = device_problem(device)
    if problem is not None:
        raise BadInputError(f'--device {name}: {problem}')
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:
        raise BadInputError(f'device {name!r} is not available: {e}') from e
    return device


def device_name(text: str) -> str:
    """argparse type: a torch device this machine has (``cpu``, ``cuda``, ``cuda:1``, ``mps``)."""
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f'not a device: {text!r} (cpu, cuda, cuda:N)') from None
    if device.type not in ('cpu', 'cuda', 'mps'):
        raise argparse.ArgumentTypeError(f'unsupported device {text!r} (cpu, cuda, cuda:N)')
    problem = device_problem(device)
    if problem is not None:
        raise argparse.ArgumentTypeError(f'{text}: {problem}')
    return text


def parse_model_kwargs(items: Union[str, Sequence[str], None], flag: str = '--model-kwargs') -> Dict[str, Any]:
    """``['depth=4', 'patch_size=8']`` (or one JSON object) -> ``{'depth': 4, 'patch_size': 8}``: the one
    ``KEY=VALUE`` parser of the scripts (``flag`` names the flag in the message).

    Values are Python literals when they parse as one, else strings; keys are Python names.

    Raises:
        ValueError: an item that is not ``KEY=VALUE``, or a JSON object that does not parse.
    """
    items = [items] if isinstance(items, str) else list(items or [])
    if len(items) == 1 and items[0].lstrip().startswith('{'):
        try:
            return dict(json.loads(items[0]))
        except json.JSONDecodeError as e:
            raise ValueError(f'{flag} is not valid JSON: {e}') from e
    out: Dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition('=')
        if not sep or not key.isidentifier():
            raise ValueError(f'{flag} expects KEY=VALUE, got {item!r}')
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


class KeyValues(argparse.Action):
    """argparse action: ``KEY=VALUE ...`` (or one JSON object) into a dict at parse time
    (:func:`parse_model_kwargs`); an item that is not one is argparse's one line, exit 2."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: Optional[str] = None) -> None:
        try:
            setattr(namespace, self.dest, parse_model_kwargs(values, option_string or self.dest))
        except ValueError as e:
            parser.error(str(e))
