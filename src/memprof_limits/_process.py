"""Pin the hash seed of our own process -- and of no other.

The problem
-----------
String hashes decide the iteration order of sets and dicts of strings, so
with hash randomisation the same cell can take another path, and allocate
another number of bytes, in each process: the allocation counts of the
kernel, the REPL and ``memprof-limits run`` are reproducible only with a
fixed seed.  The seed is read once, at interpreter start-up, from
``PYTHONHASHSEED``: our own process must be started with it.

What does not work, and why
---------------------------
- Exporting ``PYTHONHASHSEED=0`` (the kernelspec's ``env``, or setting
  ``os.environ`` before re-executing): every child process inherits it -- a
  web server started from a notebook runs with hash randomisation off (no
  protection against hash flooding), and a test run from the REPL is no
  longer randomised.
- Reading the variable in the kernel to decide: a kernelspec that sets it
  makes the user's value indistinguishable from ours.

The solution
------------
:func:`pin_hash_seed`, first thing in an entry point: if hash randomisation
is on and the user did not choose a seed, record the variable's original
state (absent, or empty) in a private variable, set ``PYTHONHASHSEED=0`` and
re-execute the same command line (``os.execv``: same PID, so a Jupyter
kernel manager or a shell keeps track of it).  The re-executed process, at
its own first call, restores the variable as it was and removes the private
one -- through ``os.environ``, which also updates the C environment that
``subprocess``, ``os.system`` and ``os.exec*`` pass on.  Our process keeps
seed 0; its children see the user's environment.

Known failure cases
-------------------
- A seed the user set (``PYTHONHASHSEED=123``, or ``random`` to opt out) is
  respected: our process runs with it, and so do its children.
- ``python -E`` (environment ignored): the re-executed process still
  randomises (the private variable stops a loop); counts may then vary.
- Windows has no ``execv`` that keeps the process (it spawns another one):
  nothing is done there.
- A kernelspec written by an older version sets ``PYTHONHASHSEED=0`` in its
  ``env``: that is then the user's value and children inherit it
  (re-install the kernelspec).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

__all__ = ["SAVED_VARIABLE", "pin_hash_seed", "rss_bytes"]

#: Private variable: the state of ``PYTHONHASHSEED`` before the re-execution
#: (``unset``, or ``set:`` followed by the value).  Never seen by user code.
SAVED_VARIABLE = "_MEMPROF_LIMITS_SAVED_PYTHONHASHSEED"

_UNSET = "unset"
_SET = "set:"


def pin_hash_seed(argv: Sequence[str] | None = None) -> None:
    """Make this process run with hash seed 0, without exporting it.

    Call it first in an entry point (before output, threads or imports that
    take time).  ``argv`` is the command line to re-execute (default
    ``sys.orig_argv``); returns in the re-executed process (or at once when
    nothing is to be done).  See the module's docstring.
    """
    saved = os.environ.pop(SAVED_VARIABLE, None)
    if saved is not None:  # the re-executed process: give the variable back
        _restore(saved)
        return
    current = os.environ.get("PYTHONHASHSEED")
    if current or not sys.flags.hash_randomization or sys.flags.ignore_environment:
        return  # a seed the user chose, or nothing we could change
    if sys.platform == "win32":
        return
    command = list(argv if argv is not None else getattr(sys, "orig_argv", None) or [])
    if not command:
        return
    command[0] = sys.executable
    os.environ[SAVED_VARIABLE] = _UNSET if current is None else _SET + current
    os.environ["PYTHONHASHSEED"] = "0"
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            stream.flush()
    try:
        os.execv(sys.executable, command)
    except OSError:  # pragma: no cover - exec refused: run randomised, as started
        _restore(os.environ.pop(SAVED_VARIABLE))


def _restore(saved: str) -> None:
    if saved.startswith(_SET):
        os.environ["PYTHONHASHSEED"] = saved[len(_SET) :]
    else:
        os.environ.pop("PYTHONHASHSEED", None)


def rss_bytes() -> int | None:
    """The process's resident memory now (the engine's own reading of
    ``/proc/self/statm``), or ``None`` where it cannot be read.  For the front
    ends' displays (the kernel's interrupt message, the REPL's toolbar)."""
    from . import _sampler  # (not at import: pin_hash_seed runs before the engine loads)

    rss = _sampler.rss_bytes()
    return rss if rss >= 0 else None
