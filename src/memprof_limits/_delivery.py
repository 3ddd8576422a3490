"""Delivering token interrupts: to other threads, to a blocked main thread,
and again and again until the task ends.

The problem
-----------
The allocator hook arms interrupts for allocation and memory limits on its
own thread, at samples.  A token is set by *another* thread (or a signal
handler), and its task may never allocate (``while not done: pass``) or may
be blocked in a system call.  And an interrupt may be lost (raised inside a
``__del__``, swallowed by a bare ``except:``): interrupts must be sticky.

What does not work, and why
---------------------------
- Checking the target's mask in Python, then calling
  ``PyThreadState_SetAsyncExc``: the GIL can switch between the two, the
  target can enter a masked region, and the exception lands inside it.
- ``PyThreadState_SetAsyncExc`` alone for the main thread: an armed
  exception is only checked between bytecodes, so ``time.sleep(60)`` sleeps
  on.  ``pthread_kill`` does not help worker threads (CPython retries their
  system calls and runs handlers only in the main thread).

The solution
------------
- Other threads: ``ml_arm`` (C, called with the GIL held through ctypes)
  checks "task active, reason pending, not masked" and arms, atomically with
  respect to the target's bytecode.
- Main thread: a real signal (``INTERRUPT_SIGNAL``, a real-time signal)
  whose Python handler runs *in the main thread* and raises the interrupt if
  a reason is pending and the thread is not masked.  Blocking calls return
  with EINTR, run the handler, and raise (PEP 475).
- A watchdog thread re-delivers every ``REDELIVERY_INTERVAL_S`` while a
  reason is pending and its task runs: sticky interrupts without allocation.

Known failure cases
-------------------
- Worker threads blocked in a system call, and any thread inside a long C
  call that holds the GIL (``sum(range(10**10))``, a regex), are interrupted
  only when the call returns.
- A user handler installed later on ``INTERRUPT_SIGNAL`` replaces ours:
  main-thread tasks are then interrupted only between bytecodes.
"""

from __future__ import annotations

import signal
import threading
import time
import weakref
from types import FrameType

from . import _exceptions, _sampler
from ._sampler import REASON_ALLOCATIONS, REASON_MEMORY, ThreadState

__all__ = ["INTERRUPT_SIGNAL", "REDELIVERY_INTERVAL_S", "activate", "deactivate", "nudge"]

INTERRUPT_SIGNAL = signal.SIGRTMIN + 2
REDELIVERY_INTERVAL_S = 0.01

_active: weakref.WeakSet[ThreadState] = weakref.WeakSet()  # states with open scopes
_wakeup = threading.Condition()
_watchdog: threading.Thread | None = None
_handler_installed = False


def exception_class(pending: int) -> type[_exceptions.Interrupted]:
    if pending & REASON_MEMORY:
        return _exceptions.MemoryLimitExceeded
    if pending & REASON_ALLOCATIONS:
        return _exceptions.AllocationLimitExceeded
    return _exceptions.Cancelled


def _on_interrupt_signal(signum: int, frame: FrameType | None) -> None:
    deliver_in_handler(frame)


def _in_finalizer(frame: FrameType | None) -> bool:
    """Whether ``frame`` runs a ``__del__`` (trio treats those as protected):
    an exception raised there is only printed ("Exception ignored in")."""
    depth = 0
    while frame is not None and depth < 64:
        if frame.f_code.co_name == "__del__":
            return True
        frame, depth = frame.f_back, depth + 1
    return False


def deliver_in_handler(frame: FrameType | None = None) -> None:
    """From a signal handler on the main thread: raise the pending interrupt
    now, unless masked (then it is delivered at the end of the region) or
    inside a finalizer (then the watchdog delivers it a little later)."""
    st = _sampler.thread_state()
    ctl = st.ctl
    if ctl.active > 0 and ctl.mask_depth == 0 and not _in_finalizer(frame):
        pending = st.pending()
        if pending:
            ctl.arms += 1
            raise exception_class(pending)()


def nudge(st: ThreadState) -> None:
    """Interrupt ``st``'s task now if a reason is pending and it is not
    masked (the checks happen where the interrupt is armed)."""
    if st.ctl.active <= 0 or not st.pending():
        return  # (a signal handler runs Python code, allocating, in the task)
    if st.is_main and _handler_installed and threading.get_ident() != st.ident:
        signal.pthread_kill(st.ident, INTERRUPT_SIGNAL)
    else:
        # Another thread, or the task's own (it set its own token, or this is
        # a signal handler): then the interrupt is raised at the next check,
        # inside Token.set() -- its traceback ends in library frames.
        _sampler.arm(st)


def activate(st: ThreadState) -> None:
    """Called (masked) when ``st`` opens its outermost scope."""
    global _watchdog, _handler_installed
    if st.is_main and not _handler_installed:
        signal.signal(INTERRUPT_SIGNAL, _on_interrupt_signal)
        _handler_installed = True
    with _wakeup:
        _active.add(st)
        if _watchdog is None or not _watchdog.is_alive():
            _watchdog = threading.Thread(target=_watch, name="memprof_limits-watchdog", daemon=True)
            _watchdog.start()
        _wakeup.notify()


def deactivate(st: ThreadState) -> None:
    with _wakeup:
        _active.discard(st)


def _watch() -> None:
    """Re-deliver to tasks that keep a reason pending without allocating.

    A task that allocates gets its interrupt again from the sampler at every
    sample (deterministically, by byte count); re-delivering it from here too
    would make the bytes an interrupted task allocates depend on timing.  So
    a task is nudged only if, for a whole interval, it took no slow path and
    received no interrupt (one may still be unwinding).
    """
    progress: dict[int, tuple[int, int, bool]] = {}
    while True:
        with _wakeup:
            while not _active:
                progress.clear()
                _wakeup.wait()
        time.sleep(REDELIVERY_INTERVAL_S)
        for st in list(_active):
            ctl = st.ctl
            key = id(st)
            # A reason that became pending since the last tick was delivered
            # by whoever set it: wait a whole interval before repeating it.
            now = (int(ctl.slow_paths), int(ctl.arms), bool(st.pending()))
            last, progress[key] = progress.get(key), now
            if last != now or not now[2] or ctl.mask_depth != 0:
                continue
            try:
                nudge(st)
            except OSError:  # the thread is gone
                pass
