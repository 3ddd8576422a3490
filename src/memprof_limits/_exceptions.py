"""The interrupt exceptions.

An interrupt is raised inside a task as an asynchronous exception.  CPython
can only arm an exception *class* asynchronously (``PyThreadState_SetAsyncExc``
instantiates it with no arguments at delivery), so there is one class per
reason, and the instance reads its figures from the interrupted thread's
state when it is created -- in the interrupted thread.
"""

from __future__ import annotations

TYPE_CHECKING = False  # (not typing's: the start-up path does not import typing)
if TYPE_CHECKING:
    from typing import ClassVar, Literal

    Reason = Literal["memory", "allocations", "token"]
else:
    Reason = str

__all__ = [
    "AllocationLimitExceeded",
    "Cancelled",
    "Interrupted",
    "MemoryLimitExceeded",
    "PoisonedError",
]


class Interrupted(BaseException):
    """Raised inside a task when one of its limits is reached.

    A ``BaseException``, so that ``except Exception:`` in user code does not
    swallow it.  Do not rely on catching it (see ``docs/recovering.md``):
    re-raise it promptly, and keep state consistent with
    :func:`with_resource`, :func:`protect`, :class:`SafeMutex` or
    :class:`Guarded`.  Subclasses name the reason; ``reason`` holds it as a
    string (``"memory"``, ``"allocations"`` or ``"token"``).
    """

    reason: ClassVar[Reason]
    _describe: ClassVar[object] = None  # set by _limits: reason -> message

    def __init__(self, *args: object) -> None:
        if not args:
            describe = type(self)._describe
            message = describe(self.reason) if callable(describe) else self.reason
            args = (message,)
        super().__init__(*args)


class MemoryLimitExceeded(Interrupted):
    """The process's memory exceeded the global memory limit."""

    reason = "memory"


class AllocationLimitExceeded(Interrupted):
    """The task allocated more bytes than its allocation limit."""

    reason = "allocations"


class Cancelled(Interrupted):
    """The task's cancellation token was set."""

    reason = "token"


#: The library's interrupt of each reason (the one table: scopes, limit_async).
BY_REASON: dict[Reason, type[Interrupted]] = {
    cls.reason: cls for cls in (MemoryLimitExceeded, AllocationLimitExceeded, Cancelled)
}


class PoisonedError(RuntimeError):
    """A :class:`SafeMutex` was interrupted while held: the state it protects
    may be inconsistent.  Call ``mutex.clear_poison()`` after repairing it."""
