"""The profiler's session: start, stop, snapshot, tracing."""

from __future__ import annotations

import atexit
import ctypes
import os
import threading
from typing import Any, Final

from .. import _sampler
from .._masking import masked, resource
from .._sampler import lib, native_function
from ._records import (
    _DOMAINS,
    _ERR_ARG,
    _TRACKED,
    DEFAULT_MAX_FRAMES,
    MAX_FRAMES,
    UNKNOWN_FRAME,
    Frame,
    Sample,
)
from ._snapshot import Snapshot

# --------------------------------------------------------------------------
# Native side, through _sampler (the one importer of the compiled module).

_c_start = native_function("ml_memprof_start", ctypes.c_int, ctypes.c_int, ctypes.c_int)
_c_stop = native_function("ml_memprof_stop", ctypes.c_int, ctypes.py_object, ctypes.py_object)
_c_drain = native_function("ml_memprof_drain", ctypes.c_int, ctypes.py_object)
_c_live_ids = native_function("ml_memprof_live_ids", ctypes.c_int, ctypes.py_object)
_c_discard = native_function("ml_memprof_discard", None)


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


_OWN_DIR: Final = os.path.dirname(__file__) + os.sep  # (the package's modules)
_CELL_PREFIX: Final = "<memprof-cell-"


def _is_own(flat: tuple[Any, ...], kinds: dict[int, int]) -> bool:
    """Whether a sample was allocated by the profiler's code: a frame of this
    package comes before (inside) any frame of user code that it runs (the
    magic's cells).  The profiler's own allocations are not the user's."""
    for i in range(0, len(flat), 2):
        code = flat[i]
        kind = kinds.get(id(code))
        if kind is None:
            name = code.co_filename
            kind = kinds[id(code)] = (
                1 if name.startswith(_OWN_DIR) else 2 if name.startswith(_CELL_PREFIX) else 0
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
