"""Limits for coroutines: ``await limit_async(coro, ...)``.

The problem
-----------
An asyncio task runs in slices (*steps*) between its ``await`` points, and
the steps of many tasks interleave on one thread.  Its limits must apply to
its own steps only: its allocation budget counts the bytes of its steps and
nothing else, a token set while it is suspended (``await
asyncio.sleep(60)``) must interrupt it promptly, and the other tasks of the
loop must not be charged nor interrupted.

What does not work, and why
---------------------------
- ``with LimitScope(...)`` across ``await``: the thread's C state (byte
  count, budget end, tokens watched, global-memory flag) is per thread, not
  per task, and CPython 3.11-3.13 offer no hook at asyncio's task switches
  to swap it.  The scope would be charged every task's bytes and its
  interrupt would land in whatever task runs; ``LimitScope`` refuses it
  (``RuntimeError``) when it can tell.
- ``async with``: its body is part of the enclosing coroutine, which the
  asyncio ``Task`` drives; a context manager cannot get between the Task
  and the steps of its own body.
- Waiting for the token inside the task: a suspended coroutine runs no code
  until what it awaits completes.

The solution
------------
``limit_async`` drives the coroutine itself, one step at a time, from a
wrapper that the caller's task awaits:

- each step (``coro.send``/``coro.throw``/``coro.close``) runs inside a
  fresh, properly nested ``LimitScope`` entered through the C bracket (the
  step is called from C, no bytecode between the masked opening and the
  coroutine), with the allocation budget that remains; the step's exact
  bytes are added to the limit's total, so the limit is reached iff the
  coroutine's own steps allocated more than it (exact, like the sync form);
- what the coroutine awaits is yielded outward unchanged, so the caller's
  task waits for it exactly as if it awaited the coroutine directly
  (cancellation, ``TaskGroup``, timeouts behave as usual);
- with a token, the wrapper waits on a future of its own that completes
  when the awaited future does or when the token is set (checked every
  ``_POLL_S``: ``Token`` has no callback hook yet); then what the coroutine
  awaits is cancelled, as ``Task.cancel`` would, and the interrupt is
  thrown in at its ``await``;
- interrupts are sticky: once the limit is reached, every later ``await``
  of the coroutine gets the interrupt again (after one turn of the loop, so
  that a coroutine that keeps swallowing it does not starve the others);
- nesting composes: an inner ``limit_async`` runs its steps inside the
  outer one's step, so its scopes nest inside the outer step scope (the
  inner budget is capped by what remains of the outer one, and the inner
  bytes are charged to it).

Known failure cases
-------------------
- What the coroutine awaits must honour cancellation for a token to
  interrupt it promptly: a future that ignores ``cancel()`` (a task that
  swallows ``CancelledError``) is waited for, as by ``Task.cancel``.
- ``asyncio.CancelledError`` always propagates, even after the limit was
  reached: it is the caller's cancellation, which ``TaskGroup`` and
  timeouts rely on.
- Work the coroutine hands to other tasks (``create_task``, ``gather`` of
  new tasks, ``run_in_executor``) runs outside its steps and is not
  limited; wrap those coroutines in ``limit_async`` too.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Coroutine, Generator
from typing import TYPE_CHECKING, Any, TypeVar

from . import _exceptions, _sampler
from ._delivery import REDELIVERY_INTERVAL_S
from ._exceptions import Interrupted
from ._result import Error, Ok
from ._scope import LimitScope, _describe_scope, _limit_error
from ._token import Token
from ._units import parse_bytes

if TYPE_CHECKING:
    import asyncio

# asyncio is imported where it is used (importing it takes ~40 ms): a program
# that calls limit_async has imported it already.

__all__ = ["limit_async"]

T = TypeVar("T")

_POLL_S = REDELIVERY_INTERVAL_S  # how often a suspended coroutine's token is checked

_SEND, _THROW, _CLOSE = 0, 1, 2
_YIELDED, _RETURNED, _RAISED = 0, 1, 2


def limit_async(
    task: Coroutine[Any, Any, T] | Callable[[], Coroutine[Any, Any, T]],
    *,
    memory: bool = False,
    allocations: int | str | None = None,
    token: Token | None = None,
) -> Coroutine[Any, Any, Ok[T] | Error]:
    """Run a coroutine under limits; ``await`` it for ``Ok(value)`` or ``Error(exc)``.

    The asyncio counterpart of :func:`limit_allocations`,
    :func:`limit_global_memory` and :func:`limit_with_token` (any
    combination).  Only the coroutine's own steps count: the bytes allocated
    between its ``await`` points (exactly), the global memory limit checked
    while it runs, and the token, which interrupts it promptly even while it
    is suspended (what it awaits is cancelled and the interrupt raised at
    its ``await``).  Other tasks of the loop are neither charged nor
    interrupted.  ``Error`` iff this call's limit was reached (``exc`` is
    the exception that escaped, or the library's interrupt if the coroutine
    returned); other exceptions, and ``asyncio.CancelledError`` always,
    propagate.  Nested calls compose like the sync forms.

    Args:
        task: a coroutine, or a function returning one (``async def``).
        memory: interrupt while the process exceeds the global memory limit.
        allocations: allocation budget in bytes (int or ``"500 MB"``).
        token: a :class:`Token` whose ``set()`` interrupts the coroutine.

    >>> import asyncio, memprof_limits as ml
    >>> async def work():
    ...     await asyncio.sleep(0)
    ...     return [str(i) for i in range(10**6)]
    >>> asyncio.run(ml.limit_async(work, allocations="1 MB"))
    Error(exc=AllocationLimitExceeded('allocation limit of 1000000 bytes reached...'))
    >>> asyncio.run(ml.limit_async(work(), token=ml.Token()))  # doctest: +ELLIPSIS
    Ok(value=['0', '1', ...])
    """
    import asyncio

    coro = task if inspect.iscoroutine(task) else None
    try:
        if not isinstance(memory, bool):
            raise TypeError(f"memory: expected True or False, got {memory!r}")
        if token is not None and not isinstance(token, Token):
            raise TypeError(f"token: expected a memprof_limits.Token, got {token!r}")
        limit = None if allocations is None else parse_bytes(allocations, what="allocation limit")
        if coro is None:
            if asyncio.isfuture(task):
                raise TypeError(
                    f"task: a Task or Future runs its own steps, which limit_async cannot "
                    f"limit; pass the coroutine itself, got {task!r}"
                )
            if not callable(task):
                raise TypeError(
                    f"task: expected a coroutine or a function returning one, got {task!r}"
                )
            made = task()
            if not inspect.iscoroutine(made):
                if inspect.isawaitable(made) and hasattr(made, "close"):
                    made.close()
                raise TypeError(
                    f"task: {task!r} returned {made!r}, not a coroutine "
                    "(pass an `async def` function or a coroutine)"
                )
            coro = made
    except BaseException:
        if coro is not None:
            coro.close()  # never awaited: no "coroutine was never awaited" warning
        raise
    return _await(_Driver(coro, memory, limit, token))


async def _await(driver: _Driver) -> Ok[Any] | Error:
    return await driver


class _Driver:
    """Drives one coroutine step by step under its limits (see the header)."""

    __slots__ = (
        "allocated",
        "allocations",
        "coro",
        "finished",
        "memory",
        "reached",
        "token",
    )

    def __init__(
        self,
        coro: Coroutine[Any, Any, Any],
        memory: bool,
        allocations: int | None,
        token: Token | None,
    ) -> None:
        self.coro = coro
        self.memory = memory
        self.allocations = allocations
        self.token = token
        self.allocated = 0  # bytes of the coroutine's steps so far
        self.reached: LimitScope | None = None  # the step scope that reached the limit
        self.finished = False

    def __await__(self) -> Generator[Any, Any, Ok[Any] | Error]:
        import asyncio

        token = self.token
        if token is not None and token.is_set():
            self.finished = True
            self.coro.close()
            return Error(
                _exceptions.Cancelled("cancelled: the token was set before the task started")
            )
        mode: int = _SEND
        arg: Any = None
        while True:
            try:
                kind, value = self._step(mode, arg)
                if kind == _RETURNED:
                    if self.reached is None:
                        return Ok(value)
                    return Error(self._interrupt(" (the task returned normally afterwards)"))
                if kind == _RAISED:
                    if self.reached is None or isinstance(value, asyncio.CancelledError):
                        raise value
                    return Error(_limit_error(self.reached, value))
                if self.reached is not None:
                    # Sticky: the coroutine swallowed the interrupt and awaits.
                    # Abandon what it awaits, let the loop turn once, deliver again.
                    _cancel(value)
                    mode, arg = _THROW, self._interrupt()
                    yield None
                elif token is not None and _own_loop_future(value):
                    mode, arg = yield from self._wait(value, token)
                else:
                    arg = yield value
                    mode = _SEND
            except BaseException as exc:
                # Thrown in at a `yield` by the caller's task (its cancellation,
                # the exception of what the coroutine awaited), or an outer
                # limit's interrupt landing in this frame between two steps:
                # the coroutine gets it where it is suspended.
                if self.finished:
                    raise
                if isinstance(exc, GeneratorExit):
                    self._step(_CLOSE, None)
                    raise
                mode, arg = _THROW, exc

    # -- one step ----------------------------------------------------------

    def _step(self, mode: int, arg: Any) -> tuple[int, Any]:
        remaining = None
        if self.allocations is not None:
            remaining = max(0, self.allocations - self.allocated)
        scope = LimitScope._make(self.memory, remaining, self.token)
        scope._shown = (self.allocations, self.allocated)
        coro = self.coro
        entered = False

        def acquire() -> Any:
            nonlocal entered
            scope._ml_enter(exact=False)
            entered = True
            return arg

        def release(_r: Any, value: Any, exc: BaseException | None) -> tuple[int, Any]:
            if mode == _CLOSE or exc is not None:
                self.finished = True
            try:
                scope._ml_exit(None if exc is None else type(exc), exc, None)
            finally:
                self.allocated += scope.allocated_bytes or 0
                if scope.reason is not None and self.reached is None:
                    self.reached = scope
            if exc is None:
                return _YIELDED, value
            if isinstance(exc, StopIteration):
                return _RETURNED, exc.value
            return _RAISED, exc

        body: Callable[[Any], Any]
        if mode == _SEND:
            body = coro.send
        elif mode == _THROW:
            body = coro.throw
        else:
            body = _closer(coro)
        try:
            result: tuple[int, Any] = _sampler.bracket(acquire, body, release)
        except BaseException:
            if not entered and not self.finished:
                # The step's scope could not open (misnesting): the coroutine
                # did not run, and will not.
                self.finished = True
                coro.close()
            raise
        return result

    def _wait(self, fut: asyncio.Future[Any], token: Token) -> Generator[Any, Any, tuple[int, Any]]:
        """Wait for ``fut`` (what the coroutine awaits) or the token, whichever
        first; returns how to resume the coroutine."""
        import asyncio

        loop = fut.get_loop()
        waiter = loop.create_future()
        timer: asyncio.TimerHandle | None = None

        def wake(_f: object = None) -> None:
            if not waiter.done():
                waiter.set_result(None)

        def poll() -> None:
            nonlocal timer
            if token.is_set():
                wake()
            elif not waiter.done():
                timer = loop.call_later(_POLL_S, poll)

        fut._asyncio_future_blocking = False  # as the Task does when it takes it over
        fut.add_done_callback(wake)
        timer = loop.call_later(_POLL_S, poll)
        try:
            while True:
                try:
                    waiter._asyncio_future_blocking = True  # what `await waiter` yields
                    yield waiter
                except asyncio.CancelledError:
                    # The caller's task is cancelled: cancel what the coroutine
                    # awaits, as Task.cancel does, and let it deliver that.
                    if fut.done() or not fut.cancel():
                        raise
                    waiter = loop.create_future()
                    if fut.done():
                        wake()
                    continue
                if token.is_set():
                    _cancel(fut)
                    return _THROW, _exceptions.Cancelled(_describe_token())
                return _SEND, None
        finally:
            if timer is not None:
                timer.cancel()
            fut.remove_done_callback(wake)

    def _interrupt(self, suffix: str = "") -> Interrupted:
        """The library's interrupt for the reason the limit was reached."""
        scope = self.reached
        assert scope is not None
        cls = _exceptions.BY_REASON[scope.reason or "token"]
        message = _describe_scope(scope)
        if scope.reason == "allocations":
            message = (
                f"allocation limit of {self.allocations} bytes reached "
                f"({self.allocated} bytes allocated)"
            )
        return cls(message if scope._rss is not None else message + suffix)


def _describe_token() -> str:
    return "cancelled: the token was set"


def _closer(coro: Coroutine[Any, Any, Any]) -> Callable[[Any], None]:
    def close(_r: Any) -> None:
        coro.close()

    return close


def _own_loop_future(value: Any) -> bool:
    """Whether the coroutine yielded a future of the running loop (what
    ``await future`` yields), which the wrapper can wait for itself."""
    if getattr(value, "_asyncio_future_blocking", None) is not True:
        return False
    import asyncio

    loop = asyncio._get_running_loop()
    return loop is not None and asyncio.isfuture(value) and value.get_loop() is loop


def _cancel(value: Any) -> None:
    """Abandon what the coroutine awaited (as ``Task.cancel`` would)."""
    import asyncio

    if asyncio.isfuture(value) and not value.done():
        value._asyncio_future_blocking = False
        value.cancel()
