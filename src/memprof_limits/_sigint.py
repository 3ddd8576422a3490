"""Ctrl+C as a cancellation token.

``KeyboardInterrupt`` is an asynchronous exception with no masking: it can
land in the middle of any bookkeeping (a ``finally``, an ``__exit__``, the
kernel's own code).  Within :class:`sigint_sets`, SIGINT sets a token
instead: the task watching it is interrupted with the library's masked,
sticky delivery, and code outside any task is not interrupted at all.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from types import FrameType, TracebackType

from . import _delivery
from ._token import Token

__all__ = ["sigint_sets"]


class sigint_sets:
    """Within the block, Ctrl+C (SIGINT) sets ``token`` instead of raising
    ``KeyboardInterrupt``.  Main thread only.

    A task on the main thread that watches ``token`` is interrupted at once,
    also when blocked in ``time.sleep`` or a socket read, unless it is
    masked (then at the end of the masked region).  ``token`` may be a
    :class:`Token` or a callable returning the token to set, or ``None`` to
    do nothing (for a runner whose token changes with each cell).

    >>> import memprof_limits as ml
    >>> token = ml.Token()
    >>> with ml.sigint_sets(token):
    ...     ml.limit_with_token(lambda: "Ctrl+C would stop me", token=token)
    Ok(value='Ctrl+C would stop me')
    """

    def __init__(self, token: Token | Callable[[], Token | None]) -> None:
        if not (isinstance(token, Token) or callable(token)):
            raise TypeError(
                f"sigint_sets: expected a Token or a callable returning one, got {token!r}"
            )
        self._token = token
        self._previous: object = None

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        token = self._token if isinstance(self._token, Token) else self._token()
        if token is not None:
            token.set()
        _delivery.deliver_in_handler(frame)

    def __enter__(self) -> sigint_sets:
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError(
                "sigint_sets() must be used in the main thread (signal handlers run there)"
            )
        self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        signal.signal(signal.SIGINT, self._previous)  # type: ignore[arg-type]
