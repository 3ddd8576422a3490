"""Python signal handlers that run to completion, deferred while masked.

The problem
-----------
CPython runs a Python signal handler at the next bytecode boundary of the
main thread, like an asynchronous exception.  Two things go wrong when the
library's interrupts are in play:

- A handler that starts while one of our interrupts is armed is interrupted
  at its own first instruction (CPython runs pending handlers first, then
  raises the armed exception in whatever frame checks next: the handler's).
  CPython has already cleared the signal's flag: the handler is lost --
  a ``SIGTERM`` handler that should save state never runs.
- A handler that raises (the default ``SIGINT`` handler raising
  ``KeyboardInterrupt``, a ``SIGALRM`` timeout) breaks a masked region
  exactly as an unmasked interrupt would: a lock acquired but never
  released, the library's own bookkeeping half-done.

What does not work, and why
---------------------------
- Checking at delivery time whether the interrupt lands in a handler: CPython
  instantiates the armed class at the landing point and cannot be told not
  to raise it.
- Checking the signal flags before arming: the signal can arrive after.
- Running pending handlers before entering a masked region: a signal can
  arrive inside it.

The solution
------------
Every Python handler is installed wrapped in a C function
(``memprof_limits_signal_handler`` in ``native/masking.c``; no bytecode runs
before it), which

- while the thread is masked, only records the signal; the end of the
  region re-trips it (``PyErr_SetInterruptEx``), so the handler runs right
  after the region -- deferred, never dropped;
- otherwise runs the handler masked, to completion (an interrupt armed
  before is delivered and swallowed first, and re-armed after), then raises
  a pending interrupt at once (so that ``time.sleep`` woken by the signal
  returns with it).

To wrap every handler, ``signal.signal`` and ``signal.getsignal`` are
replaced (once the main thread first uses the library) by versions that
wrap and unwrap: ``getsignal`` and the value returned by ``signal`` are
always the user's own handler, so saving and restoring handlers works as
before.  The handlers already installed at that moment (the default
``SIGINT`` handler, say) are wrapped then, in C: until they are, a pending
one runs at the next bytecode boundary and may raise, and a Python loop
stopped half-way by it once left a raising ``SIGALRM`` handler unwrapped
for good.  A handler that raises while they are wrapped has its exception
raised once all are (from the library's first use, before it did anything).

Known failure cases
-------------------
- A handler installed with a reference to the original function taken
  before (``from signal import signal`` in a module imported earlier), with
  the private ``_signal`` module or from C is not wrapped: it can still be
  interrupted at its first instruction, and a raise from it can break a
  masked region.
- A handler that runs forever cannot be interrupted (it is masked).
"""

from __future__ import annotations

import functools
import signal
import threading
from collections.abc import Callable
from types import FrameType

from . import _sampler

TYPE_CHECKING = False  # (not typing's: the start-up path does not import typing)
if TYPE_CHECKING:
    from typing import Any

__all__ = ["install", "run_deferred_now", "unwrap", "wrap"]

_WRAPPER_NAME = "memprof_limits_signal_handler"
_original_signal = signal.signal
_original_getsignal = signal.getsignal
_installed = False

if TYPE_CHECKING:
    Handler = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None


def _is_wrapper(handler: object) -> bool:
    return (
        getattr(handler, "__name__", None) == _WRAPPER_NAME
        and getattr(handler, "__self__", None) is not None
    )


def wrap(handler: Handler) -> Handler:
    """The handler to install for ``handler`` (constants stay as they are)."""
    if callable(handler) and not _is_wrapper(handler):
        return _sampler.wrap_signal_handler(handler)  # type: ignore[no-any-return]
    return handler


def unwrap(handler: Handler) -> Handler:
    """The user's handler behind an installed one."""
    return handler.__self__ if _is_wrapper(handler) else handler  # type: ignore[union-attr]


@functools.wraps(_original_signal)
def _signal(signalnum: int, handler: Handler) -> Handler:
    return unwrap(_original_signal(signalnum, wrap(handler)))  # type: ignore[arg-type]


@functools.wraps(_original_getsignal)
def _getsignal(signalnum: int) -> Handler:
    return unwrap(_original_getsignal(signalnum))  # type: ignore[arg-type]


def install() -> None:
    """Wrap the installed Python handlers and every later one (main thread;
    idempotent)."""
    global _installed
    if _installed or threading.current_thread() is not threading.main_thread():
        return
    # Until the wrapping is done, a handler may raise at any bytecode boundary
    # (here, before the library does anything): so the replacement comes
    # first and is idempotent, the wrapping happens in C (no boundary), and
    # the flag is set last -- a raise before it means the next main-thread
    # state installs again, never "installed" with a handler left unwrapped.
    signal.signal = _signal  # type: ignore[assignment]
    signal.getsignal = _getsignal  # type: ignore[assignment]
    _sampler.wrap_installed_handlers()
    _installed = True


def run_deferred_now() -> None:
    """From a masked wait that polls (``SafeMutex``): run, now and still
    masked, the handlers of the signals deferred so far in the region, so
    that Ctrl+C can end the wait (a raise from one propagates; the others
    run after the region)."""
    bits = _sampler.take_deferred_signals()
    while bits:
        signum = (bits & -bits).bit_length()
        bits &= bits - 1
        handler = unwrap(_original_getsignal(signum))  # type: ignore[arg-type]
        try:
            if callable(handler):
                handler(signum, None)
        except BaseException:
            for other in range(1, 65):  # not dropped: deferred again
                if bits >> (other - 1) & 1:
                    signal.raise_signal(other)
            raise


_sampler.main_state_hook = install
