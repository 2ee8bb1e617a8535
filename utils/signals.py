"""SIGINT and SIGTERM end every script within seconds, with exit status 130 / 143.

:func:`handle_stop_signals` installs one handler for both signals. By default it raises
:class:`Interrupted` (a ``KeyboardInterrupt``) at once in the main thread; the scripts turn it into
their exit status (:func:`exit_status`: 128 + the signal number) and the last checkpoint stays
intact, because every file is written through a temporary file and a rename. Loop code also calls
:func:`check_stop` at step boundaries, so a stop that some library swallowed (a DataLoader shutting
its workers down, a thread pool) still ends the run at the next step.

DataLoader worker processes inherit the handler: in a worker, :class:`Interrupted` is a
``KeyboardInterrupt``, which torch's worker loop treats as "the main process stops", so workers
exit quietly instead of dying by the signal (which would make the main process report a crashed
worker). If a worker error reaches the main process after a stop was requested anyway,
:func:`stop_requested` tells the entry point that it is the interrupt.

A later addition (writing a final checkpoint on SIGTERM) can set ``deferred`` for SIGTERM: the
handler then only records the signal, and the training loop checks :func:`stop_requested` at its
step boundary, saves, and raises :class:`Interrupted` itself.
"""
from __future__ import annotations

import os
import signal
import threading
from typing import Any, Iterable, Optional, Set

__all__ = ['Interrupted', 'handle_stop_signals', 'stop_requested', 'check_stop', 'exit_status', 'reset_stop']

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """The run was asked to stop by a signal (``signum``)."""

    def __init__(self, signum: int) -> None:
        super().__init__(f'interrupted by {signal.Signals(signum).name}')
        self.signum = signum


class _State:
    signum: Optional[int] = None
    deferred: Set[int] = set()
    owner: Optional[int] = None


def _handler(signum: int, frame: Any) -> None:
    _State.signum = signum
    if os.getpid() != _State.owner:  # a loader worker: leave quietly (torch's worker loop expects this)
        raise KeyboardInterrupt
    if signum not in _State.deferred:
        raise Interrupted(signum)


def handle_stop_signals(deferred: Iterable[int] = ()) -> None:
    """Install the handler for SIGINT and SIGTERM (main thread only; elsewhere a no-op).

    Args:
        deferred: signals that only set :func:`stop_requested` (the loop acts on them at a step boundary).
    """
    if threading.current_thread() is not threading.main_thread():
        return
    _State.owner = os.getpid()
    _State.signum = None
    _State.deferred = set(deferred)
    for sig in STOP_SIGNALS:
        signal.signal(sig, _handler)


def stop_requested() -> Optional[int]:
    """The stop signal received since :func:`handle_stop_signals`, or None."""
    return _State.signum


def reset_stop() -> None:
    _State.signum = None


def check_stop() -> None:
    """Raise :class:`Interrupted` if a stop signal arrived (call it at step boundaries)."""
    if _State.signum is not None and os.getpid() == _State.owner:
        raise Interrupted(_State.signum)


def exit_status(error: Optional[BaseException] = None) -> int:
    """128 + the signal number (130 for SIGINT, 143 for SIGTERM); 130 for a plain KeyboardInterrupt."""
    signum = getattr(error, 'signum', None) or _State.signum or signal.SIGINT
    return 128 + int(signum)
