"""The profiler's records: frames, samples, statistics."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal, NamedTuple

from .._sampler import lib
from .._units import format_bytes

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
