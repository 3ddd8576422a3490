"""Exit statuses, and tracebacks that show the user's frames only."""

from __future__ import annotations

import os
import runpy
import sys
import traceback
from typing import Final, TextIO

import memprof_limits as ml
from memprof_limits._frames import user_traceback

__all__ = [
    "EXIT_ALLOCATIONS",
    "EXIT_EXCEPTION",
    "EXIT_INTERRUPTED",
    "EXIT_MEMORY",
    "EXIT_OK",
    "EXIT_USAGE",
    "exit_status_for_reason",
    "print_interrupt",
    "print_user_exception",
    "system_exit_status",
]

EXIT_OK: Final = 0
"""The script, ``-c`` code or session ended normally."""
EXIT_EXCEPTION: Final = 1
"""An uncaught exception (as ``python`` does)."""
EXIT_USAGE: Final = 2
"""Bad command line, or the script cannot be opened (as ``python`` does)."""
EXIT_ALLOCATIONS: Final = 3
"""The allocation limit (``--allocations``) was reached."""
EXIT_MEMORY: Final = 4
"""The global memory limit (``--memory``) was exceeded."""
EXIT_INTERRUPTED: Final = 130
"""Interrupted by Ctrl+C / SIGINT (128 + SIGINT, the shell convention)."""

_REASON_STATUS: Final = {
    "allocations": EXIT_ALLOCATIONS,
    "memory": EXIT_MEMORY,
    "token": EXIT_INTERRUPTED,
}

# Frames in these directories are the REPL's and the library's machinery:
# the first frames of a traceback that are in them are not shown.
_INTERNAL_DIRS: Final = tuple(
    os.path.dirname(os.path.abspath(path)) + os.sep
    for path in (ml.__file__ or "", __file__)
    if path
)
_INTERNAL_FILES: Final = frozenset(
    [os.path.abspath(path) for path in (runpy.__file__ or "",) if path] + ["<frozen runpy>"]
)


def exit_status_for_reason(reason: str | None) -> int:
    """The exit status for a cell or script stopped for ``reason``
    (``"allocations"``: 3, ``"memory"``: 4, ``"token"``: 130)."""
    return _REASON_STATUS.get(reason or "token", EXIT_INTERRUPTED)


def system_exit_status(exc: SystemExit, stderr: TextIO | None = None) -> int:
    """The exit status ``raise SystemExit(code)`` asks for, as the
    interpreter computes it: ``None`` is 0, an int is itself, anything else
    is printed to stderr and gives 1."""
    code = exc.code
    if code is None:
        return EXIT_OK
    if isinstance(code, int):
        return code
    print(code, file=stderr or sys.stderr)
    return EXIT_EXCEPTION


def _is_internal(filename: str) -> bool:
    if filename in _INTERNAL_FILES:
        return True
    path = os.path.abspath(filename)
    return path in _INTERNAL_FILES or path.startswith(_INTERNAL_DIRS)


def print_user_exception(
    exc: BaseException, file: TextIO | None = None, *, frames: bool = True
) -> None:
    """Print ``exc`` as a normal traceback, without the frames of the REPL
    and of ``memprof_limits`` that ran the user's code (those at the start
    of the traceback).  If no frame is the user's, the error is the
    machinery's: the whole traceback is printed.  ``frames=False`` prints
    no frames at all (a ``SyntaxError`` from compiling a cell, shown as
    Python shows it)."""
    tb = user_traceback(exc.__traceback__, _is_internal)
    if tb is None and frames:
        tb = exc.__traceback__
    elif not frames:
        tb = None
    out = file or sys.stderr
    out.write("".join(traceback.format_exception(type(exc), exc, tb)))
    out.flush()


def print_interrupt(outcome: ml.CellOutcome, file: TextIO | None = None) -> None:
    """Print an interrupted cell as the kernel shows it: where the cell was
    stopped (its frames, without the library's and the REPL's at either
    end: an interrupt can be raised inside the SIGINT handler or the
    library's own code), then one line ``ENAME: reason and figures; rolled
    back: ...``."""
    out = file or sys.stderr
    exc = outcome.exception
    tb = user_traceback(exc.__traceback__ if exc is not None else None, _is_internal, trim_end=True)
    if tb is not None:
        out.write("Traceback (most recent call last):\n")
        out.write("".join(traceback.StackSummary.extract(traceback.walk_tb(tb)).format()))
    out.write(f"{outcome.ename}: {outcome.interrupt_line()}\n")
    out.flush()
