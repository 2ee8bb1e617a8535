"""What every script does first, on import, before torch, timm and the rest: the one place that sets
``HF_HUB_OFFLINE`` and that handles a stop signal while a script starts.

Every script imports this module first (``import utils.common.startup``, above torch and timm: it imports
nothing slow). On import it

- sets ``HF_HUB_OFFLINE=1`` unless the environment says otherwise: nothing downloads at run time
  (``huggingface_hub`` reads it when it is imported, which is why this comes first);
- when the process was started as one of :data:`ENTRY_SCRIPTS` (``python main_deit.py``), and only then
  (a test or an application that imports ``main_deit`` keeps its own handlers and backend):
  :func:`draw_to_files`, and :func:`stop_while_starting`: importing torch, timm and the rest takes seconds;
  a Ctrl-C or a scheduler's SIGTERM in that time gave a traceback from inside the import machinery
  (sometimes a RecursionError, exit 1), or ended the process with 143 and no line. Now it ends the process
  at once with one line and 128 + the signal number: nothing has been written yet. The entry point
  (:func:`utils.common.entry.run_entry_point`) replaces the handler with the run's own while it runs.
"""
from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Optional

__all__ = ['ENTRY_SCRIPTS', 'launched_script', 'stop_while_starting', 'draw_to_files']

#: The scripts whose ``main`` runs under :func:`utils.common.entry.run_entry_point` (which replaces the
#: start-up handler); ``run_timm_script.py`` and the benchmarks take ``HF_HUB_OFFLINE`` only.
ENTRY_SCRIPTS = frozenset({'main_deit.py', 'main_lvvit.py', 'dynamic_inference.py', 'visualize.py',
                           'make_token_labels.py', 'export_onnx.py', 'quickstart.py'})

_ROOT = Path(__file__).resolve().parents[2]


def launched_script() -> Optional[str]:
    """The file name of the script of :data:`ENTRY_SCRIPTS` this process was started as (``python
    main_deit.py``, ``python -m main_deit``), else None (pytest, an application, another script)."""
    main = sys.modules.get('__main__')
    path = getattr(main, '__file__', None)
    if not path or getattr(main, '__name__', None) != '__main__':  # a worker's re-import is '__mp_main__'
        return None
    path = Path(path).resolve()
    return path.name if path.parent == _ROOT and path.name in ENTRY_SCRIPTS else None


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


os.environ.setdefault('HF_HUB_OFFLINE', '1')
_SCRIPT = launched_script()
if _SCRIPT is not None:
    draw_to_files()
    stop_while_starting(_SCRIPT)
