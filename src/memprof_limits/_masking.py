"""Masking: regions where interrupts are deferred, and what is built on them.

The problem
-----------
An asynchronous exception can land between any two bytecodes: between
``lock.acquire()`` and the ``try`` that would release it, in the middle of a
``finally``, inside ``__exit__``.  The code that acquires and releases
resources must not be interrupted, and the interrupt must not be lost either.

What does not work, and why
---------------------------
- ``try``/``finally`` in Python: the interrupt can land at the first
  instruction of the ``finally`` block or of ``__exit__``.
- A mask flag set by a Python ``__enter__``: the interrupt lands at that
  function's first instruction, before the flag is set.
- Masking by frame inspection at delivery time (trio's KI protection): the
  allocator hook cannot inspect frames without calling the C API.

The solution
------------
The mask depth lives in the thread's C control block, and every arming path
checks it atomically (the hook on its own thread, ``ml_arm`` with the GIL,
the main-thread signal handler in the main thread).  Masked regions are
entered from C (``ml_bracket``, ``ml_masked_call`` and the context-manager
trampolines), so no bytecode runs between the caller and the region; an
interrupt armed just before is delivered and swallowed at entry (it is
sticky: its reason stays pending) and re-armed when the region ends.

Known failure cases
-------------------
- A masked region that runs away (allocates or loops without bound) cannot
  be interrupted: keep ``acquire``/``release`` short.
- The ``with`` forms share CPython's one-line-loop bugs (gh-108214,
  gh-130279) for their *body*: ``with_resource`` does not.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from . import _sampler, _signals
from ._delivery import exception_class
from ._exceptions import Interrupted, PoisonedError
from ._sampler import is_interrupted

__all__ = ["SafeMutex", "masked", "protect", "resource", "with_resource"]

A = TypeVar("A")
R = TypeVar("R")
T = TypeVar("T")

_ENTER, _EXIT = _sampler.masked_methods()


def with_resource(
    acquire: Callable[[A], R], arg: A, scope: Callable[[R], T], release: Callable[[R], object]
) -> T:
    """``scope(acquire(arg))``, then ``release`` -- interrupt-safe.

    ``acquire`` and ``release`` run masked: no interrupt is delivered inside
    them (one that arrives is deferred to their end).  ``release(r)`` runs if
    and only if ``acquire(arg)`` returned ``r``, whether ``scope`` returns or
    raises; an exception from ``release`` propagates.  (OCaml
    memprof-limits' ``Masking.with_resource``.)

    >>> import memprof_limits as ml
    >>> ml.with_resource(open, "/dev/null", lambda f: f.read(), lambda f: f.close())
    ''
    """

    def release_(r: R, value: Any, exc: BaseException | None) -> T:
        try:
            release(r)
        except BaseException as error:
            if exc is not None and error.__context__ is None:
                error.__context__ = exc
            raise
        if exc is not None:
            raise exc
        return value  # type: ignore[no-any-return]

    return _sampler.bracket(lambda: acquire(arg), scope, release_)  # type: ignore[no-any-return]


def masked(fn: Callable[[], T]) -> T:
    """Run ``fn()`` with interrupts deferred until it returns.

    >>> import memprof_limits as ml
    >>> ml.masked(lambda: 1 + 1)
    2
    """
    return _sampler.masked_call(fn)  # type: ignore[no-any-return]


class resource(Generic[R]):
    """Context-manager form of :func:`with_resource`.

    >>> import memprof_limits as ml
    >>> with ml.resource(lambda: open("/dev/null"), lambda f: f.close()) as f:
    ...     f.read()
    ''
    """

    __enter__ = _ENTER
    __exit__ = _EXIT

    def __init__(self, acquire: Callable[[], R], release: Callable[[R], object]) -> None:
        self._acquire = acquire
        self._release = release
        self._acquired = False
        self._value: R | None = None

    def _ml_enter(self) -> R:
        if self._acquired:
            raise RuntimeError("this resource() is already in use; create one per with block")
        self._value = value = self._acquire()
        self._acquired = True
        return value

    def _ml_exit(self, et: Any, ev: Any, tb: Any) -> bool:
        if self._acquired:
            self._acquired = False
            value, self._value = self._value, None
            self._release(value)  # type: ignore[arg-type]
        return False


class protect(Generic[T]):
    """Make a context manager interrupt-safe: its ``__enter__`` and
    ``__exit__`` run masked, and nothing can be delivered between
    ``__enter__`` returning and the ``with`` body starting.

    >>> import threading, memprof_limits as ml
    >>> lock = threading.Lock()
    >>> with ml.protect(lock):
    ...     lock.locked()
    True
    """

    __enter__ = _ENTER
    __exit__ = _EXIT

    def __init__(self, cm: Any) -> None:
        if not (hasattr(type(cm), "__enter__") and hasattr(type(cm), "__exit__")):
            raise TypeError(
                f"protect() expects a context manager (with __enter__ and __exit__), got {cm!r}"
            )
        self._cm = cm

    def _ml_enter(self) -> T:
        return type(self._cm).__enter__(self._cm)  # type: ignore[no-any-return]

    def _ml_exit(self, et: Any, ev: Any, tb: Any) -> bool:
        return bool(type(self._cm).__exit__(self._cm, et, ev, tb))


class SafeMutex:
    """A mutex that is poisoned when an interrupt arrives while it is held.

    ``with mutex:`` acquires and releases masked.  If the holder's task is
    interrupted while holding it (the state it protects may be half-updated),
    the mutex is poisoned: the next ``with mutex:`` raises
    :class:`PoisonedError` (as Rust's ``Mutex``) instead of exposing the
    state.  Repair the state, then call :meth:`clear_poison`.  Waiting for
    the mutex is interruptible by the waiting task's own limits.  It is not
    reentrant: entering it again in the thread that holds it raises
    ``RuntimeError`` (instead of waiting forever), and only that thread can
    leave it.

    >>> import memprof_limits as ml
    >>> m = ml.SafeMutex()
    >>> with m:
    ...     m.poisoned
    False
    """

    __enter__ = _ENTER
    __exit__ = _EXIT

    _POLL_S = 0.005

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._poisoned = False
        self._interrupted_at_entry = False
        self._owner: int | None = None  # thread ident of the holder

    @property
    def poisoned(self) -> bool:
        """Whether an interrupt arrived while the mutex was held."""
        return self._poisoned

    def clear_poison(self) -> None:
        """Declare the protected state consistent again."""
        self._poisoned = False

    def locked(self) -> bool:
        """Whether the mutex is held."""
        return self._lock.locked()

    def recover(self) -> _Recovery:
        """``with mutex.recover():`` holds the mutex *despite* the poison, to
        repair the state it protects; leaving the block normally clears the
        poison (Rust's ``PoisonError::into_inner``).  Only one thread repairs
        at a time.

        >>> import memprof_limits as ml
        >>> m = ml.SafeMutex()
        >>> with m.recover():
        ...     pass  # repair here
        >>> m.poisoned
        False
        """
        return _Recovery(self)

    def _ml_enter(self) -> SafeMutex:
        self._acquire_interruptibly()
        if self._poisoned:
            self._release()
            raise PoisonedError(
                "this SafeMutex was poisoned: a task was interrupted while holding it, so the "
                "state it protects may be inconsistent; repair it in `with mutex.recover():` "
                "(or call clear_poison() once it is repaired)"
            )
        self._interrupted_at_entry = is_interrupted()
        return self

    def _ml_exit(self, et: Any, ev: Any, tb: Any) -> bool:
        self._check_owner()
        if isinstance(ev, Interrupted) or (is_interrupted() and not self._interrupted_at_entry):
            self._poisoned = True
        self._release()
        return False

    def _acquire_interruptibly(self) -> None:
        me = threading.get_ident()
        if self._owner == me:
            raise RuntimeError(
                "SafeMutex is not reentrant: this thread already holds it (a nested "
                "`with mutex:` would wait for itself forever)"
            )
        while not self._lock.acquire(timeout=self._POLL_S):
            # Masked, signal handlers are deferred: run them here, where nothing
            # is acquired yet, so that Ctrl+C (or a handler that sets a token)
            # can end the wait.
            _signals.run_deferred_now()
            if is_interrupted():
                raise exception_class(_sampler.thread_state().pending())()
        self._owner = me

    def _check_owner(self) -> None:
        if self._owner == threading.get_ident():
            return
        if self._owner is not None:
            # Left from another thread (a generator holding it, closed elsewhere):
            # its holder will never release it, so release it poisoned rather
            # than leave every later `with mutex:` waiting forever.
            self._poisoned = True
            self._release()
        raise RuntimeError(
            "SafeMutex released by a thread that does not hold it: only the thread that "
            "entered `with mutex:` leaves it"
        )

    def _release(self) -> None:
        self._owner = None
        self._lock.release()


class _Recovery:
    """See :meth:`SafeMutex.recover`."""

    __enter__ = _ENTER
    __exit__ = _EXIT

    def __init__(self, mutex: SafeMutex) -> None:
        self._mutex = mutex

    def _ml_enter(self) -> SafeMutex:
        self._mutex._acquire_interruptibly()
        self._mutex._interrupted_at_entry = is_interrupted()
        return self._mutex

    def _ml_exit(self, et: Any, ev: Any, tb: Any) -> bool:
        m = self._mutex
        m._check_owner()
        if ev is None and not (is_interrupted() and not m._interrupted_at_entry):
            m._poisoned = False
        elif isinstance(ev, Interrupted) or is_interrupted():
            m._poisoned = True
        m._release()
        return False
