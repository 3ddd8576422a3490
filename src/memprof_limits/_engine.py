"""Public face of the engine: start, stop, exact allocation counts."""

from __future__ import annotations

from . import _delivery, _sampler

__all__ = ["allocated_bytes", "is_started", "sampling_rate", "start", "stop"]


def start(sampling_rate: float = _sampler.DEFAULT_SAMPLING_RATE, *, seed: int = 0) -> None:
    """Start the engine: hook CPython's allocators (RAW, MEM and OBJ domains).

    The first use of any limit starts it with the defaults, so calling this
    is only needed to choose ``sampling_rate`` (probability that a given
    byte is sampled; default 1/80 000 per byte, i.e. 1e-4 per 8-byte word as
    in OCaml's memprof) or ``seed`` (sample positions are reproducible for a
    given seed).  Calling it again with the same rate does nothing.

    >>> import memprof_limits as ml
    >>> ml.start(); ml.is_started()
    True
    """
    _sampler.start(sampling_rate, seed=seed)


def stop() -> None:
    """Stop the engine and restore the allocators exactly as they were.

    Raises ``RuntimeError`` if another hook (``tracemalloc.start()``) was
    installed after ours (stop that one first), or while tasks run under
    limits in any thread (stopping would let them run past their limits).

    >>> import memprof_limits as ml
    >>> ml.stop(); ml.is_started()
    False
    >>> ml.start()
    """

    def refuse() -> str | None:
        running = _delivery.running_tasks()
        if not running:
            return None
        return (
            f"{running} thread(s) are running tasks under limits; stopping the engine "
            "now would let them run past their limits -- stop it after they end"
        )

    _sampler.stop(refuse)


def is_started() -> bool:
    """Whether the allocator hooks are installed.

    >>> import memprof_limits as ml
    >>> ml.start(); ml.is_started()
    True"""
    return _sampler.is_started()


def sampling_rate() -> float:
    """The current sampling rate, per byte.

    >>> import memprof_limits as ml
    >>> ml.start(); ml.sampling_rate()
    1.25e-05"""
    return _sampler.sampling_rate()


def allocated_bytes() -> int:
    """Exact bytes requested by the current thread since the engine started.

    Counts every ``malloc``/``calloc`` through CPython's PyMem and PyObject
    allocators (``realloc`` counts the new size).  Objects served from
    CPython's free lists (small floats, tuples, frames) are not allocations
    and are not counted.  Returns 0 if the engine is not started.

    >>> import memprof_limits as ml
    >>> ml.start()
    >>> before = ml.allocated_bytes()
    >>> data = bytearray(10**6)
    >>> ml.allocated_bytes() - before >= 10**6
    True
    """
    return _sampler.allocated_bytes()
