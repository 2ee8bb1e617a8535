"""Every script's ``main``: its work run inside the stop-signal handling, and what ends it turned into one
line and an exit status (:func:`run_entry_point`). The one module that knows every error a run can end with.
"""
from __future__ import annotations

import logging
import sys
from typing import Any, Callable, Iterable, Optional, Tuple, Type

from datasets.folder import DatasetError
from datasets.safe_read import UnsafeFileError
from utils.common.dist import PeerFailedError
from utils.common.errors import EXIT_BAD_INPUT, UserError, describe_os_error, user_message
from utils.common.logs import remove_log_handler
from utils.common.run_folder import release_locks
from utils.common.signals import StopRequested, exit_status, handle_stop_signals, stop_requested

__all__ = ['run_entry_point']

_logger = logging.getLogger(__name__)


def run_entry_point(work: Callable[[], Any], script: Optional[str] = None, *,
                    user_errors: Tuple[Type[BaseException], ...] = (), writing: str = 'cannot write',
                    interrupted: str = 'interrupted', kept: str = '', one_line: bool = False,
                    deferred: Iterable[int] = (), cleanup: Optional[Callable[[], None]] = None) -> int:
    """Every script's ``main``: run ``work()`` and turn what ends it into an exit status and one line.

    Exit status: 0; 130 / 143 on SIGINT / SIGTERM (also when an error, e.g. a loader worker's, reaches the
    main process while it stops); a :class:`~utils.common.errors.UserError`'s own ``exit_code`` (2 for bad
    input, 1 for a run that failed on its own, another process's code for
    :class:`~utils.common.dist.PeerFailedError`); 2 for ``datasets.DatasetError``,
    ``datasets.safe_read.UnsafeFileError``, the ``user_errors`` and an
    ``OSError`` (a full disk: ``writing`` names what could not be done). Anything else is a bug and keeps
    its traceback. Run locks are released and the log handler removed on the way out.

    Args:
        work: the script's run; it may return an int, the exit status of a run that reports its own failure
            (the quick start: a script it ran failed).
        script: report on stderr as ``SCRIPT: error: ...`` / ``SCRIPT: interrupted`` (argparse's form);
            None: through the log (``logging.error``), as the training scripts and make_token_labels.py.
        user_errors: more error types reported as bad input (exit 2).
        interrupted: the line of an interrupt; a :class:`~utils.common.signals.StopRequested` brings its own.
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
            elif isinstance(e, (UserError, DatasetError, UnsafeFileError) + tuple(user_errors)):
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
