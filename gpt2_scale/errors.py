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


class UserError(Exception):
    """Bad input, reported in one line that says what to do."""


def report(error: BaseException, exit_code: int = EXIT_USAGE) -> int:
    """Print ``error: <message>`` on stderr; returns the exit code for the caller to exit with."""
    print(f"error: {error}", file=sys.stderr, flush=True)
    return exit_code
