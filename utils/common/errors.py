"""The errors a script reports as one line, and the exit status each ends a run with.

Every error meant for a person derives from :class:`UserError`, which carries its exit status
(``exit_code``): bad input or configuration exits :data:`EXIT_BAD_INPUT` (2, the argparse
convention); a run that started and failed on its own (a non-finite training loss) exits
:data:`EXIT_FAILED` (1). The entry-point wrapper (:func:`utils.common.entry.run_entry_point`) prints the
message (:func:`user_message`, :func:`describe_os_error`) and returns ``exit_code``. Each class keeps the built-in family it had (``ValueError`` or
``RuntimeError``), so code that catches those still does. ``datasets.folder.DatasetError`` stays in
``datasets/`` (which imports nothing from ``utils/``) and is reported like a :class:`UserError`, as is
``datasets.safe_read.UnsafeFileError`` (a file or structure from outside refused before use).
"""
from __future__ import annotations

__all__ = [
    'EXIT_BAD_INPUT', 'EXIT_FAILED', 'UserError', 'BadInputError', 'ConfigError', 'CheckpointError',
    'OutputDirError', 'ModelBuildError', 'DistributedSetupError', 'first_line', 'user_message', 'describe_os_error',
]

#: Exit status of every script: bad input or configuration (a one-line message says what; the
#: argparse convention), and a run that started but failed (e.g. a non-finite training loss).
EXIT_BAD_INPUT = 2
EXIT_FAILED = 1


class UserError(RuntimeError):
    """An error with a one-line message meant for a person; ``exit_code`` is the run's exit status."""
    exit_code = EXIT_BAD_INPUT


class BadInputError(UserError, ValueError):
    """Input that cannot be used (a flag value, a file, a folder)."""


class ConfigError(UserError):
    """Flags that cannot work together."""


class CheckpointError(UserError):
    """A checkpoint that cannot be used."""


class OutputDirError(UserError):
    """The output folder cannot be created or written, or is in use by another run."""


class ModelBuildError(UserError, ValueError):
    """The checkpoint or the flags do not make a model."""


class DistributedSetupError(UserError):
    """The launch environment is inconsistent."""


def first_line(e: BaseException) -> str:
    """``Type: first line of the message`` of an error raised by a library (torch, safetensors)."""
    text = str(e).strip()
    return f'{type(e).__name__}: {text.splitlines()[0]}' if text else type(e).__name__


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
