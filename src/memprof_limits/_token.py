"""Cancellation tokens."""

from __future__ import annotations

from . import _sampler
from ._sampler import ffi

TYPE_CHECKING = False  # (not typing's: the start-up path does not import typing)
if TYPE_CHECKING:
    from typing import Any

    from ._sampler import ThreadState

__all__ = ["Token"]


class Token:
    """A flag that interrupts the tasks watching it when set.

    Thread-safe and usable from signal handlers (it takes no lock): ``set()``
    marks every task running under :func:`limit_with_token` (or a
    :class:`LimitScope`) with this token for interruption, and interrupts it
    promptly -- also when it runs a loop that never allocates, and, on the
    main thread, when it is blocked in ``time.sleep``, ``Event.wait``,
    ``socket.recv`` or ``select``.  A token cannot be cleared: make a new one
    for the next task.

    >>> import memprof_limits as ml
    >>> token = ml.Token()
    >>> token.set()
    >>> ml.limit_with_token(lambda: "never runs", token=token)
    Error(exc=Cancelled('cancelled: the token was set before the task started'))
    """

    __slots__ = ("_flag", "_watchers")

    def __init__(self) -> None:
        # The flag lives in C memory: the sampler reads it to decide whether
        # a task watching this token must be interrupted (see ml_ctl_t).
        self._flag: Any = ffi.new("int64_t *")
        # id(ThreadState) -> (ThreadState, number of scopes watching): whom to
        # nudge.  A stale entry is harmless: arming checks the flags watched.
        self._watchers: dict[int, tuple[ThreadState, int]] = {}

    def set(self) -> None:
        """Set the token and interrupt the tasks that watch it (idempotent)."""
        from . import _delivery

        self._flag[0] = 1
        _sampler.pending_changed()
        for st, _count in list(self._watchers.values()):
            _delivery.nudge(st)

    def is_set(self) -> bool:
        """Whether :meth:`set` was called."""
        return bool(self._flag[0])

    def __repr__(self) -> str:
        return f"<Token {'set' if self.is_set() else 'unset'}>"

    # Called by scopes, masked, in the watching thread.
    def _watch(self, st: ThreadState) -> None:
        st.watch_token(self._flag)
        _st, count = self._watchers.get(id(st), (st, 0))
        self._watchers[id(st)] = (st, count + 1)

    def _unwatch(self, st: ThreadState) -> None:
        st.unwatch_token(self._flag)
        _st, count = self._watchers.get(id(st), (st, 1))
        if count <= 1:
            self._watchers.pop(id(st), None)
        else:
            self._watchers[id(st)] = (st, count - 1)
