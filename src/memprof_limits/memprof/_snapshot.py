"""A snapshot of the profiler's samples, and its statistics."""

from __future__ import annotations

import json
import linecache
import math
import os
import pickle
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from .._units import format_bytes
from ..stats import _inclusion_probability, poisson_interval
from ._records import UNKNOWN_FRAME, Frame, KeyType, Sample, Statistic, StatisticDiff

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
