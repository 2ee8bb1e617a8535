"""The log lines of the scripts: one handler per script, names that are not UTF-8 shown escaped.

- :func:`setup_logging` / :func:`remove_log_handler`: the log handler of a script (:data:`LOG_FORMATS`);
- :func:`shown_name`: a name as it can be printed, drawn or logged;
- :func:`log_thread_os_errors`: an OSError that ends a background thread logged as one line.
"""
from __future__ import annotations

import logging
import sys
import threading
from typing import IO, Any, Optional

from utils.common.errors import describe_os_error

__all__ = ['LOG_FORMATS', 'setup_logging', 'remove_log_handler', 'shown_name', 'log_thread_os_errors']


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
    :func:`utils.common.entry.run_entry_point` removes it when the script's run ends (:func:`remove_log_handler`).
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
