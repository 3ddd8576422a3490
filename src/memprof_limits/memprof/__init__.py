"""Statistical allocation profiler on the memprof-limits sampler.

The Python counterpart of OCaml's ``Gc.Memprof`` as re-implemented by
memprof-limits, with the surface of :mod:`tracemalloc` so that its users feel
at home::

    >>> from memprof_limits import memprof
    >>> memprof.start()
    >>> data = [bytearray(1000) for _ in range(10_000)]
    >>> snapshot = memprof.snapshot()
    >>> memprof.stop()
    >>> top = snapshot.statistics("lineno")[0]
    >>> top.traceback[-1].lineno > 0   # the line of the list comprehension
    True

The problem
-----------
:mod:`tracemalloc` records every allocation: exact, but several times slower
(``benchmarks/RESULTS.md``, "Profiler").  The engine already samples the allocation
stream for the limits -- each byte independently with probability ``rate``
-- so a profiler can piggyback on its samples: at each one, record who
allocated, and estimate what each line or traceback allocated by scaling
(each sample stands for ``1 / rate`` bytes).

What does not work, and why
---------------------------
- Calling Python code or building Python objects at a sample: samples are
  taken inside the allocator hooks (``native/memprof.c`` says why that is
  forbidden).  The C side keeps code objects and instruction offsets;
  this module builds frames, tracebacks and statistics later.
- Running the profiler at a rate below the limits' rate: the limits' latency
  guarantees (``docs/statistical.md``) are computed at that rate.  As in
  OCaml memprof-limits, a lower rate is refused.
- Tracking the deallocation of every block (tracemalloc's live-memory view):
  a hash lookup per free.  Only *sampled* blocks are tracked, on request.

The solution
------------
:func:`start` makes the engine sample at the profiler's rate (it restores the
previous rate at :func:`stop`) and turns on the C recorder.  :func:`snapshot`
drains the C buffer into this module (masked: an interrupt cannot lose
records), resolves code objects to :class:`Frame` objects, and asks the C
side which tracked blocks are still alive.  :class:`Snapshot` groups samples
as :meth:`tracemalloc.Snapshot.statistics` does, with unbiased estimates:
bytes = ``n_samples / rate``; allocations = sum over sampled allocations of
``1 / P[an allocation of that size is sampled]``; and a Poisson confidence
interval for the bytes.

Known failure cases
-------------------
- Estimates, not measures: a site that allocated ``n`` bytes is estimated
  within about ``1 / sqrt(n * rate)`` (relative standard deviation); sites
  that allocated much less than ``1 / rate`` bytes are often missed.
- Allocations served by free lists (small floats, tuples, frames) and memory
  that does not go through CPython's allocators (most C libraries; NumPy's
  array buffers do: the engine counts and profiles them) are invisible, as
  they are to the limits.
- RAW-domain allocations made without the GIL have no traceback
  (``<unknown>``).
- ``realloc`` counts the new size as a new allocation, and a tracked block
  that is reallocated is reported dead.
- Stopping the engine (``memprof_limits.stop()``) while profiling stops the
  tracking of frees: liveness is then reported as unknown (``None``).
- The first gap after :func:`start` was drawn at the engine's previous rate
  (threads pick a new rate up at their next sample): the first
  ``1 / previous_rate`` bytes of each thread are sampled at the lower rate.
- Allocations made by this module's own code (snapshots, statistics,
  exports) are left out of the profile, and so are those of user code that
  it calls back (a :meth:`Snapshot.filter` predicate).
- Thread ids are ``threading.get_ident()`` values, which the system reuses
  once a thread has ended.
"""

from __future__ import annotations

from ..stats import poisson_interval
from ._magic import MAGIC_DEFAULT_RATE, last_magic_snapshot, load_ipython_extension, memprof_magic
from ._recorder import (
    Session,
    clear,
    get_sampling_rate,
    get_traceback_limit,
    is_tracing,
    snapshot,
    start,
    stop,
    tracing,
)
from ._records import (
    DEFAULT_MAX_FRAMES,
    MAX_FRAMES,
    UNKNOWN_FRAME,
    Frame,
    KeyType,
    Sample,
    Statistic,
    StatisticDiff,
)
from ._snapshot import Snapshot

__all__ = [
    "DEFAULT_MAX_FRAMES",
    "MAGIC_DEFAULT_RATE",
    "MAX_FRAMES",
    "UNKNOWN_FRAME",
    "Frame",
    "KeyType",
    "Sample",
    "Session",
    "Snapshot",
    "Statistic",
    "StatisticDiff",
    "clear",
    "get_sampling_rate",
    "get_traceback_limit",
    "is_tracing",
    "last_magic_snapshot",
    "load_ipython_extension",
    "memprof_magic",
    "poisson_interval",
    "snapshot",
    "start",
    "stop",
    "tracing",
]
