"""Limit scopes and the ``limit_*`` functions.

The problem
-----------
A task runs under limits; when one is reached it must be interrupted, and
the caller must learn -- exactly -- whether *this* call's limit was the
cause, whatever the task did with the interrupt (caught it, returned, raised
something else).  Limits nest, and the library's own bookkeeping must never
be interrupted half-way.

What does not work, and why
---------------------------
- Deciding from the exception: an interrupt can be swallowed, replaced, or
  lost in a finalizer (OCaml memprof-limits' first rule: do not rely on the
  returned exception).
- ``try: task() finally: cleanup()`` in Python: an interrupt armed at the
  end of the task is delivered at ``cleanup``'s first instruction, before it
  can mask anything, and the scope's state leaks.

The solution
------------
- Each scope decides from its own state when it closes: an allocation limit
  is reached iff the bytes counted since the scope opened exceed it (exact);
  a token limit iff the token is set; a memory limit iff the sampler flagged
  the global limit while the scope was the innermost watching it.  This is
  OCaml's ``result_of_token``.
- Opening and closing run masked, entered from C (``_sampler.bracket`` for
  the functions, ``_sampler.masked_methods`` for the context manager): there
  is no bytecode boundary between the task's end and the masked close, and
  an interrupt armed but not yet delivered is flushed at mask entry.
- Nested allocation limits: the thread's budget end is the minimum over the
  open scopes, so an inner scope never outlives what remains of an outer
  one; when an inner scope closes, the pending reasons are recomputed from
  the scopes still open, so an interrupt that is not the inner scope's
  propagates to the scope that is the cause.

Known failure cases
-------------------
- A ``with LimitScope(...)`` body whose last statement is a one-line loop
  can, through CPython bugs gh-108214 (3.11, 3.12) and gh-130279 (3.13),
  raise the interrupt outside the ``with``'s exception range: ``__exit__``
  is then skipped.  The function forms are not affected (the task is called
  from C).  See ``docs/recovering.md``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from collections.abc import Callable
from typing import Any, TypeVar

from . import _delivery, _exceptions, _sampler
from ._exceptions import Interrupted, Reason
from ._result import Error, Ok
from ._sampler import NO_BUDGET, REASON_ALLOCATIONS, REASON_MEMORY, REASON_TOKEN
from ._token import Token
from ._units import format_bytes, parse_bytes

__all__ = [
    "LimitScope",
    "get_global_memory_limit",
    "is_interrupted",
    "limit_allocations",
    "limit_global_memory",
    "limit_with_token",
    "release_memory",
    "set_global_memory_limit",
]

T = TypeVar("T")

_global_limit: int | None = None
_ENTER, _EXIT = _sampler.masked_methods()


def set_global_memory_limit(limit: int | str | None) -> None:
    """Set the process-wide memory limit (resident memory, in bytes).

    Tasks run under :func:`limit_global_memory` (or a scope with
    ``memory=True``) are interrupted while the process's resident memory
    exceeds it, checked at the sampler's samples (about every 80 kB a task
    allocates).  ``None`` removes the limit.

    >>> import memprof_limits as ml
    >>> ml.set_global_memory_limit("4 GiB"); ml.get_global_memory_limit()
    4294967296
    >>> ml.set_global_memory_limit(None)
    """
    global _global_limit
    value = None if limit is None else parse_bytes(limit, what="global memory limit")
    _global_limit = value
    _sampler.set_global_limit(value)


def get_global_memory_limit() -> int | None:
    """The global memory limit in bytes, or ``None``.

    >>> import memprof_limits as ml
    >>> ml.get_global_memory_limit() is None
    True"""
    return _global_limit


def release_memory() -> int:
    """Run a full garbage collection and give free heap memory back to the
    system (``malloc_trim``).  Returns the bytes by which the resident memory
    went down (0 if it did not).

    >>> import memprof_limits as ml
    >>> ml.release_memory() >= 0
    True"""
    before = _sampler.rss_bytes()
    gc.collect()
    if _libc is not None:
        # glibc raises its trim threshold dynamically after a large free; memory
        # freed by worker threads then stays in their arenas, out of
        # malloc_trim's reach.  A fixed threshold turns that off.
        _libc.mallopt(_M_TRIM_THRESHOLD, 128 * 1024)
        _libc.malloc_trim(0)
    return max(0, before - _sampler.rss_bytes())


def _find_libc() -> Any:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim, libc.mallopt  # noqa: B018 - glibc only
        return libc
    except (OSError, AttributeError):
        return None


_libc = _find_libc()
_M_TRIM_THRESHOLD = -1  # glibc <malloc.h>


def is_interrupted() -> bool:
    """Whether the current thread's task is being interrupted.

    True from the moment one of the limits of a task running on this thread
    is reached (the interrupt is raised, or deferred by masking) until that
    task ends.  Use it in a ``release`` function to poison or roll back, and
    in ``except`` clauses to avoid swallowing an interrupt.

    >>> import memprof_limits as ml
    >>> ml.is_interrupted()
    False
    """
    st: _sampler.ThreadState | None = getattr(_sampler._local, "state", None)
    return bool(st is not None and st.ctl.active > 0 and st.pending())


class LimitScope:
    """Run a ``with`` block under limits (trio cancel-scope style).

    The scope absorbs only its own interrupt: when one of *its* limits is
    reached, the :class:`Interrupted` it caused is suppressed at the end of
    the block and ``interrupted`` is true; an interrupt caused by an outer
    scope, and any other exception, propagates.  After the block,
    ``allocated_bytes`` holds the exact bytes the block allocated and
    ``reason`` what stopped it (``"memory"``, ``"allocations"``, ``"token"``
    or ``None``).

    Args:
        memory: interrupt while the process exceeds the global memory limit
            (:func:`set_global_memory_limit`).
        allocations: allocation budget in bytes (int or ``"500 MB"``).
        token: a :class:`Token` whose ``set()`` interrupts the block.

    >>> import memprof_limits as ml
    >>> with ml.LimitScope(allocations="1 MB") as scope:
    ...     data = [str(i) for i in range(10**6)]
    >>> scope.interrupted, scope.reason
    (True, 'allocations')
    """

    __enter__ = _ENTER
    __exit__ = _EXIT

    def __init__(
        self,
        *,
        memory: bool = False,
        allocations: int | str | None = None,
        token: Token | None = None,
    ) -> None:
        if not isinstance(memory, bool):
            raise TypeError(f"memory: expected True or False, got {memory!r}")
        if token is not None and not isinstance(token, Token):
            raise TypeError(f"token: expected a memprof_limits.Token, got {token!r}")
        self.memory = memory
        self.allocations = (
            None if allocations is None else parse_bytes(allocations, what="allocation limit")
        )
        self.token = token
        self.interrupted = False
        self.reason: Reason | None = None
        self.allocated_bytes: int | None = None
        self.exception: BaseException | None = None
        self._start = 0
        self._end = NO_BUDGET
        self._state: _sampler.ThreadState | None = None

    def __repr__(self) -> str:
        limits = []
        if self.memory:
            limits.append("memory")
        if self.allocations is not None:
            limits.append(f"allocations={self.allocations}")
        if self.token is not None:
            limits.append(f"token={self.token!r}")
        return f"<LimitScope {' '.join(limits) or 'unlimited'} interrupted={self.interrupted}>"

    # -- masked ------------------------------------------------------------

    def _ml_enter(self) -> LimitScope:
        if self._state is not None:
            raise RuntimeError(
                "a LimitScope can be entered only once; create a new LimitScope for each block"
            )
        _sampler.ensure_started()
        st = self._state = _sampler.thread_state()
        ctl = st.ctl
        if ctl.active == 0:  # nothing pending survives a task
            st.clear_pending(REASON_MEMORY | REASON_ALLOCATIONS | REASON_TOKEN)
        st.scopes.append(self)
        ctl.active += 1
        if ctl.active == 1:
            _delivery.activate(st)
        if self.memory:
            ctl.watch_global += 1
        if self.token is not None:
            self.token._watch(st)
        # Count from here: the bookkeeping above allocates a varying amount
        # (it wakes the watchdog), which must not make counts irreproducible.
        self._start = now = _sampler.allocated_bytes()
        if self.allocations is not None:
            self._end = min(now + self.allocations, _budget_end(st.scopes[:-1]))
            _sampler.set_budget_end(self._end)
        return self

    def _ml_exit(self, et: Any, ev: BaseException | None, tb: Any) -> bool:
        now = _sampler.allocated_bytes()
        st = self._state
        assert st is not None
        self.allocated_bytes = now - self._start
        if not st.scopes or st.scopes[-1] is not self:
            # A generator or a coroutine closed scopes out of order; close
            # the ones above us too rather than corrupting the thread state.
            while st.scopes and st.scopes[-1] is not self:
                st.scopes[-1]._close(st, now)
        self.reason = self._reached(st, now)
        self._close(st, now)
        if self.reason is None:
            return False
        self.interrupted = True
        self.exception = ev
        return isinstance(ev, Interrupted)

    # -- helpers (masked) --------------------------------------------------

    def _reached(self, st: _sampler.ThreadState, now: int) -> Reason | None:
        pending = st.pending()
        if self.memory and pending & REASON_MEMORY:
            st.clear_pending(REASON_MEMORY)
            return "memory"
        if self.allocations is not None and now - self._start > self.allocations:
            return "allocations"
        if self.token is not None and self.token.is_set():
            return "token"
        return None

    def _close(self, st: _sampler.ThreadState, now: int) -> None:
        ctl = st.ctl
        st.scopes.remove(self)
        if self.memory:
            ctl.watch_global -= 1
        if self.token is not None:
            self.token._unwatch(st)
        _sampler.set_budget_end(_budget_end(st.scopes))
        ctl.active -= 1
        if ctl.active == 0:
            st.clear_pending(REASON_MEMORY | REASON_ALLOCATIONS | REASON_TOKEN)
            _delivery.deactivate(st)
            return
        # What is still pending is what the scopes still open have reached.
        if not any(s.allocations is not None and now - s._start > s.allocations for s in st.scopes):
            st.clear_pending(REASON_ALLOCATIONS)
        else:
            st.add_pending(REASON_ALLOCATIONS)
        if not any(s.memory for s in st.scopes):
            st.clear_pending(REASON_MEMORY)

    def _interrupt(self) -> Interrupted:
        """The library's interrupt for this scope's reason (task returned)."""
        cls = {
            "memory": _exceptions.MemoryLimitExceeded,
            "allocations": _exceptions.AllocationLimitExceeded,
            "token": _exceptions.Cancelled,
        }[self.reason or "token"]
        return cls(_describe_scope(self) + " (the task returned normally afterwards)")


def _budget_end(scopes: list[LimitScope]) -> int:
    return min((s._end for s in scopes if s.allocations is not None), default=NO_BUDGET)


def _run(scope: LimitScope, task: Callable[[], T]) -> Ok[T] | Error:
    if not callable(task):
        raise TypeError(f"task: expected a zero-argument callable, got {task!r}")

    def release(_r: object, value: Any, exc: BaseException | None) -> Ok[T] | Error:
        scope._ml_exit(type(exc) if exc is not None else None, exc, None)
        if scope.interrupted:
            return Error(exc if exc is not None else scope._interrupt())
        if exc is not None:
            raise exc
        return Ok(value)

    return _sampler.bracket(scope._ml_enter, lambda _scope: task(), release)  # type: ignore[no-any-return]


def limit_global_memory(task: Callable[[], T]) -> Ok[T] | Error:
    """Run ``task()`` under the global memory limit.

    Returns ``Ok(value)``, or ``Error(exc)`` if and only if the process's
    memory exceeded the limit set with :func:`set_global_memory_limit` while
    the task ran (checked at samples, so within a few hundred kB of
    allocation by the task with overwhelming probability, see
    ``docs/statistical.md``).  Other exceptions propagate unchanged.

    >>> import memprof_limits as ml
    >>> ml.limit_global_memory(lambda: 42)
    Ok(value=42)
    """
    return _run(LimitScope(memory=True), task)


def limit_allocations(task: Callable[[], T], *, limit: int | str) -> Ok[tuple[T, int]] | Error:
    """Run ``task()`` with an allocation budget of ``limit`` bytes.

    Counts every byte the task's thread requests through CPython's
    allocators (exact and deterministic: a measure of work, not of memory
    use).  Returns ``Ok((value, allocated_bytes))``, or ``Error(exc)`` if and
    only if the task allocated more than ``limit`` bytes.  Nested limits
    compose: an inner limit never exceeds what remains of an outer one.

    >>> import memprof_limits as ml
    >>> ml.limit_allocations(lambda: [0] * 10**6, limit="1 MB")
    Error(exc=AllocationLimitExceeded('allocation limit of 1000000 bytes reached...'))
    """
    scope = LimitScope(allocations=limit)
    result = _run(scope, task)
    if isinstance(result, Ok):
        return Ok((result.value, scope.allocated_bytes or 0))
    return result


def limit_with_token(task: Callable[[], T], *, token: Token) -> Ok[T] | Error:
    """Run ``task()`` until ``token`` is set.

    Returns ``Ok(value)``, or ``Error(exc)`` if and only if the token was set
    before the task finished (a token already set gives ``Error`` without
    running the task).

    >>> import memprof_limits as ml
    >>> ml.limit_with_token(lambda: 42, token=ml.Token())
    Ok(value=42)
    """
    if not isinstance(token, Token):
        raise TypeError(f"token: expected a memprof_limits.Token, got {token!r}")
    if token.is_set():
        return Error(_exceptions.Cancelled("cancelled: the token was set before the task started"))
    return _run(LimitScope(token=token), task)


def _describe_scope(scope: LimitScope) -> str:
    if scope.reason == "memory":
        return _describe("memory")
    if scope.reason == "allocations":
        return (
            f"allocation limit of {scope.allocations} bytes reached "
            f"({scope.allocated_bytes} bytes allocated)"
        )
    return "cancelled: the token was set"


def _describe(reason: str) -> str:
    """Message of an interrupt raised asynchronously in the current thread."""
    st: _sampler.ThreadState | None = getattr(_sampler._local, "state", None)
    scopes = list(st.scopes) if st is not None else []
    if reason == "allocations":
        now = _sampler.allocated_bytes()
        for s in reversed(scopes):
            if s.allocations is not None and now - s._start > s.allocations:
                return (
                    f"allocation limit of {s.allocations} bytes reached "
                    f"({now - s._start} bytes allocated)"
                )
        return "allocation limit reached"
    if reason == "memory":
        # The figure read when the limit was found exceeded: by the time the
        # exception is created (late on 3.11) the task's memory may be gone.
        return (
            f"global memory limit of {format_bytes(_global_limit or 0)} exceeded "
            f"(resident memory {format_bytes(_sampler.over_limit_rss_bytes())})"
        )
    return "cancelled: the token was set"


_sampler.init_native(_describe)
