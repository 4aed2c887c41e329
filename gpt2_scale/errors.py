"""What goes wrong because of what a user gave us, and how every program reports it.

A ``UserError`` is bad input: a config value, a data directory, a checkpoint, a command-line argument.
Its message names the file or value and says what to do. Every entry point (recipes, tools, sample)
reports it as one ``error: ...`` line on stderr and exits with ``EXIT_USAGE``, without a traceback.
Each concern has its own subclass (ConfigError, CheckpointError, DataError ...), which also derives
from the builtin it refines, so existing ``except ValueError`` code keeps working.
"""

from __future__ import annotations

import functools
import os
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

EXIT_USAGE = 2  # bad input: fix the command, the config or the files, then run again
EXIT_FAILED = 1  # good input, and still the run could not go on
EXIT_CODE_FILE = "GPT2_SCALE_EXIT_FILE"  # environment: the file where rank 0 of a run leaves its exit code


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


@contextmanager
def exit_code_recorded() -> Iterator[None]:
    """Leave the exit code of the program run inside in the file ``$GPT2_SCALE_EXIT_FILE`` names, from rank 0
    (``RANK`` 0 or unset), as text: ``75``.

    Launchers replace their workers' codes (torchrun exits 1 whatever they were), so a job script could not tell a
    preemption (75: requeue) from bad input (2) or a failure (1); it reads this file instead. A file left by an
    earlier run is removed first, so no file after the program ended means it was killed (SIGKILL, a lost node)
    before it could write one. A path that could not be written is refused before the program starts."""
    path = os.environ.get(EXIT_CODE_FILE) if os.environ.get("RANK", "0") == "0" else None
    if path:
        target = Path(path)
        if target.is_dir() or not target.parent.is_dir() or not os.access(target.parent, os.W_OK | os.X_OK):
            sys.exit(report(UserError(f"{EXIT_CODE_FILE}={path}: cannot write a file there; name a file in a writable directory")))
        target.unlink(missing_ok=True)
    code = EXIT_FAILED  # an uncaught exception's: Python prints its traceback and exits 1
    try:
        yield
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 0 if e.code is None else EXIT_FAILED
        raise
    except KeyboardInterrupt:
        code = 128 + signal.SIGINT
        raise
    finally:
        if path:
            from gpt2_scale.fileio import write_atomic  # fileio reports its errors through this module

            try:
                write_atomic(path, f"{code}\n")
            except OSError as e:
                print(f"warning: could not write exit code {code} to {path} ({e.strerror})", file=sys.stderr, flush=True)


def quiet_when_the_reader_left(main: Callable[..., int]) -> Callable[..., int]:
    """A program's ``main`` whose output may go to a reader that stops early (``| head``): then it stops quietly with
    0, as other programs do, where Python shows a BrokenPipeError traceback (or, at exit, an "Exception ignored")."""
    @functools.wraps(main)
    def run(*args, **kwargs) -> int:
        try:
            try:
                return main(*args, **kwargs)
            finally:  # also after argparse's --help: here, not at exit, where a closed pipe can no longer be caught
                sys.stdout.flush()
        except BrokenPipeError:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing more to the closed pipe at exit
            return 0
    return run
