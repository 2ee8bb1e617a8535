"""SIGINT and SIGTERM end every script within seconds, with exit status 130 / 143.

:func:`handle_stop_signals` installs one handler for both signals while a script runs. It raises
:class:`Interrupted` (a ``KeyboardInterrupt``) in the main thread; the scripts turn it into
their exit status (:func:`exit_status`: 128 + the signal number) and the last checkpoint stays
intact, because every file is written through a temporary file and a rename. Outside the loops the
exception is raised at once; inside a loop marked with :func:`stop_at_steps` (training, evaluation,
inference and label-map batches) it is raised by :func:`check_stop` at the next step boundary, so
it never lands inside library code that would swallow it (the fork of loader workers).

DataLoader worker processes get the handler (:func:`quiet_worker_signals` as ``worker_init_fn``;
forked workers inherit it too), which does nothing in them: a signal sent to the
whole process group (Ctrl-C at a terminal, a scheduler's SIGTERM) neither kills a worker (the main
process would report a crashed worker) nor prints a worker's traceback; the main process stops and
shuts its workers down as usual (a worker whose parent is gone exits by itself). If a worker error
reaches the main process after a stop was requested anyway, :func:`stop_requested` tells the entry
point that it is the interrupt.

Training sets ``deferred`` for SIGTERM (a scheduler's preemption notice): the handler then only
records the signal; the step loop checks :func:`preemption_requested` at its step boundary, writes
its mid-epoch checkpoint and raises :class:`StopRequested` (exit :data:`EXIT_STOPPED`, 143). This
module holds the one stop state of a process; the entry point (:func:`utils.common.entry.run_entry_point`)
installs the handler.
"""
from __future__ import annotations

import atexit
import contextlib
import multiprocessing
import multiprocessing.util  # registers multiprocessing's exit handler before ours: ours runs first
import os
import signal
import threading
from typing import Any, Iterable, Iterator, Optional, Set

__all__ = ['Interrupted', 'StopRequested', 'EXIT_STOPPED', 'handle_stop_signals', 'quiet_worker_signals',
           'stop_at_steps', 'stop_requested', 'preemption_requested', 'step_boundary', 'check_stop', 'exit_status']

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """The run was asked to stop by a signal (``signum``)."""

    def __init__(self, signum: int) -> None:
        super().__init__(f'interrupted by {signal.Signals(signum).name}')
        self.signum = signum


class StopRequested(Interrupted):
    """SIGTERM, deferred to a training step boundary, stopped the run after its mid-epoch checkpoint was written."""

    def __init__(self, message: str) -> None:
        super().__init__(signal.SIGTERM)
        self.args = (message,)


#: Exit status of a run stopped by SIGTERM after writing its checkpoint (128 + 15, as a shell reports it).
EXIT_STOPPED = 128 + signal.SIGTERM


class _State:
    signum: Optional[int] = None
    deferred: Set[int] = set()
    owner: Optional[int] = None
    in_steps = 0  # > 0 inside a loop that calls check_stop at every step


def _handler(signum: int, frame: Any) -> None:
    again = _State.signum is not None
    _State.signum = signum
    if os.getpid() != _State.owner:  # a loader worker: the main process stops, then shuts the workers down
        return
    if again or (_State.in_steps == 0 and signum not in _State.deferred):
        raise Interrupted(signum)


@contextlib.contextmanager
def stop_at_steps() -> Iterator[None]:
    """Inside this block (a loop calling :func:`check_stop` at each step; also a decorator) a first stop
    signal waits for the next step boundary instead of raising wherever the main thread happens to be
    (e.g. inside the fork of loader workers, where the exception would be swallowed); a second one
    raises at once."""
    _State.in_steps += 1
    try:
        yield
    finally:
        _State.in_steps -= 1
    check_stop()


@contextlib.contextmanager
def handle_stop_signals(deferred: Iterable[int] = ()) -> Iterator[None]:
    """For the duration of a script's run: the handler for SIGINT and SIGTERM; the previous handlers
    come back afterwards (a script's ``main`` called from Python, or from a test, leaves no trace).
    Outside the main thread it only runs the block.

    Args:
        deferred: signals that only set :func:`stop_requested` (the loop acts on them at a step boundary).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    state = (_State.owner, _State.signum, _State.deferred, _State.in_steps)
    _State.owner, _State.signum, _State.deferred, _State.in_steps = os.getpid(), None, set(deferred), 0
    for sig in STOP_SIGNALS:
        signal.signal(sig, _handler)
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
        _State.owner, _State.signum, _State.deferred, _State.in_steps = state


def quiet_worker_signals(worker_id: int = 0) -> None:
    """DataLoader ``worker_init_fn``: SIGINT / SIGTERM do nothing in this worker (torch installs a handler
    that kills it, which the main process would report as a crashed worker); the main process stops and
    shuts the worker down."""
    if _State.owner is not None:
        for sig in STOP_SIGNALS:
            signal.signal(sig, _handler)


def stop_requested() -> Optional[int]:
    """The stop signal received since :func:`handle_stop_signals`, or None."""
    return _State.signum


def preemption_requested() -> bool:
    """Whether a preemption signal (SIGTERM, which training defers to the step boundary: see
    :func:`handle_stop_signals`) asked this process to stop. SIGINT is not one: it ends the run at the step
    boundary without a new checkpoint (exit 130)."""
    return _State.signum == signal.SIGTERM


def step_boundary() -> bool:
    """A training step boundary: raise :class:`Interrupted` for a stop signal (SIGINT, or SIGTERM when not
    deferred), return True when a preemption (deferred SIGTERM) asks the loop to save and stop."""
    if preemption_requested():
        return True
    check_stop()
    return False


def check_stop() -> None:
    """Raise :class:`Interrupted` if a stop signal arrived (call it at step boundaries)."""
    if _State.signum is not None and os.getpid() == _State.owner:
        raise Interrupted(_State.signum)


def exit_status(error: Optional[BaseException] = None) -> int:
    """128 + the signal number (130 for SIGINT, 143 for SIGTERM); 130 for a plain KeyboardInterrupt."""
    signum = getattr(error, 'signum', None) or _State.signum or signal.SIGINT
    return 128 + int(signum)


def _kill_leftover_workers() -> None:
    """At interpreter exit, kill loader workers still alive (a DataLoader iterator kept alive by a caught
    exception's traceback, e.g. an in-process run that failed inside a worker). They ignore SIGTERM
    (:func:`quiet_worker_signals`), so multiprocessing's own exit handler, which terminates daemonic
    children with SIGTERM and then joins them, would wait for them forever."""
    children = [child for child in multiprocessing.active_children() if child.daemon]
    if not children:
        return
    try:  # torch's SIGCHLD handler would raise about the very workers killed here
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    except (ValueError, OSError):
        pass
    for child in children:
        child.kill()
    for child in children:
        try:
            child.join(timeout=5)
        except Exception:  # noqa: BLE001 (exit time: nothing more to do for this child)
            pass


atexit.register(_kill_leftover_workers)

