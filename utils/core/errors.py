"""The errors a script reports as one line, and the exit status each ends a run with.

Every error meant for a person derives from :class:`UserError`, which carries its exit status
(``exit_code``): bad input or configuration exits :data:`EXIT_BAD_INPUT` (2, the argparse
convention); a run that started and failed on its own (a non-finite training loss) exits
:data:`EXIT_FAILED` (1). The entry-point wrapper (:func:`utils.core.cli.run_entry_point`) prints the
message and returns ``exit_code``. Each class keeps the built-in family it had (``ValueError`` or
``RuntimeError``), so code that catches those still does. ``datasets.folder.DatasetError`` stays in
``datasets/`` (which imports nothing from ``utils/``) and is reported like a :class:`UserError`.
"""
from __future__ import annotations

__all__ = [
    'EXIT_BAD_INPUT', 'EXIT_FAILED', 'UserError', 'BadInputError', 'ConfigError', 'CheckpointError',
    'OutputDirError', 'ModelBuildError', 'DistributedSetupError', 'first_line',
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
