"""The user's part of a traceback, for the front ends (the kernel and the REPL).

A cell's traceback starts with the machinery that ran it (the front end's and the
library's frames) and, for an interrupt, can end in code of ours where the interrupt was
delivered (the library's signal handler, a masked ``print`` returning).  Both front ends
show only the frames between: the user's.
"""

from __future__ import annotations

from collections.abc import Callable
from types import CodeType, TracebackType

__all__ = ["user_traceback"]


def user_traceback(
    tb: TracebackType | None,
    is_ours: Callable[[str], bool],
    *,
    start: CodeType | None = None,
    trim_end: bool = False,
) -> TracebackType | None:
    """The part of ``tb`` from ``start``'s frame -- or, without ``start``, from the
    first frame whose file is not ``is_ours`` -- down; with ``trim_end``, without the
    frames of ours at its end (the first one kept stays).  ``None`` if no frame starts
    it.  The frames are the same objects; the chain is rebuilt only if cut at the end.

    >>> import sys
    >>> def fail(): raise ValueError
    >>> try:
    ...     fail()
    ... except ValueError:
    ...     tb = sys.exc_info()[2]
    >>> user_traceback(tb, lambda f: False, start=fail.__code__).tb_frame.f_code.co_name
    'fail'
    """
    if start is not None:
        while tb is not None and tb.tb_frame.f_code is not start:
            tb = tb.tb_next
    else:
        while tb is not None and is_ours(tb.tb_frame.f_code.co_filename):
            tb = tb.tb_next
    if tb is None or not trim_end:
        return tb
    entries = []
    while tb is not None:
        entries.append(tb)
        tb = tb.tb_next
    while len(entries) > 1 and is_ours(entries[-1].tb_frame.f_code.co_filename):
        entries.pop()
    if entries[-1].tb_next is None:
        return entries[0]
    rebuilt: TracebackType | None = None
    for entry in reversed(entries):
        rebuilt = TracebackType(rebuilt, entry.tb_frame, entry.tb_lasti, entry.tb_lineno)
    return rebuilt
