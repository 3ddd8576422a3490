# mypy: disable-error-code="no-untyped-call"
"""``sys.stdout`` / ``sys.stderr`` whose writes and flushes cannot be cut by
an interrupt.

ipykernel's ``OutStream.write`` appends to a buffer and schedules a flush on
the IOPub thread in two steps (``_flush_pending = True``, then
``pub_thread.schedule``); an interrupt between the two leaves the flag set
with no flush scheduled, and the cell's output stops appearing until the
end of the cell.  ``flush`` hands buffers to the IOPub thread and waits.
Both run masked here: an interrupt that arrives meanwhile is delivered when
they return.  Blocking is bounded by ipykernel's ``flush_timeout``.
"""

from __future__ import annotations

from typing import Any

from ipykernel.iostream import OutStream

import memprof_limits as ml

__all__ = ["MaskedOutStream"]


class MaskedOutStream(OutStream):
    """An ``OutStream`` whose ``write`` and ``flush`` run masked."""

    def write(self, string: str) -> Any:
        return ml.masked(lambda: OutStream.write(self, string))

    def flush(self) -> None:
        ml.masked(lambda: OutStream.flush(self))
