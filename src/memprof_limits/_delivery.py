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
  While nothing is pending it sleeps in C, woken by ``ml_pending_changed``
  (hooks, ``Token.set``, a scope opened on a set token): running Python
  every interval would share CPython's free lists with the tasks and make
  their allocation counts vary with the machine's load.
- One interrupt, delivered once: an interrupt is re-delivered only once it
  was swallowed -- never while the thread is still handling (in an
  ``except`` or ``finally``) an interrupt of the same cause.  The
  main-thread signal handler checks ``sys.exception()``; the C arming paths
  on the thread itself check the same thing (``native/sampler.c``).  Without
  it, a token set while the main thread sleeps was delivered twice under
  load (the setter's signal and the watchdog's, queued real-time signals),
  the second at the first line of the task's own ``except`` block.
- If the delivery signal is no longer ours (a program set it to
  ``SIG_DFL``, whose action would kill the process), it is not sent: the
  interrupt is armed for the next bytecode boundary instead, and the next
  task on the main thread installs our handler again.
- In a child created by ``os.fork`` the watchdog and the list of active
  tasks start empty (the parent's threads do not exist there).
- Cyclic garbage collections run masked (two builtins at the head and the
  tail of ``gc.callbacks``, kept there at each task start): an interrupt
  delivered in a finalizer or a gc callback is only printed by CPython, and
  the unraisable hook that prints it is Python code that a re-delivery would
  interrupt in turn.  Deferred, the interrupt lands after the collection.

Known failure cases
-------------------
- Worker threads blocked in a system call, and any thread inside a long C
  call that holds the GIL (``sum(range(10**10))``, a regex), are interrupted
  only when the call returns.
- A user handler installed later on ``INTERRUPT_SIGNAL`` replaces ours:
  main-thread tasks are then interrupted only between bytecodes.
- Worker threads get the "not twice for one cause" rule at their own
  samples and mask ends, but not from the watchdog (``ml_arm`` cannot read
  another thread's exception state safely): a worker's handler that keeps
  running for a whole re-delivery interval without allocating can get the
  interrupt again.
"""

from __future__ import annotations

import signal
import sys
import threading
import weakref
from types import FrameType

from . import _exceptions, _sampler, _signals
from ._sampler import REASON_ALLOCATIONS, REASON_MEMORY, ThreadState

__all__ = [
    "INTERRUPT_SIGNAL",
    "REDELIVERY_INTERVAL_S",
    "activate",
    "deactivate",
    "nudge",
    "running_tasks",
]

INTERRUPT_SIGNAL = signal.SIGRTMIN + 2
REDELIVERY_INTERVAL_S = 0.01
_INTERVAL_NS = round(REDELIVERY_INTERVAL_S * 1e9)

_active: weakref.WeakSet[ThreadState] = weakref.WeakSet()  # states with open scopes
_active_lock = threading.RLock()  # (a collection under it may open a task)
_watchdog: threading.Thread | None = None
_handler_installed = False


def exception_class(pending: int) -> type[_exceptions.Interrupted]:
    if pending & REASON_MEMORY:
        return _exceptions.MemoryLimitExceeded
    if pending & REASON_ALLOCATIONS:
        return _exceptions.AllocationLimitExceeded
    return _exceptions.Cancelled


def _on_interrupt_signal(signum: int, frame: FrameType | None) -> None:
    """The delivery signal's handler.  Installed wrapped (``_signals``), it
    runs masked; the wrapper then calls :func:`deliver_in_handler`."""


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
            cls = exception_class(pending)
            if isinstance(sys.exception(), cls):
                # Already being handled: delivered once -- within the bounds
                # of the one-cause rule (native/sampler.h), so that a runaway
                # handler does not escape its limit.
                ctl.handler_rounds += 1
                if (
                    ctl.handler_rounds <= _sampler.HANDLER_ROUNDS
                    and _sampler.allocated_bytes() < ctl.grace_until
                ):
                    return
            else:
                ctl.handler_rounds = 0
            ctl.arms += 1
            _sampler.mark_armed(st, pending)
            raise cls()


_sampler.deliver_hook = deliver_in_handler


def nudge(st: ThreadState) -> None:
    """Interrupt ``st``'s task now if a reason is pending and it is not
    masked (the checks happen where the interrupt is armed)."""
    if st.ctl.active <= 0 or not st.pending():
        return  # (a signal handler runs Python code, allocating, in the task)
    if st.is_main and _handler_installed and threading.get_ident() != st.ident and _ours():
        signal.pthread_kill(st.ident, INTERRUPT_SIGNAL)
    else:
        # Another thread, or the task's own (it set its own token, or this is
        # a signal handler): then the interrupt is raised at the next check,
        # inside Token.set() -- its traceback ends in library frames.
        _sampler.arm(st)


def _ours() -> bool:
    """Whether the delivery signal still runs our handler (a program may
    have set it to ``SIG_DFL``, which would kill the process)."""
    return _signals.unwrap(signal.getsignal(INTERRUPT_SIGNAL)) is _on_interrupt_signal


def _guard_collections() -> None:
    """Keep ``gc_first`` at the head of ``gc.callbacks`` and ``gc_last`` (twice)
    at its tail: a cyclic collection (its finalizers and callbacks) runs
    masked (native/masking.c, gc_guard_callbacks)."""
    _sampler.gc_guard()


def activate(st: ThreadState) -> None:
    """Called (masked) when ``st`` opens its outermost scope."""
    global _watchdog, _handler_installed
    _guard_collections()
    if st.is_main:
        current = signal.getsignal(INTERRUPT_SIGNAL)
        if not _handler_installed or current in (signal.SIG_DFL, signal.SIG_IGN, None):
            signal.signal(INTERRUPT_SIGNAL, _on_interrupt_signal)
            _handler_installed = True
    with _active_lock:
        _active.add(st)
        _sampler.set_tasks_open(len(_active))
        if _watchdog is None or not _watchdog.is_alive():
            _watchdog = threading.Thread(target=_watch, name="memprof_limits-watchdog", daemon=True)
            _watchdog.start()


def running_tasks() -> int:
    """Threads that have a task open (outermost scope not yet closed)."""
    with _active_lock:
        return sum(1 for st in _active if st.ctl.active > 0)


def deactivate(st: ThreadState) -> None:
    with _active_lock:
        _active.discard(st)
        _sampler.set_tasks_open(len(_active))


def _watch() -> None:
    """Re-deliver to tasks that keep a reason pending without allocating.

    A task that allocates gets its interrupt again from the sampler at every
    sample (deterministically, by byte count); re-delivering it from here too
    would make the bytes an interrupted task allocates depend on timing.  So
    a task is nudged only if, for a whole interval, it took no slow path and
    received no interrupt (one may still be unwinding).

    While its last scan found nothing pending, the watchdog sleeps in C
    (``_sampler.watch_sleep``) until a reason becomes pending somewhere, and
    then scans only if one still is (``_sampler.any_pending``, which makes
    no object): it runs no Python that allocates meanwhile, so it takes
    nothing from, and gives nothing back to, the free lists of CPython that
    the tasks use -- the same task allocates the same bytes however loaded
    the machine is.  While no task is open at all, it does not even wake:
    it blocks in C until one opens (``_sampler.set_tasks_open``).
    """
    progress: dict[int, tuple[int, int, bool]] = {}
    _sampler.watch_restart()  # (a watchdog that died left its sequence number behind)
    idle = True
    while True:
        _sampler.watch_sleep(_INTERVAL_NS, idle)
        if idle and not _sampler.any_pending():
            continue  # woken for a reason that is gone already (its task ended)
        try:
            idle = _scan(progress)
        except Exception:  # (a MemoryError): scan again at the next interval
            idle = False


def _scan(progress: dict[int, tuple[int, int, bool]]) -> bool:
    """One round of the watchdog; returns whether nothing was pending."""
    with _active_lock:
        states = list(_active)
    idle = True
    for st in states:
        ctl = st.ctl
        key = id(st)
        # A reason that became pending since the last tick was delivered
        # by whoever set it: wait a whole interval before repeating it.
        now = (int(ctl.slow_paths), int(ctl.arms), bool(st.pending()))
        last, progress[key] = progress.get(key), now
        if now[2]:
            idle = False
        if last != now or not now[2] or ctl.mask_depth != 0:
            continue
        try:
            nudge(st)
        except OSError:  # the thread is gone
            pass
    if idle:
        progress.clear()
    return idle


def _after_fork_in_child() -> None:
    """The parent's threads, watchdog included, do not exist in the child
    (and the lock may have been held by one of them; the C side forgets the
    open tasks in its at-fork handler)."""
    global _active_lock, _watchdog
    _active.clear()
    _active_lock = threading.RLock()
    _watchdog = None


_sampler.after_fork_hooks.append(_after_fork_in_child)
