"""Stop signals while a script starts, before its entry point installs its own handling.

Importing torch, timm and the rest takes seconds; a Ctrl-C or a scheduler's SIGTERM in that time gave a
traceback from inside the import machinery (sometimes a RecursionError, exit 1), or ended the process
with 143 and no line. :func:`stop_while_starting`, called by every script first thing under
``if __name__ == '__main__':`` (this module imports nothing slow), ends the process at once with one line
and 128 + the signal number: nothing has been written yet. The entry point
(:func:`utils.core.entry.run_entry_point`) replaces the handler with the run's own while it runs.
:func:`draw_to_files` makes their figures independent of ``MPLBACKEND``.
"""
from __future__ import annotations

import os
import signal

__all__ = ['stop_while_starting', 'draw_to_files']


def stop_while_starting(script: str) -> None:
    """Install the start-up handler for SIGINT and SIGTERM: one line on stderr, exit 130 / 143."""
    def stop(signum: int, frame: object) -> None:
        name = signal.Signals(signum).name
        os.write(2, f'{script}: interrupted ({name}) while starting; nothing was written\n'.encode())
        os._exit(128 + signum)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop)


def draw_to_files() -> None:
    """The scripts draw PNG files only, never on a screen: matplotlib's non-interactive Agg backend whatever
    ``MPLBACKEND`` says (``MPLBACKEND=bogus`` made the import of matplotlib raise, a traceback in the middle
    of a run; a display backend needs a display). Called before anything imports matplotlib."""
    os.environ['MPLBACKEND'] = 'agg'
