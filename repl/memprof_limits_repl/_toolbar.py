"""The bottom toolbar: current memory, the active limits, the last cell."""

from __future__ import annotations

import resource

import memprof_limits as ml
from memprof_limits._process import rss_bytes

from ._session import Session

__all__ = ["current_rss_bytes", "format_seconds", "toolbar_text"]


def current_rss_bytes() -> int:
    """The process's resident memory now, or its peak (``getrusage``) where
    that cannot be read."""
    rss = rss_bytes()
    return rss if rss is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def format_seconds(seconds: float) -> str:
    """``0.004 s``, ``1.25 s``, ``12.3 s``, ``2 min 05 s``."""
    if seconds < 10:
        return f"{seconds:.3f} s" if seconds < 1 else f"{seconds:.2f} s"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(int(seconds), 60)
    return f"{minutes} min {rest:02d} s"


def toolbar_text(session: Session) -> str:
    """The toolbar's line: memory now, the session limits, the last cell::

         RSS 52.3 MiB | limits: memory=1GiB | last [3]: 1.2 MiB in 0.004 s

    (``memory=18.8 GiB (default)`` for the safe default memory limit.)

    ``rollback off`` is added when rollback is off; an interrupted last cell
    shows its reason (``allocation limit``, ``memory limit``,
    ``interrupted``) with what it allocated and how long it ran.
    """
    limits = f"limits: {session.limits_text(short=True)}"
    if not session.runner.rollback:
        limits += "; rollback off"
    parts = [f"RSS {ml.format_bytes(current_rss_bytes())}", limits]
    last = session.runner.last
    if last is None:
        parts.append("last: -")
    else:
        label = f"last [{session.last_cell_number}]"
        allocated = ml.format_bytes(last.allocated_bytes)
        took = format_seconds(last.wall_time_s)
        if last.interrupted:
            cause = {"memory": "memory limit", "allocations": "allocation limit"}.get(
                last.reason or "", "interrupted"
            )
            parts.append(f"{label}: {cause} after {allocated}, {took}")
        else:
            parts.append(f"{label}: {allocated} in {took}")
    return " " + " | ".join(parts) + " "
