"""Limit scopes and the ``limit_*`` functions.

The problem
-----------
A task runs under limits; when one is reached it must be interrupted, and
the caller must learn -- exactly -- whether *this* call's limit was the
cause, whatever the task did with the interrupt (caught it, returned, raised
something else).  Limits nest, and the library's own bookkeeping must never
be interrupted half-way, nor left half-done by a failure inside it.

What does not work, and why
---------------------------
- Deciding from the exception: an interrupt can be swallowed, replaced, or
  lost in a finalizer (OCaml memprof-limits' first rule: do not rely on the
  returned exception).
- ``try: task() finally: cleanup()`` in Python: an interrupt armed at the
  end of the task is delivered at ``cleanup``'s first instruction, before it
  can mask anything, and the scope's state leaks.
- Deciding a memory limit at samples only: a single big allocation
  (``b"x" * 2**30``, ``np.ones(10**8)``) is sampled before its pages are
  touched, when the resident memory has not grown yet, and nothing samples
  after it: the task returned ``Ok`` and the next, innocent task was blamed.
  Charging it right after the allocation is too late too: the C call that
  allocated it touches every page before the interrupt can land.
- A stack of scopes per *thread* for code that is suspended and resumed:
  the scopes of two asyncio tasks held across ``await`` (or of two
  generators held across ``yield``) interleave on one thread.  Closing
  "the ones above us" when an outer scope closes silently dropped the other
  task's limit (it then allocated hundreds of MB under a 1 MB limit) and
  ended in an internal ``ValueError``.  The per-thread C state (the byte
  count, the budget end, the tokens watched) cannot follow asyncio's task
  switches, so a sync scope cannot limit a task across ``await``.

The solution
------------
- Each scope decides from its own state when it closes: an allocation limit
  is reached iff the bytes counted since the scope opened exceed it (exact);
  a token limit iff the token is set; a memory limit iff the sampler flagged
  the global limit while the scope was the innermost watching it, or the
  process is over the limit when the scope closes (one RSS read, ~1 us, only
  for a memory scope while a global limit is set).  This is OCaml's
  ``result_of_token``.  A block of 1 MiB or more that the process cannot
  hold within the limit is refused by the engine before it is allocated:
  the allocating call raises ``MemoryError``, which a scope whose memory
  limit was reached treats as its interrupt (``_limit_error``).
- Opening and closing run masked, entered from C (``_sampler.bracket`` for
  the functions, ``_sampler.masked_methods`` for the context manager): there
  is no bytecode boundary between the task's end and the masked close, and
  an interrupt armed but not yet delivered is flushed at mask entry.
- Opening is all-or-nothing: everything that can refuse (a scope reused, a
  33rd token scope, a misnested scope) is checked before anything changes,
  and a failure while changing the state (a ``RecursionError``) restores it
  exactly.  Closing cannot stop half-way: on a failure the thread's C state
  is recomputed from the scopes still open (``_resync``).
- Nested allocation limits: the thread's budget end is the minimum of the
  open scopes' own ends, so an inner scope never outlives what remains of
  an outer one; when an inner scope closes, the pending reasons are
  recomputed from the scopes still open, so an interrupt that is not the
  inner scope's propagates to the scope that is the cause.
- Misnesting is an immediate, clear ``RuntimeError`` and never corrupts the
  bookkeeping: each scope records its owner (the running asyncio task, if
  any); opening a scope while a scope of *another* task is open on the
  thread (that task holds it across ``await``) raises, and so does closing
  a scope that is not the innermost (generators closed out of order) -- it
  then removes exactly itself, and the scopes still open keep their limits.
  Coroutines are limited correctly by ``limit_async`` (``_async.py``), which
  runs each step of the coroutine inside its own properly nested scope.
- In a child created by ``os.fork`` the forking thread has a fresh state
  (``_sampler._after_fork``); the parent's scopes stay on the old state,
  marked ``forked``, and close there as "not reached" without touching the
  child's C state.

Known failure cases
-------------------
- A ``with LimitScope(...)`` body whose last statement is a one-line loop
  can, through CPython bugs gh-108214 (3.11, 3.12) and gh-130279 (3.13),
  raise the interrupt outside the ``with``'s exception range: ``__exit__``
  is then skipped.  The function forms are not affected (the task is called
  from C).  See ``docs/recovering.md``.
- A sync scope held across ``await`` while the other tasks that run in the
  meantime open no scope is not detected: it is charged their bytes, and
  its interrupt can land in them.  Detection needs a scope operation of
  another task (or an out-of-order close).  Event loops other than asyncio
  (trio) are not recognised as tasks.
- A failure of the recovery itself (a second ``RecursionError`` while
  restoring the state) cannot be repaired; the C trampolines give the
  bookkeeping recursion headroom so that the first one does not happen.
"""

from __future__ import annotations

import ctypes
import gc
import sys
from collections.abc import Callable

from . import _delivery, _exceptions, _sampler
from ._exceptions import Interrupted, Reason
from ._result import Error, Ok
from ._sampler import NO_BUDGET, REASON_ALLOCATIONS, REASON_MEMORY, REASON_TOKEN, ffi, lib
from ._token import Token
from ._units import format_bytes, parse_bytes

TYPE_CHECKING = False  # (not typing's: the start-up path does not import typing)
if TYPE_CHECKING:
    from typing import Any, TypeVar

    T = TypeVar("T")

__all__ = [
    "LimitScope",
    "get_global_memory_limit",
    "limit_allocations",
    "limit_global_memory",
    "limit_with_token",
    "release_memory",
    "set_global_memory_limit",
]


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
        # The process's own symbols (CPython is linked with the C library); not
        # ctypes.util.find_library, which imports subprocess, shutil and tempfile.
        libc = ctypes.CDLL(None)
        libc.malloc_trim, libc.mallopt  # noqa: B018 - glibc only
        return libc
    except (OSError, AttributeError):
        return None


_libc = _find_libc()
_M_TRIM_THRESHOLD = -1  # glibc <malloc.h>


class LimitScope:
    """Run a ``with`` block under limits (trio cancel-scope style).

    The scope absorbs only its own interrupt: when one of *its* limits is
    reached, the :class:`Interrupted` it caused is suppressed at the end of
    the block and ``interrupted`` is true; an interrupt caused by an outer
    scope, and any other exception, propagates.  After the block,
    ``allocated_bytes`` holds the exact bytes the block allocated and
    ``reason`` what stopped it (``"memory"``, ``"allocations"``, ``"token"``
    or ``None``).

    Scopes nest like ``with`` blocks.  A scope cannot be held across
    ``await`` or ``yield``: opening a scope while another asyncio task holds
    one on the same thread, or closing scopes out of order (generators),
    raises :class:`RuntimeError` at once, and the scopes still open keep
    their limits.  Limit a coroutine with :func:`limit_async`.

    Args:
        memory: interrupt while the process exceeds the global memory limit
            (:func:`set_global_memory_limit`).  A single block of 1 MiB or
            more that the process cannot hold within the limit is refused
            before its pages are touched: the allocating call raises
            ``MemoryError``, which the scope treats as its interrupt.
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
        self._init(
            memory,
            None if allocations is None else parse_bytes(allocations, what="allocation limit"),
            token,
        )

    def _init(self, memory: bool, allocations: int | None, token: Token | None) -> None:
        if getattr(self, "_state", None) is not None and not getattr(self, "_closed", False):
            # Its marks are linked from the thread's control block until it closes.
            raise RuntimeError("a LimitScope cannot be initialized again while it is open")
        self.memory = memory
        self.allocations = allocations
        self.token = token
        self.interrupted = False
        self.reason: Reason | None = None
        self.allocated_bytes: int | None = None
        self.exception: BaseException | None = None
        # The task's boundaries (counts of the thread): start, own budget end
        # (absolute), task end.  Filled in C where the task starts and ends
        # (see _ml_enter), so that the scope's bookkeeping is not charged.
        self._marks = ffi.new("ml_marks_t *")
        self._marks.end = NO_BUDGET
        self._state: _sampler.ThreadState | None = None
        self._owner: Any = None  # the asyncio task that opened it, if any
        self._watching = False  # its token is registered with the thread
        self._closed = False
        self._misnested: str | None = None  # why closing it must raise
        self._rss: int | None = None  # resident memory read at exit, if over
        # (limit, bytes before) of the logical limit this scope is a part of
        # (limit_async's step scopes), for the messages.
        self._shown: tuple[int | None, int] | None = None

    @property
    def _start(self) -> int:
        return int(self._marks.start)

    @property
    def _end(self) -> int:
        return int(self._marks.end)

    @classmethod
    def _make(cls, memory: bool, allocations: int | None, token: Token | None) -> LimitScope:
        """A scope from checked arguments (``limit_async`` makes one per step)."""
        scope = cls.__new__(cls)
        scope._init(memory, allocations, token)
        return scope

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

    def _ml_enter(self, exact: bool = True) -> LimitScope:
        """Open the scope (masked).  ``exact``: called by the C code that runs
        the task (the with trampoline, ``bracket``), which then counts from
        the task's first byte (``ctl.entering``); else counted from here."""
        # 1. Everything that can refuse, before anything changes.
        if self._state is not None:
            raise RuntimeError(
                "a LimitScope can be entered only once; create a new LimitScope for each block"
            )
        _sampler.ensure_started()
        st = _sampler.thread_state()
        owner = _current_task()
        scopes = st.scopes
        if scopes:
            _check_owner(scopes, owner, self)
        ctl = st.ctl
        token = self.token
        if token is not None and ctl.n_tokens >= _MAX_TOKENS:
            raise RuntimeError(
                f"more than {_MAX_TOKENS} token scopes open at once in one thread; "
                "combine tokens (a Token can be set by several parties) or nest fewer scopes"
            )
        if ctl.active == 0:
            # Nothing pending survives a task, nor the hold of the last
            # interrupt.  All idempotent: no undo if what follows fails.
            st.clear_pending(_ALL_REASONS)
            ctl.armed_class = ctl.hold_class = ffi.NULL
            ctl.hold_until = ctl.grace_until = ctl.handler_rounds = 0
            _delivery.activate(st)
        # 2. Change the state; on any failure, restore it exactly.
        n_scopes = len(scopes)
        active = ctl.active
        watch_global = ctl.watch_global
        n_tokens = ctl.n_tokens
        outer_end = _budget_end(scopes)
        watchers: dict[int, Any] = token._watchers if token is not None else {}
        key = id(st)
        had_watcher = key in watchers
        old_watcher = watchers[key] if had_watcher else None
        try:
            self._state = st
            self._owner = owner
            scopes.append(self)
            ctl.active = active + 1
            # Now that the thread counts as running a task, a stop() from
            # another thread either ran entirely before this (the engine is
            # started again) or refuses: both under the life-cycle lock.
            _sampler.ensure_started_for_task()
            if self.memory:
                ctl.watch_global = watch_global + 1
            if token is not None:
                token._watch(st)
                self._watching = True
            # Count from here (the bookkeeping above allocates a varying
            # amount: it wakes the watchdog); with ``exact``, the C caller
            # counts again from the task's first byte, right after we return.
            marks = self._marks
            marks.start = marks.task_end = now = _sampler.allocated_bytes()
            if self.allocations is not None:
                marks.limit = self.allocations
                marks.outer_end = outer_end
                marks.end = min(now + self.allocations, NO_BUDGET)
                _sampler.set_budget_end(min(self._end, outer_end))
            else:
                marks.limit = -1
            if exact:
                ctl.entering = marks  # the last step: nothing can fail after it
        except BaseException:
            # Plain assignments and deletions first (no call that could fail
            # again near the recursion limit), then the calls.
            self._state = None
            self._owner = None
            self._watching = False
            del scopes[n_scopes:]
            ctl.active = active
            ctl.watch_global = watch_global
            ctl.n_tokens = n_tokens
            if had_watcher:
                watchers[key] = old_watcher
            elif key in watchers:
                del watchers[key]
            _sampler.set_budget_end(outer_end)
            if active == 0:
                st.clear_pending(_ALL_REASONS)
                _delivery.deactivate(st)
            raise
        return self

    def _ml_exit(self, et: Any, ev: BaseException | None, tb: Any) -> bool:
        st = self._state
        if st is None or self._closed:
            raise RuntimeError(
                "LimitScope.__exit__ without a matching __enter__ (or called twice); "
                "use a LimitScope in a with statement"
            )
        forked = st.forked
        problem: str | None = None
        reason: Reason | None = None
        now: int | None = None
        try:
            task_end = _pop_marks(st.ctl, self._marks) if not forked else None
            now = _sampler.allocated_bytes()
            self.allocated_bytes = (now if task_end is None else task_end) - self._start
            if not forked:
                problem = self._misnested
                if problem is None and (not st.scopes or st.scopes[-1] is not self):
                    problem = _out_of_order(self, st.scopes)
                reason = self._reached(st, now if task_end is None else task_end)
        finally:
            self._close(st, now, forked)
        self.reason = reason
        self.interrupted = reason is not None
        if reason is not None:
            self.exception = ev
        if problem is not None:
            error = RuntimeError(problem)
            error.__context__ = ev
            raise error
        # Its own interrupt is the scope's to stop; so is a MemoryError once the memory
        # limit is reached: a big block refused for it (native/sampler.c, refuse_big_block).
        return reason is not None and (
            isinstance(ev, Interrupted) or (reason == "memory" and isinstance(ev, MemoryError))
        )

    # -- helpers (masked) --------------------------------------------------

    def _reached(self, st: _sampler.ThreadState, now: int) -> Reason | None:
        if self.memory:
            if st.pending() & REASON_MEMORY:
                st.clear_pending(REASON_MEMORY)
                return "memory"
            # A big allocation is sampled before its pages are touched: the
            # process can be over the limit now with nothing flagged.
            limit = _global_limit
            if limit is not None:
                rss = _sampler.rss_bytes()
                if rss > limit:
                    self._rss = rss
                    return "memory"
        if self.allocations is not None and now - self._start > self.allocations:
            return "allocations"
        if self.token is not None and self.token.is_set():
            return "token"
        return None

    def _close(self, st: _sampler.ThreadState, now: int | None, forked: bool) -> None:
        """Leave the thread's scopes; never stops half-way (see ``_resync``)."""
        self._closed = True
        try:
            scopes = st.scopes
            if scopes and scopes[-1] is self:
                del scopes[-1]
            else:
                _remove(scopes, self)
            if self._watching:
                self._watching = False
                assert self.token is not None
                self.token._unwatch(st)
            if forked:
                # The parent's scope, in a forked child: the state it leaves is
                # not this thread's any more (_sampler._after_fork).
                return
            ctl = st.ctl
            ctl.active = len(scopes)
            if self.memory:
                ctl.watch_global -= 1
            _sampler.set_budget_end(_budget_end(scopes))
            _sync_pending(st, scopes, now)
        except BaseException:
            _resync(st, self, now, forked)
            raise

    def _interrupt(self) -> Interrupted:
        """The library's interrupt for this scope's reason (task returned)."""
        cls = _exceptions.BY_REASON[self.reason or "token"]
        if self._rss is not None:  # found over the limit at the end: no "afterwards"
            return cls(_describe_scope(self))
        return cls(_describe_scope(self) + " (the task returned normally afterwards)")


_ALL_REASONS = REASON_MEMORY | REASON_ALLOCATIONS | REASON_TOKEN
_MAX_TOKENS = int(lib.ML_MAX_TOKENS)


def _pop_marks(ctl: Any, marks: Any) -> int | None:
    """Take ``marks`` off the thread's chain of open marks.  The count when
    the task ended if it was entered and left through the C code that marks
    both (it is then the innermost); else ``None`` (count from now)."""
    if ctl.entering == marks:  # entered, never started by C (a direct call)
        ctl.entering = ffi.NULL
    if ctl.top == marks:
        ctl.top = marks.prev
        return int(marks.task_end)
    node = ctl.top  # out of order (misnested): unlink it, count from now
    while node != ffi.NULL:
        if node.prev == marks:
            node.prev = marks.prev
            break
        node = node.prev
    return None


def _budget_end(scopes: list[LimitScope]) -> int:
    return min((s._end for s in scopes if s.allocations is not None), default=NO_BUDGET)


def _remove(scopes: list[LimitScope], scope: LimitScope) -> None:
    """Remove ``scope`` (by identity) if it is there."""
    for i, s in enumerate(scopes):
        if s is scope:
            del scopes[i]
            return


def _sync_pending(st: _sampler.ThreadState, scopes: list[LimitScope], now: int | None) -> None:
    """After a scope closed: what is still pending is what the scopes still
    open have reached; nothing is pending once none is open."""
    if not scopes:
        st.clear_pending(_ALL_REASONS)
        _delivery.deactivate(st)
        return
    if now is None:  # (reading it failed in _ml_exit)
        now = _sampler.allocated_bytes()
    if any(s.allocations is not None and now - s._start > s.allocations for s in scopes):
        st.add_pending(REASON_ALLOCATIONS)
    else:
        st.clear_pending(REASON_ALLOCATIONS)
    if not any(s.memory for s in scopes):
        st.clear_pending(REASON_MEMORY)


def _resync(st: _sampler.ThreadState, scope: LimitScope, now: int | None, forked: bool) -> None:
    """Make the thread's state exactly what its open scopes say, after a
    failure in the middle of closing ``scope`` (idempotent)."""
    scopes = st.scopes
    _remove(scopes, scope)
    ctl = st.ctl
    if not forked:
        _pop_marks(ctl, scope._marks)  # (if _ml_exit failed before it did)
    token = scope.token
    if token is not None:
        # Whether the failure came before, inside or after Token._unwatch:
        # the flags watched are exactly those of the open scopes (in order,
        # as ThreadState.watch_token lays them out), and the token's count
        # of scopes watching it on this thread is recounted.
        scope._watching = False
        flags = [s.token._flag for s in scopes if s.token is not None]
        for i, flag in enumerate(flags):
            ctl.token_flags[i] = flag
        ctl.n_tokens = len(flags)
        count = sum(1 for s in scopes if s.token is token)
        key = id(st)
        if count:
            token._watchers[key] = (st, count)
        elif key in token._watchers:
            del token._watchers[key]
    if forked:
        return
    ctl.active = len(scopes)
    ctl.watch_global = sum(1 for s in scopes if s.memory)
    _sampler.set_budget_end(_budget_end(scopes))
    _sync_pending(st, scopes, now)


def _current_task() -> Any:
    """The running asyncio task of this thread, or ``None`` (cheap: asyncio's
    C accessors, and nothing at all while asyncio is not imported)."""
    aio = sys.modules.get("asyncio")
    if aio is None:
        return None
    loop = aio._get_running_loop()
    return None if loop is None else aio.current_task(loop)


def _running(task: Any) -> bool:
    """Whether ``task``'s coroutine is executing (not suspended)."""
    get_coro = getattr(task, "get_coro", None)
    coro = get_coro() if callable(get_coro) else None
    return bool(getattr(coro, "cr_running", False) or getattr(coro, "gi_running", False))


def _task_name(task: Any) -> str:
    get_name = getattr(task, "get_name", None)
    return repr(get_name()) if callable(get_name) else repr(task)


_ADVICE = (
    "A LimitScope cannot be held across `await` or `yield`: the thread's byte count, "
    "budget and tokens cannot follow a suspended task.  Limit a coroutine with "
    "`await memprof_limits.limit_async(coro, ...)`, and close generators that hold a "
    "LimitScope in the reverse order of opening (or do not yield inside one)."
)


def _check_owner(scopes: list[LimitScope], owner: Any, scope: LimitScope) -> None:
    """Refuse to open ``scope`` while another asyncio task holds a scope on
    this thread (at most one task does: every opening checks)."""
    for s in reversed(scopes):
        holder = s._owner
        if holder is not None:
            if holder is owner or _running(holder):
                # Its own task, or one whose coroutine is running further up
                # the stack (an eager task's first step started from it): the
                # scopes nest properly.
                return
            where = "outside any asyncio task" if owner is None else f"in task {_task_name(owner)}"
            s._misnested = (
                f"{s!r} of asyncio task {_task_name(holder)} was held across an `await`: a "
                f"LimitScope was opened {where} while it was open, so it was charged the work "
                f"of other tasks. {_ADVICE}"
            )
            raise RuntimeError(
                f"cannot open {scope!r} {where}: {s!r} of asyncio task {_task_name(holder)} "
                f"is still open on this thread (that task holds it across an `await`). "
                f"{_ADVICE}"
            )


def _out_of_order(scope: LimitScope, scopes: list[LimitScope]) -> str:
    above = []
    for s in reversed(scopes):
        if s is scope:
            break
        above.append(s)
    return (
        f"{scope!r} closed out of order: {', '.join(map(repr, above))} opened after it "
        f"{'is' if len(above) == 1 else 'are'} still open (a generator or a coroutine "
        f"suspended inside a LimitScope?).  This scope was removed and the others keep "
        f"their limits. {_ADVICE}"
    )


def _run(scope: LimitScope, task: Callable[[], T]) -> Ok[T] | Error:
    if not callable(task):
        raise TypeError(f"task: expected a zero-argument callable, got {task!r}")

    def release(_r: object, value: Any, exc: BaseException | None) -> Ok[T] | Error:
        scope._ml_exit(type(exc) if exc is not None else None, exc, None)
        if scope.interrupted:
            if scope.reason == "memory" and scope._state is not None:
                # The task's value (dropped with this Error) is still alive while
                # the scope closes: a sample of that bookkeeping may flag the
                # limit again.  That is this task's, not an outer scope's.
                scope._state.clear_pending(REASON_MEMORY)
                scope._state.ctl.memory_quiet = 1  # until bracket drops the value
            return Error(_limit_error(scope, exc) if exc is not None else scope._interrupt())
        if exc is not None:
            raise exc
        return Ok(value)

    return _sampler.bracket(scope._ml_enter, lambda _scope: task(), release)  # type: ignore[no-any-return]


def _limit_error(scope: LimitScope, exc: BaseException) -> BaseException:
    """What a task that reached ``scope``'s limit raised, as its ``Error``: a
    ``MemoryError`` is the memory limit's -- a big block refused because the
    process could not hold it within the limit (native/sampler.c,
    refuse_big_block) -- and becomes the library's interrupt (chained)."""
    if scope.reason != "memory" or not isinstance(exc, MemoryError):
        return exc
    interrupt = _exceptions.MemoryLimitExceeded(_describe("memory"))
    interrupt.__context__ = exc
    return interrupt


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
    if limit is None:
        # None means "no limit" only where it is a keyword's default (LimitScope,
        # limit_async, CellLimits, set_global_memory_limit); here it is a mistake.
        raise TypeError(
            "limit: expected a number of bytes (an int, or a string such as '50 MB'), got None; "
            "to count without a limit, use ml.LimitScope() and its allocated_bytes"
        )
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
        if scope._rss is not None:
            return (
                f"global memory limit of {format_bytes(_global_limit or 0)} exceeded "
                f"(resident memory {format_bytes(scope._rss)} when the task ended)"
            )
        return _describe("memory")
    if scope.reason == "allocations":
        return _describe_allocations(scope, scope.allocated_bytes or 0)
    return "cancelled: the token was set"


def _describe_allocations(scope: LimitScope, allocated: int) -> str:
    limit = scope.allocations
    if scope._shown is not None:
        limit, before = scope._shown
        allocated += before
    return f"allocation limit of {limit} bytes reached ({allocated} bytes allocated)"


def _describe(reason: str) -> str:
    """Message of an interrupt raised asynchronously in the current thread."""
    st: _sampler.ThreadState | None = getattr(_sampler._local, "state", None)
    scopes = list(st.scopes) if st is not None else []
    if reason == "allocations":
        now = _sampler.allocated_bytes()
        for s in reversed(scopes):
            if s.allocations is not None and now - s._start > s.allocations:
                return _describe_allocations(s, now - s._start)
        return "allocation limit reached"
    if reason == "memory":
        # The figure read when the limit was found exceeded: by the time the
        # exception is created (late on 3.11) the task's memory may be gone.
        block = _sampler.over_limit_block_bytes()
        with_block = f" with a block of {format_bytes(block)} requested" if block else ""
        return (
            f"global memory limit of {format_bytes(_global_limit or 0)} exceeded "
            f"(resident memory {format_bytes(_sampler.over_limit_rss_bytes())}{with_block})"
        )
    return "cancelled: the token was set"
