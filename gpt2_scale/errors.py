"""What goes wrong because of what a user gave us, and how every program reports it.

A ``UserError`` is bad input: a config value, a data directory, a checkpoint, a command-line argument.
Its message names the file or value and says what to do. Every entry point (recipes, tools, sample)
reports it as one ``error: ...`` line on stderr and exits with ``EXIT_USAGE``, without a traceback.
Each concern has its own subclass (ConfigError, CheckpointError, DataError ...), which also derives
from the builtin it refines, so existing ``except ValueError`` code keeps working.
"""

from __future__ import annotations

import sys

EXIT_USAGE = 2  # bad input: fix the command, the config or the files, then run again
EXIT_FAILED = 1  # good input, and still the run could not go on


class UserError(Exception):
    """Bad input, reported in one line that says what to do."""

    exit_code = EXIT_USAGE


class TrainingError(RuntimeError):
    """A run that cannot go on though its input was good (a non-finite loss, the device's memory, a checkpoint that
    cannot be written), reported in one line that says what to change, with exit code 1."""

    exit_code = EXIT_FAILED


def exit_code(error: BaseException) -> int:
    """The code a program stopped by ``error`` exits with: the error's own (UserError, TrainingError), EXIT_USAGE for
    a path that is not there, else EXIT_FAILED (a full disk, a library's failure)."""
    return getattr(error, "exit_code", EXIT_USAGE if isinstance(error, FileNotFoundError) else EXIT_FAILED)


def report(error: BaseException, exit_code: int | None = None) -> int:
    """Print ``error: <message>`` on stderr; returns the exit code for the caller to exit with: ``exit_code``, else
    the error's own (UserError, TrainingError), else EXIT_USAGE."""
    print(f"error: {error}", file=sys.stderr, flush=True)
    return exit_code if exit_code is not None else getattr(error, "exit_code", EXIT_USAGE)
