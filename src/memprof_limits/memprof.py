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

import ast
import atexit
import ctypes
import json
import linecache
import math
import os
import pickle
import statistics as _statistics
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Final, Literal, NamedTuple

from . import _sampler
from ._masking import masked, resource
from ._sampler import lib, native_function
from ._units import format_bytes

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

KeyType = Literal["lineno", "filename", "traceback"]
"""How :meth:`Snapshot.statistics` groups samples (as in tracemalloc)."""

DEFAULT_MAX_FRAMES: Final = 64
"""Default number of frames kept per sample (innermost ones)."""

MAX_FRAMES: Final = int(lib.ML_MEMPROF_MAX_FRAMES)
"""Largest ``max_frames`` accepted by :func:`start`."""

_DOMAINS: Final = ("raw", "mem", "obj")
_TRACKED: Final = int(lib.ML_MEMPROF_TRACKED)
_ERR_ARG: Final = int(lib.ML_MEMPROF_ERR_ARG)


class Frame(NamedTuple):
    """A line of Python code: ``(filename, lineno)``, as in tracemalloc."""

    filename: str
    lineno: int

    def __str__(self) -> str:
        return f"{self.filename}:{self.lineno}"


UNKNOWN_FRAME: Final = Frame("<unknown>", 0)
"""The traceback of samples without one (RAW allocations without the GIL, or
``max_frames=0``)."""


# --------------------------------------------------------------------------
# Native side, through _sampler (the one importer of the compiled module).

_c_start = native_function("ml_memprof_start", ctypes.c_int, ctypes.c_int, ctypes.c_int)
_c_stop = native_function("ml_memprof_stop", ctypes.c_int, ctypes.py_object, ctypes.py_object)
_c_drain = native_function("ml_memprof_drain", ctypes.c_int, ctypes.py_object)
_c_live_ids = native_function("ml_memprof_live_ids", ctypes.c_int, ctypes.py_object)
_c_discard = native_function("ml_memprof_discard", None)


# --------------------------------------------------------------------------
# User-facing records.


@dataclass(frozen=True, slots=True)
class Sample:
    """One sampled allocation.

    ``traceback`` goes from the oldest frame to the most recent one (the
    allocating line is ``traceback[-1]``), like tracemalloc's ``Traceback``;
    it holds at most ``max_frames`` frames, the innermost ones, out of
    ``total_nframe``.  ``size_bytes`` is the size requested by the sampled
    allocation, and ``n_samples`` the number of samples that fell into it
    (a block of ``s`` bytes gets about ``s * rate``).  ``alive`` says whether
    the block was still allocated when the snapshot was taken (``None`` when
    frees are not tracked).  ``domain`` is the allocator: ``"raw"``,
    ``"mem"`` or ``"obj"`` (PyMem_Raw*, PyMem_*, PyObject_*).
    """

    traceback: tuple[Frame, ...]
    size_bytes: int
    n_samples: int
    thread_id: int
    domain: str
    alive: bool | None
    total_nframe: int
    sample_id: int

    @property
    def size(self) -> int:
        """Alias of ``size_bytes`` (the requested size), as in tracemalloc."""
        return self.size_bytes


@dataclass(frozen=True, slots=True)
class Statistic:
    """Estimated allocations of one group of samples (a line, a file or a
    traceback), as :class:`tracemalloc.Statistic`.

    ``size`` is the estimated number of bytes allocated (``n_samples /
    rate``, unbiased), ``count`` the estimated number of allocations,
    ``size_low``/``size_high`` a 95 % confidence interval for the bytes
    (exact Poisson interval on ``n_samples``).
    """

    traceback: tuple[Frame, ...]
    size: int
    count: int
    n_samples: int
    size_low: int
    size_high: int

    def _sort_key(self) -> tuple[int, int, tuple[Frame, ...]]:
        return (self.size, self.count, self.traceback)

    def __str__(self) -> str:
        average = self.size / self.count if self.count else 0
        return (
            f"{_where(self.traceback)}: size={format_bytes(self.size)} "
            f"(95% CI {format_bytes(self.size_low)} .. {format_bytes(self.size_high)}), "
            f"count={self.count}, average={format_bytes(average)}, samples={self.n_samples}"
        )


@dataclass(frozen=True, slots=True)
class StatisticDiff:
    """Difference of a group's estimates between two snapshots, as
    :class:`tracemalloc.StatisticDiff`."""

    traceback: tuple[Frame, ...]
    size: int
    size_diff: int
    count: int
    count_diff: int
    n_samples: int
    n_samples_diff: int

    def _sort_key(self) -> tuple[int, int, int, int, tuple[Frame, ...]]:
        return (abs(self.size_diff), self.size, abs(self.count_diff), self.count, self.traceback)

    def __str__(self) -> str:
        return (
            f"{_where(self.traceback)}: size={format_bytes(self.size)} "
            f"({_signed_bytes(self.size_diff)}), count={self.count} ({self.count_diff:+d}), "
            f"samples={self.n_samples} ({self.n_samples_diff:+d})"
        )


def _where(traceback: tuple[Frame, ...]) -> str:
    frame = traceback[-1]
    return frame.filename if frame.lineno == 0 else str(frame)


def _signed_bytes(n: int) -> str:
    return ("+" if n >= 0 else "-") + format_bytes(abs(n))


# --------------------------------------------------------------------------
# Estimators.


def _inclusion_probability(size_bytes: int, rate: float) -> float:
    """P[an allocation of size_bytes gets at least one sample]."""
    if rate >= 1.0:
        return 1.0
    return -math.expm1(max(size_bytes, 1) * math.log1p(-rate))


def _gamma_p(a: float, x: float) -> float:
    """Regularized lower incomplete gamma function P(a, x), for a > 0."""
    if x <= 0.0:
        return 0.0
    log_prefix = -x + a * math.log(x) - math.lgamma(a)
    if x < a + 1.0:  # series
        term = total = 1.0 / a
        n = a
        for _ in range(100_000):
            n += 1.0
            term *= x / n
            total += term
            if term < total * 1e-16:
                break
        return min(1.0, total * math.exp(log_prefix))
    tiny = 1e-300  # continued fraction for Q(a, x), modified Lentz
    b = x + 1.0 - a
    c = 1.0 / tiny
    d = 1.0 / b
    h = d
    for i in range(1, 100_000):
        an = -i * (i - a)
        b += 2.0
        d = an * d + b
        d = tiny if abs(d) < tiny else d
        c = b + an / c
        c = tiny if abs(c) < tiny else c
        d = 1.0 / d
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-16:
            break
    return max(0.0, 1.0 - math.exp(log_prefix) * h)


def _gamma_quantile(a: float, p: float) -> float:
    """x such that P(a, x) = p (bisection)."""
    lo, hi = 0.0, a + 10.0 * math.sqrt(a) + 50.0
    while _gamma_p(a, hi) < p:
        hi *= 2.0
    for _ in range(200):
        mid = (lo + hi) / 2.0
        if _gamma_p(a, mid) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * hi:
            break
    return (lo + hi) / 2.0


@lru_cache(maxsize=4096)
def poisson_interval(k: int, level: float = 0.95) -> tuple[float, float]:
    """Exact (Garwood) confidence interval for the mean of a Poisson variable
    observed at ``k``: ``(Gamma^-1(a/2; k), Gamma^-1(1-a/2; k+1))``.

    Above 1000 the Wilson-Hilferty approximation is used (relative error
    below 1e-4).

    >>> lo, hi = poisson_interval(0)
    >>> lo, round(hi, 3)
    (0.0, 3.689)
    """
    if k < 0 or not 0.0 < level < 1.0:
        raise ValueError(f"poisson_interval: need k >= 0 and 0 < level < 1, got {k}, {level}")
    alpha = 1.0 - level
    if k > 1000:
        z = _statistics.NormalDist().inv_cdf(1.0 - alpha / 2.0)

        def wh(n: float, sign: float) -> float:
            return n * (1.0 - 1.0 / (9.0 * n) + sign * z / (3.0 * math.sqrt(n))) ** 3

        return (wh(k, -1.0), wh(k + 1.0, +1.0))
    low = 0.0 if k == 0 else _gamma_quantile(float(k), alpha / 2.0)
    return (low, _gamma_quantile(float(k + 1), 1.0 - alpha / 2.0))


# --------------------------------------------------------------------------
# Snapshots.


class Snapshot:
    """Samples taken since :func:`start`, with the means to estimate from them.

    Snapshots are immutable; :func:`snapshot` returns a new one each time.
    ``sampling_rate`` is the probability that a given byte was sampled, so
    every sample stands for ``1 / sampling_rate`` bytes.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        *,
        sampling_rate: float,
        max_frames: int,
        track_frees: bool,
        function_names: dict[Frame, str] | None = None,
        thread_names: dict[int, str] | None = None,
        dropped_samples: int = 0,
    ) -> None:
        if not 0.0 < sampling_rate <= 1.0:
            raise ValueError(f"sampling_rate must be in (0, 1], got {sampling_rate!r}")
        self.samples: tuple[Sample, ...] = tuple(samples)
        self.sampling_rate = float(sampling_rate)
        self.max_frames = max_frames
        self.track_frees = track_frees
        self.function_names: dict[Frame, str] = dict(function_names or {})
        self.thread_names: dict[int, str] = dict(thread_names or {})
        self.dropped_samples = dropped_samples

    def __repr__(self) -> str:
        return (
            f"<memprof.Snapshot: {len(self.samples)} sampled allocations, "
            f"{self.n_samples} samples, "
            f"~{format_bytes(self.total_size())} at rate {self.sampling_rate:.3g}/B>"
        )

    # -- estimates -----------------------------------------------------------

    @property
    def n_samples(self) -> int:
        """Total samples (an allocation can hold several)."""
        return sum(s.n_samples for s in self.samples)

    def total_size(self) -> int:
        """Estimated bytes allocated in all (``n_samples / rate``)."""
        return round(self.n_samples / self.sampling_rate)

    def function_name(self, frame: Frame) -> str:
        """The qualified name of the function that ``frame`` is in."""
        return self.function_names.get(frame, "<unknown>" if frame == UNKNOWN_FRAME else "?")

    def statistics(self, key_type: KeyType, cumulative: bool = False) -> list[Statistic]:
        """Estimates grouped by ``key_type``, biggest first (tracemalloc's
        ``Snapshot.statistics``): ``"lineno"`` (the allocating line),
        ``"filename"`` or ``"traceback"``.  With ``cumulative``, a sample
        counts for every line (or file) of its traceback, once each.
        """
        groups = self._group(key_type, cumulative)
        stats = [self._statistic(tb, n, count) for tb, (n, count) in groups.items()]
        stats.sort(reverse=True, key=Statistic._sort_key)
        return stats

    def compare_to(
        self, old_snapshot: Snapshot, key_type: KeyType, cumulative: bool = False
    ) -> list[StatisticDiff]:
        """Differences from ``old_snapshot`` grouped by ``key_type``, biggest
        change first (tracemalloc's ``Snapshot.compare_to``).  Groups that
        exist in only one snapshot count as 0 in the other.
        """
        new = {s.traceback: s for s in self.statistics(key_type, cumulative)}
        old = {s.traceback: s for s in old_snapshot.statistics(key_type, cumulative)}
        diffs = []
        for tb, stat in new.items():
            prev = old.pop(tb, None)
            diffs.append(
                StatisticDiff(
                    tb,
                    stat.size,
                    stat.size - (prev.size if prev else 0),
                    stat.count,
                    stat.count - (prev.count if prev else 0),
                    stat.n_samples,
                    stat.n_samples - (prev.n_samples if prev else 0),
                )
            )
        for tb, prev in old.items():
            diffs.append(StatisticDiff(tb, 0, -prev.size, 0, -prev.count, 0, -prev.n_samples))
        diffs.sort(reverse=True, key=StatisticDiff._sort_key)
        return diffs

    def _statistic(self, traceback: tuple[Frame, ...], n: int, count: float) -> Statistic:
        rate = self.sampling_rate
        if rate >= 1.0:
            low, high = float(n), float(n)  # every byte sampled: exact
        else:
            low, high = poisson_interval(n)
        return Statistic(
            traceback,
            size=round(n / rate),
            count=max(1, round(count)),
            n_samples=n,
            size_low=math.floor(low / rate),
            size_high=math.ceil(high / rate),
        )

    def _group(self, key_type: KeyType, cumulative: bool) -> dict[tuple[Frame, ...], list[Any]]:
        if key_type not in ("lineno", "filename", "traceback"):
            raise ValueError(f"unknown key_type: {key_type!r} (lineno, filename or traceback)")
        if cumulative and key_type == "traceback":
            raise ValueError("cumulative mode cannot be used with key_type 'traceback'")
        rate = self.sampling_rate
        groups: dict[tuple[Frame, ...], list[Any]] = {}
        weights: dict[int, float] = {}
        for s in self.samples:
            weight = weights.get(s.size_bytes)
            if weight is None:
                weight = weights[s.size_bytes] = 1.0 / _inclusion_probability(s.size_bytes, rate)
            keys: Iterable[tuple[Frame, ...]]
            if key_type == "traceback":
                keys = (s.traceback,)
            elif key_type == "lineno":
                keys = (
                    dict.fromkeys((f,) for f in s.traceback)
                    if cumulative
                    else ((s.traceback[-1],),)
                )
            else:
                files = s.traceback if cumulative else s.traceback[-1:]
                keys = dict.fromkeys((Frame(f.filename, 0),) for f in files)
            for key in keys:
                acc = groups.get(key)
                if acc is None:
                    groups[key] = [s.n_samples, weight]
                else:
                    acc[0] += s.n_samples
                    acc[1] += weight
        return groups

    # -- selections ----------------------------------------------------------

    def filter(self, predicate: Callable[[Sample], bool]) -> Snapshot:
        """A snapshot of the samples for which ``predicate`` is true."""
        return self._with([s for s in self.samples if predicate(s)])

    def alive(self) -> Snapshot:
        """A snapshot of the samples whose block is still allocated: its
        estimates are of *live* memory, by allocation site.  Needs
        ``start(track_frees=True)``."""
        if not self.track_frees or (self.samples and all(s.alive is None for s in self.samples)):
            raise ValueError(
                "liveness is unknown: start the profiler with track_frees=True "
                "(and do not stop the engine while it runs)"
            )
        return self.filter(lambda s: s.alive is True)

    def _with(self, samples: Sequence[Sample]) -> Snapshot:
        return Snapshot(
            samples,
            sampling_rate=self.sampling_rate,
            max_frames=self.max_frames,
            track_frees=self.track_frees,
            function_names=self.function_names,
            thread_names=self.thread_names,
            dropped_samples=self.dropped_samples,
        )

    # -- persistence and export ---------------------------------------------

    def dump(self, path: str | os.PathLike[str]) -> None:
        """Write the snapshot to ``path`` (pickle), for :meth:`load`."""
        with open(path, "wb") as f:
            pickle.dump(self, f, pickle.HIGHEST_PROTOCOL)

    @staticmethod
    def load(path: str | os.PathLike[str]) -> Snapshot:
        """Read a snapshot written by :meth:`dump` (pickle: trusted files only)."""
        with open(path, "rb") as f:
            snap = pickle.load(f)
        if not isinstance(snap, Snapshot):
            raise TypeError(f"{os.fspath(path)!r} does not hold a memprof Snapshot")
        return snap

    def _label(self, frame: Frame) -> str:
        name = self.function_name(frame)
        return f"{name} ({frame.filename}:{frame.lineno})"

    def _stack_weights(self, weight: str, by_thread: bool) -> dict[tuple[str, ...], float]:
        if weight not in ("bytes", "samples"):
            raise ValueError(f"weight must be 'bytes' or 'samples', got {weight!r}")
        scale = 1.0 / self.sampling_rate if weight == "bytes" else 1.0
        stacks: dict[tuple[str, ...], float] = {}
        for s in self.samples:
            labels = tuple(self._label(f) for f in s.traceback)
            if by_thread:
                labels = (f"thread {self.thread_names.get(s.thread_id, s.thread_id)}", *labels)
            stacks[labels] = stacks.get(labels, 0.0) + s.n_samples * scale
        return stacks

    def to_collapsed(
        self, path: str | os.PathLike[str], *, weight: str = "bytes", by_thread: bool = False
    ) -> None:
        """Write the samples as collapsed stacks ("folded" format of
        flamegraph.pl, inferno, speedscope): one line per stack, frames from
        the outermost to the innermost separated by ``;``, then a space and
        the weight -- estimated bytes (default) or samples.  ``by_thread``
        adds the thread as the outermost frame.
        """
        lines = []
        for labels, value in sorted(self._stack_weights(weight, by_thread).items()):
            clean = [lab.replace(";", ",").replace("\n", " ") for lab in labels]
            lines.append(f"{';'.join(clean)} {round(value)}\n")
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(lines)

    def to_speedscope(
        self, path: str | os.PathLike[str], *, name: str = "memprof", by_thread: bool = False
    ) -> None:
        """Write the samples as a speedscope file (https://www.speedscope.app,
        "sampled" profiles weighted by estimated bytes); ``by_thread`` makes
        one profile per thread."""
        frame_index: dict[Frame, int] = {}
        frames: list[dict[str, Any]] = []
        profiles: dict[int | None, tuple[list[list[int]], list[float]]] = {}
        scale = 1.0 / self.sampling_rate
        for s in self.samples:
            stack = []
            for f in s.traceback:
                i = frame_index.get(f)
                if i is None:
                    i = frame_index[f] = len(frames)
                    frames.append(
                        {"name": self.function_name(f), "file": f.filename, "line": f.lineno}
                    )
                stack.append(i)
            samples, weights = profiles.setdefault(s.thread_id if by_thread else None, ([], []))
            samples.append(stack)
            weights.append(s.n_samples * scale)
        out_profiles = []
        for tid, (samples, weights) in profiles.items():
            title = name if tid is None else f"{name}: thread {self.thread_names.get(tid, tid)}"
            out_profiles.append(
                {
                    "type": "sampled",
                    "name": title,
                    "unit": "bytes",
                    "startValue": 0,
                    "endValue": sum(weights),
                    "samples": samples,
                    "weights": weights,
                }
            )
        doc = {
            "$schema": "https://www.speedscope.app/file-format-schema.json",
            "shared": {"frames": frames},
            "profiles": out_profiles,
            "name": name,
            "activeProfileIndex": 0,
            "exporter": "memprof_limits.memprof",
        }
        with open(path, "w", encoding="utf-8") as out:
            json.dump(doc, out)

    def format_top(self, limit: int = 10, key_type: KeyType = "lineno") -> str:
        """The ``limit`` biggest groups as text, with their source lines."""
        stats = self.statistics(key_type)
        out = [
            f"~{format_bytes(self.total_size())} allocated, estimated from {self.n_samples} "
            f"samples (one per {format_bytes(1 / self.sampling_rate)} on average)"
        ]
        for i, stat in enumerate(stats[:limit], 1):
            out.append(f"#{i}: {stat}")
            frame = stat.traceback[-1]
            source = linecache.getline(frame.filename, frame.lineno).strip()
            if source:
                out.append(f"    {source}")
        if len(stats) > limit:
            rest = sum(s.size for s in stats[limit:])
            out.append(f"{len(stats) - limit} other: ~{format_bytes(rest)}")
        return "\n".join(out)


# --------------------------------------------------------------------------
# The profiler's state.  Protected by _lock; mutated only in masked regions
# (an interrupt cannot leave it half updated or lose drained records).


class _State:
    def __init__(self) -> None:
        self.reset()
        self.started_once = False

    def reset(self) -> None:
        self.running = False
        self.rate = _sampler.DEFAULT_SAMPLING_RATE
        self.previous_rate: float | None = None  # engine rate to restore at stop
        self.max_frames = DEFAULT_MAX_FRAMES
        self.track_frees = False
        self.tracking_lost = False
        # (id, traceback, size, n_samples, thread_id, domain, flags, total_nframe)
        self.records: list[tuple[int, tuple[Frame, ...], int, int, int, str, int, int]] = []
        self.function_names: dict[Frame, str] = {}
        self.tracebacks: dict[tuple[Frame, ...], tuple[Frame, ...]] = {}  # interned
        self.live_at_stop: set[int] | None = None
        self.dropped = 0


_lock = threading.RLock()
_state = _State()


_OWN_FILE: Final = __file__
_CELL_PREFIX: Final = "<memprof-cell-"


def _is_own(flat: tuple[Any, ...], kinds: dict[int, int]) -> bool:
    """Whether a sample was allocated by this module's code: a frame of this
    file comes before (inside) any frame of user code that this module runs
    (the magic's cells).  The profiler's own allocations are not the user's."""
    for i in range(0, len(flat), 2):
        code = flat[i]
        kind = kinds.get(id(code))
        if kind is None:
            name = code.co_filename
            kind = kinds[id(code)] = (
                1 if name == _OWN_FILE else 2 if name.startswith(_CELL_PREFIX) else 0
            )
        if kind:
            return kind == 1
    return False


def _convert(raw: list[tuple[Any, ...]]) -> None:
    """Append drained C records to _state.records (with _lock held), except
    the profiler's own allocations."""
    cache: dict[tuple[int, int], Frame] = {}  # (id(code), lineno); codes live in `raw`
    kinds: dict[int, int] = {}  # id(code) -> 0 other, 1 this module, 2 a magic's cell
    names = _state.function_names
    tracebacks = _state.tracebacks
    out = []
    for rid, tid, size, n, domain, flags, total, flat in raw:
        if flat and _is_own(flat, kinds):
            continue
        frames = []
        for i in range(len(flat) - 2, -1, -2):  # C gives innermost first
            code, lineno = flat[i], flat[i + 1]
            frame = cache.get((id(code), lineno))
            if frame is None:
                frame = cache[(id(code), lineno)] = Frame(code.co_filename, lineno)
                if frame not in names:
                    names[frame] = code.co_qualname
            frames.append(frame)
        tb = tuple(frames) if frames else (UNKNOWN_FRAME,)
        tb = tracebacks.setdefault(tb, tb)
        domain_name = _DOMAINS[domain] if 0 <= domain < len(_DOMAINS) else str(domain)
        out.append((rid, tb, size, n, tid, domain_name, flags, total))
    _state.records.extend(out)


def _check_rate(sampling_rate: float | None) -> float:
    current = _sampler.sampling_rate()
    if sampling_rate is None:
        return current
    if isinstance(sampling_rate, bool) or not isinstance(sampling_rate, float | int):
        raise TypeError(
            f"sampling_rate: expected a float in (0, 1] per byte, got {sampling_rate!r}"
        )
    rate = float(sampling_rate)
    if not 0.0 < rate <= 1.0:
        raise ValueError(f"sampling_rate: expected a float in (0, 1] per byte, got {rate!r}")
    if rate < current * (1.0 - 1e-12):
        raise ValueError(
            f"memprof.start(sampling_rate={rate:.6g}): the rate is lower than the rate the "
            f"engine samples at for the limits ({current:.6g} per byte, one sample every "
            f"{1 / current:,.0f} bytes on average). The profiler shares the sampler with the "
            f"limits and can only sample more often, as in OCaml memprof-limits: use "
            f"sampling_rate >= {current:.6g}, or omit it."
        )
    return rate


def start(
    sampling_rate: float | None = None,
    max_frames: int = DEFAULT_MAX_FRAMES,
    track_frees: bool = False,
) -> None:
    """Start profiling allocations in every thread.

    ``sampling_rate`` is the probability that a given byte is sampled
    (default: the engine's current rate, 1/80 000 per byte unless
    ``memprof_limits.start`` chose another).  It cannot be lower than the
    engine's current rate -- the limits' rate -- (``ValueError``), as in
    OCaml memprof-limits; a higher rate gives more precise estimates at a
    higher cost, and the engine goes back to its rate at :func:`stop`.

    ``max_frames`` frames (the innermost ones) are kept per sample, 0 to
    :data:`MAX_FRAMES`.  With ``track_frees``, the deallocation of sampled
    blocks is tracked, so that snapshots say which are still alive
    (:meth:`Snapshot.alive`); frees cost a little more meanwhile.

    Starts the engine if needed (it then stays started).  Samples from an
    earlier session are discarded.  Works while limits are in use; samples
    taken in masked regions are recorded too.

    Raises ``RuntimeError`` if already tracing, or if ``track_frees`` is
    asked while another allocator hook (tracemalloc) sits on top of the
    engine's.
    """
    if isinstance(max_frames, bool) or not isinstance(max_frames, int):
        raise TypeError(f"max_frames: expected an int in [0, {MAX_FRAMES}], got {max_frames!r}")
    if not 0 <= max_frames <= MAX_FRAMES:
        raise ValueError(f"max_frames: expected an int in [0, {MAX_FRAMES}], got {max_frames}")
    masked(lambda: _start(sampling_rate, max_frames, bool(track_frees)))


def _start(sampling_rate: float | None, max_frames: int, track_frees: bool) -> None:
    with _lock:
        if _state.running:
            raise RuntimeError("memprof is already tracing; call memprof.stop() first")
        _sampler.ensure_started()
        rate = _check_rate(sampling_rate)
        previous = _sampler.sampling_rate()
        if rate != previous:
            _sampler.set_sampling_rate(rate)
        rc = _c_start(max_frames, int(track_frees))
        if rc:
            if rate != previous:
                _sampler.set_sampling_rate(previous)
            if rc == _ERR_ARG:
                raise ValueError(f"max_frames: expected an int in [0, {MAX_FRAMES}]")
            raise RuntimeError(f"memprof.start(): {_sampler._ERRORS.get(rc, f'error {rc}')}")
        _state.reset()
        _state.started_once = True
        _state.running = True
        _state.rate = rate
        _state.previous_rate = previous if rate != previous else None
        _state.max_frames = max_frames
        _state.track_frees = track_frees


def stop() -> None:
    """Stop profiling and restore the engine's sampling rate.

    The samples stay available: :func:`snapshot` after :func:`stop` returns
    the whole session (with liveness as of the stop), until the next
    :func:`start` or :func:`clear`.  Does nothing if not tracing.
    """
    masked(_stop)


def _stop() -> None:
    with _lock:
        if not _state.running:
            return
        raw: list[tuple[Any, ...]] = []
        live: set[int] = set()
        tracking = bool(lib.ml_memprof_is_tracking())
        _state.dropped = int(lib.ml_memprof_dropped())
        try:
            _c_stop(raw, live)  # appends before returning: nothing is lost on error
        finally:
            _state.running = False
            _convert(raw)
            if _state.track_frees:
                _state.tracking_lost = not tracking
                _state.live_at_stop = live
            if _state.previous_rate is not None and _sampler.sampling_rate() == _state.rate:
                _sampler.set_sampling_rate(_state.previous_rate)
            _state.previous_rate = None


def is_tracing() -> bool:
    """Whether the profiler is recording samples."""
    return _state.running


def get_sampling_rate() -> float | None:
    """The profiler's sampling rate (per byte), or ``None`` if not tracing."""
    return _state.rate if _state.running else None


def get_traceback_limit() -> int:
    """The ``max_frames`` of the current (or last) session."""
    return _state.max_frames


def clear() -> None:
    """Forget the samples taken so far (the profiler keeps running)."""

    def clear_() -> None:
        with _lock:
            _c_discard()
            _state.records = []
            _state.tracebacks = {}
            _state.live_at_stop = set() if _state.track_frees else None

    masked(clear_)


def snapshot() -> Snapshot:
    """The samples taken since :func:`start`, as a :class:`Snapshot`.

    Works while tracing and after :func:`stop` (then it holds the whole last
    session).  Raises ``RuntimeError`` if the profiler was never started.
    """

    def take() -> tuple[list[Any], set[int] | None, dict[str, Any]]:
        with _lock:
            if not _state.started_once:
                raise RuntimeError("memprof was never started: call memprof.start() first")
            live: set[int] | None = None
            if _state.running:
                raw: list[tuple[Any, ...]] = []
                try:
                    _c_drain(raw)
                finally:
                    _convert(raw)
                if _state.track_frees:
                    if lib.ml_memprof_is_tracking():
                        live = set()
                        _c_live_ids(live)
                    else:
                        _state.tracking_lost = True
                _state.dropped = int(lib.ml_memprof_dropped())
            elif _state.track_frees and not _state.tracking_lost:
                live = _state.live_at_stop
            meta = {
                "sampling_rate": _state.rate,
                "max_frames": _state.max_frames,
                "track_frees": _state.track_frees,
                "function_names": dict(_state.function_names),
                "dropped_samples": _state.dropped,
            }
            return list(_state.records), live, meta

    records, live, meta = masked(take)
    samples = [
        Sample(
            traceback=tb,
            size_bytes=size,
            n_samples=n,
            thread_id=tid,
            domain=domain,
            alive=(rid in live) if (live is not None and flags & _TRACKED) else None,
            total_nframe=total,
            sample_id=rid,
        )
        for rid, tb, size, n, tid, domain, flags, total in records
    ]
    names = {t.ident: t.name for t in threading.enumerate() if t.ident is not None}
    return Snapshot(samples, thread_names=names, **meta)


class Session:
    """What :func:`tracing` gives: the snapshot taken when the block ends."""

    snapshot: Snapshot | None = None


def tracing(
    sampling_rate: float | None = None,
    max_frames: int = DEFAULT_MAX_FRAMES,
    track_frees: bool = False,
) -> resource[Session]:
    """Profile a ``with`` block; its snapshot is in the session afterwards.

    Start and stop run masked (``memprof_limits.resource``): the profiler is
    stopped even if an interrupt ends the block.

    >>> from memprof_limits import memprof
    >>> with memprof.tracing() as session:
    ...     data = bytearray(10**6)
    >>> session.snapshot.n_samples >= 0
    True
    """

    def acquire() -> Session:
        start(sampling_rate, max_frames, track_frees)
        return Session()

    def release(session: Session) -> None:
        stop()
        session.snapshot = snapshot()

    return resource(acquire, release)


@atexit.register
def _stop_at_exit() -> None:
    if _state.running:
        stop()


# --------------------------------------------------------------------------
# IPython magic: %memprof / %%memprof.

_last_magic_snapshot: Snapshot | None = None
_magic_counter = 0
MAGIC_DEFAULT_RATE: Final = 1 / 8000
"""The magic's default rate: 10x the engine's default, for short cells."""


def last_magic_snapshot() -> Snapshot | None:
    """The snapshot of the last ``%memprof``/``%%memprof`` run, if any."""
    return _last_magic_snapshot


def _cell_statistics(snap: Snapshot, filename: str) -> list[Statistic]:
    """Group samples by the innermost frame that is in ``filename``."""
    groups: dict[tuple[Frame, ...], list[Any]] = {}
    for s in snap.samples:
        frame = next((f for f in reversed(s.traceback) if f.filename == filename), None)
        if frame is not None:
            acc = groups.setdefault((frame,), [0, 0.0])
            acc[0] += s.n_samples
            acc[1] += 1.0 / _inclusion_probability(s.size_bytes, snap.sampling_rate)
    stats = [snap._statistic(tb, n, count) for tb, (n, count) in groups.items()]
    stats.sort(reverse=True, key=Statistic._sort_key)
    return stats


def _run_profiled(
    shell: Any, source: str, *, rate: float | None, max_frames: int, track: bool
) -> tuple[Any, Snapshot]:
    """Run ``source`` in the shell's namespace under the profiler."""
    global _magic_counter
    _magic_counter += 1
    filename = f"{_CELL_PREFIX}{_magic_counter}>"
    transformed = shell.transform_cell(source) if hasattr(shell, "transform_cell") else source
    linecache.cache[filename] = (len(transformed), None, transformed.splitlines(True), filename)
    tree = ast.parse(transformed, filename, "exec")
    last_expr = None
    if tree.body and isinstance(last := tree.body[-1], ast.Expr):
        tree.body.pop()
        last_expr = ast.Expression(last.value)
    body = compile(tree, filename, "exec")
    expr = compile(last_expr, filename, "eval") if last_expr is not None else None
    ns = shell.user_ns
    result: list[Any] = [None]

    with tracing(rate, max_frames, track) as session:
        try:
            exec(body, ns)
            if expr is not None:
                result[0] = eval(expr, ns)
        except Exception:
            shell.showtraceback()
    assert session.snapshot is not None
    return result[0], session.snapshot


def _print_report(snap: Snapshot, filename: str, top: int) -> None:
    print(
        f"memprof: ~{format_bytes(snap.total_size())} allocated, estimated from "
        f"{snap.n_samples} samples (one per {format_bytes(1 / snap.sampling_rate)} on average)"
    )
    cell = _cell_statistics(snap, filename)
    if cell:
        print("Top lines of the cell (the allocations they caused, callees included):")
        for stat in cell[:top]:
            line = stat.traceback[0].lineno
            source = linecache.getline(filename, line).strip()
            print(
                f"  line {line:>4}: {format_bytes(stat.size):>10} "
                f"(95% CI {format_bytes(stat.size_low)} .. {format_bytes(stat.size_high)}), "
                f"{stat.n_samples} samples | {source}"
            )
    sites = snap.statistics("lineno")
    if sites:
        print("Top allocation sites (innermost line):")
        for stat in sites[:top]:
            frame = stat.traceback[-1]
            where = "cell" if frame.filename == filename else frame.filename
            print(
                f"  {where}:{frame.lineno} in {snap.function_name(frame)}: "
                f"{format_bytes(stat.size)} ({stat.n_samples} samples)"
            )
    if not snap.samples:
        print("(no sample: the code allocated less than the sampling period; use -r to raise it)")


def _parse_rate(text: str) -> float:
    if "/" in text:
        num, den = text.split("/", 1)
        return float(num) / float(den)
    return float(text)


_MAGIC_VALUES: Final = {
    "-n": "top",
    "--top": "top",
    "-r": "rate",
    "--rate": "rate",
    "-f": "frames",
    "--frames": "frames",
    "--speedscope": "speedscope",
    "--collapsed": "collapsed",
}
_MAGIC_FLAGS: Final = {"--track": "track"}
_MAGIC_USAGE: Final = (
    "usage: %memprof [-n TOP] [-r RATE] [-f FRAMES] [--track] [--speedscope PATH] "
    "[--collapsed PATH] [--] statement\n"
    "   or: %%memprof [options] on the first line of a cell"
)


def _parse_magic_line(line: str) -> tuple[dict[str, str], str]:
    """Leading options of a magic line, and the rest (the statement)."""
    opts: dict[str, str] = {}
    rest = line.strip()
    while rest.startswith("-"):
        token, _, tail = rest.partition(" ")
        if token == "--":
            return opts, tail.strip()
        name, eq, value = token.partition("=")
        if name in _MAGIC_FLAGS and not eq:
            opts[_MAGIC_FLAGS[name]] = "1"
        elif name in _MAGIC_VALUES:
            if not eq:
                value, _, tail = tail.strip().partition(" ")
            if not value:
                raise ValueError(f"option {name} needs a value")
            opts[_MAGIC_VALUES[name]] = value
        else:
            raise ValueError(f"unknown option {name!r} (use -- before a statement starting with -)")
        rest = tail.strip()
    return opts, rest


def memprof_magic(shell: Any, line: str, cell: str | None = None) -> Any:
    """``%memprof`` / ``%%memprof`` in ``shell`` (see :func:`load_ipython_extension`)."""
    global _last_magic_snapshot
    try:
        opts, stmt = _parse_magic_line(line)
        top = int(opts.get("top", 10))
        rate = (
            _parse_rate(opts["rate"])
            if "rate" in opts
            else max(MAGIC_DEFAULT_RATE, _sampler.sampling_rate())
        )
        frames = int(opts.get("frames", DEFAULT_MAX_FRAMES))
    except ValueError as e:
        print(f"%memprof: {e}\n{_MAGIC_USAGE}")
        return None
    source = cell if cell is not None else stmt
    if not source.strip():
        print(_MAGIC_USAGE)
        return None
    if is_tracing():
        print("%memprof: the profiler is already running (memprof.stop() it first)")
        return None
    value, snap = _run_profiled(shell, source, rate=rate, max_frames=frames, track="track" in opts)
    _last_magic_snapshot = snap
    _print_report(snap, f"{_CELL_PREFIX}{_magic_counter}>", top)
    if "speedscope" in opts:
        snap.to_speedscope(opts["speedscope"])
        print(f"speedscope profile written to {opts['speedscope']}")
    if "collapsed" in opts:
        snap.to_collapsed(opts["collapsed"])
        print(f"collapsed stacks written to {opts['collapsed']}")
    return value


def load_ipython_extension(ipython: Any) -> None:
    """Register ``%memprof`` (line) and ``%%memprof`` (cell) in ``ipython``.

    ``%load_ext memprof_limits.memprof``, then::

        %%memprof [-n TOP] [-r RATE] [-f FRAMES] [--track] [--speedscope PATH]
                  [--collapsed PATH]
        <cell>

    runs the cell under the profiler (at ``RATE``, such as ``1/8000``;
    default 1/8000 per byte, or the engine's rate if higher) and prints the
    lines of the cell that allocated most (with what the functions they call
    allocated), then the top allocation sites.  ``%memprof statement`` does
    the same for one statement and returns its value.  The snapshot is kept
    in :func:`last_magic_snapshot`.  (IPython is not imported here: the
    magic is registered through the shell it is given.)

    >>> class FakeShell:
    ...     def register_magic_function(self, fn, magic_kind, magic_name):
    ...         print(magic_kind, magic_name)
    >>> load_ipython_extension(FakeShell())
    line_cell memprof
    """

    def magic(line: str, cell: str | None = None) -> Any:
        return memprof_magic(ipython, line, cell)

    magic.__doc__ = load_ipython_extension.__doc__
    ipython.register_magic_function(magic, magic_kind="line_cell", magic_name="memprof")
