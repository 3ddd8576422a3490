"""The profiler's C side (native/memprof.c) through its raw API.

The [GIL] functions are reached through ctypes.PyDLL, as memprof_limits.memprof does;
the counters through cffi.  These tests check the record format, that every
strong reference taken in a hook is released, the table of tracked blocks,
the error codes, and that concurrent threads (RAW hooks without the GIL,
frees, drains) do not corrupt anything.
"""

from __future__ import annotations

import ctypes
import sys
import threading
import time
from collections.abc import Iterator
from types import CodeType
from typing import Any

import pytest
from memprof_limits._native import ffi, lib

import memprof_limits as ml
from memprof_limits import _native as native  # type: ignore[attr-defined]
from memprof_limits import _native_testing as nt  # type: ignore[attr-defined]
from memprof_limits import memprof
from tests.conftest import run_python

_dll = ctypes.PyDLL(native.__file__)


def _fn(name: str, restype: Any, *argtypes: Any) -> Any:
    f = getattr(_dll, name)
    f.restype = restype
    f.argtypes = list(argtypes)
    return f


c_start = _fn("ml_memprof_start", ctypes.c_int, ctypes.c_int, ctypes.c_int)
c_stop = _fn("ml_memprof_stop", ctypes.c_int, ctypes.py_object, ctypes.py_object)
c_drain = _fn("ml_memprof_drain", ctypes.c_int, ctypes.py_object)
c_live_ids = _fn("ml_memprof_live_ids", ctypes.c_int, ctypes.py_object)
c_discard = _fn("ml_memprof_discard", None)
ALLOCATED = nt.ffi.cast("int64_t(*)(void)", ffi.cast("void *", ffi.addressof(lib, "ml_allocated")))
MIB = 2**20


@pytest.fixture(autouse=True)
def _engine() -> Iterator[None]:
    if memprof.is_tracing():
        memprof.stop()
    ml.start()
    yield
    if lib.ml_memprof_is_enabled():
        c_stop(None, None)
    c_discard()


def drain() -> list[tuple[Any, ...]]:
    records: list[tuple[Any, ...]] = []
    assert c_drain(records) == len(records)
    return records


def test_records_have_the_documented_shape() -> None:
    assert c_start(8, 0) == ml_ok()
    data = bytearray(MIB)  # ~13 samples: P[none] = exp(-13)
    records = drain()
    assert c_stop(None, None) == ml_ok()
    mine = [r for r in records if r[2] == MIB + 1]  # bytearray asks for one more byte
    assert len(mine) == 1
    _, thread_id, _, n_samples, domain, flags, total_nframe, frames = mine[0]
    assert thread_id == threading.get_ident()
    assert n_samples >= 1 and domain in (1, 2)  # MEM or OBJ
    assert flags == 0  # not tracked, GIL held
    assert len(frames) % 2 == 0 and 0 < len(frames) // 2 <= 8
    assert total_nframe >= len(frames) // 2
    code, lineno = frames[0], frames[1]  # innermost first
    here = sys._getframe().f_code
    assert code is here and lineno == here.co_firstlineno + 2
    assert all(isinstance(c, CodeType) for c in frames[::2])
    assert [r[0] for r in records] == sorted(r[0] for r in records)
    assert len(data) == MIB


def test_counters_and_buffer_are_emptied_by_a_drain() -> None:
    assert c_start(4, 0) == ml_ok()
    data = [bytearray(1000) for _ in range(5000)]
    pending = lib.ml_memprof_pending_records()
    assert pending > 10
    assert lib.ml_memprof_buffer_bytes() >= 256 * 1024
    records = drain()
    assert len(records) >= pending  # the drain itself is not recorded
    assert lib.ml_memprof_pending_records() == 0
    assert lib.ml_memprof_buffer_bytes() == 0
    assert lib.ml_memprof_dropped() == 0
    assert c_stop(None, None) == ml_ok()
    assert len(data) == 5000


def allocate_here(n: int) -> list[bytearray]:
    return [bytearray(1000) for _ in range(n)]


def test_code_references_are_released_by_drain_discard_and_start() -> None:
    codes = [
        allocate_here.__code__,
        *(c for c in allocate_here.__code__.co_consts if isinstance(c, CodeType)),
    ]
    before = [sys.getrefcount(c) for c in codes]
    assert c_start(4, 0) == ml_ok()
    allocate_here(20_000)
    assert sum(sys.getrefcount(c) for c in codes) > sum(before)  # records hold references
    c_discard()
    assert [sys.getrefcount(c) for c in codes] == before
    allocate_here(20_000)
    records = drain()
    assert records
    del records
    assert [sys.getrefcount(c) for c in codes] == before
    allocate_here(20_000)
    assert c_stop(None, None) == ml_ok()
    assert c_start(4, 0) == ml_ok()  # start discards what the last session left
    assert c_stop(None, None) == ml_ok()
    c_discard()
    assert [sys.getrefcount(c) for c in codes] == before


def test_tracked_blocks_follow_frees() -> None:
    assert c_start(1, 1) == ml_ok()
    assert lib.ml_memprof_is_tracking() == 1
    blocks = [bytearray(MIB) for _ in range(20)]  # each buffer is sampled for sure
    live: set[int] = set()
    tracked = lib.ml_memprof_tracked_blocks()
    assert tracked >= 20
    n = c_live_ids(live)
    # Every allocation is sampled: the set's own growth while it is filled may add blocks.
    assert n == len(live) and tracked <= n <= tracked + 8, (n, tracked, len(live))
    records = {r[0]: r for r in drain()}
    big = [rid for rid, r in records.items() if r[2] == MIB + 1]
    assert len(big) == 20 and set(big) <= live
    assert all(records[rid][5] & lib.ML_MEMPROF_TRACKED for rid in big)
    del blocks
    # (Other threads' allocations are sampled too meanwhile: the same allowance as above.)
    assert lib.ml_memprof_tracked_blocks() <= tracked - 20 + 8
    live_after: set[int] = set()
    c_live_ids(live_after)
    assert not set(big) & live_after
    out: set[int] = set()
    assert c_stop(None, out) == ml_ok()
    assert lib.ml_memprof_is_tracking() == 0
    assert lib.ml_memprof_tracked_blocks() == 0


def test_realloc_of_a_tracked_block_marks_it_dead() -> None:
    assert c_start(1, 1) == ml_ok()
    buf = bytearray(MIB)
    (rid,) = [r[0] for r in drain() if r[2] == MIB + 1]
    live: set[int] = set()
    c_live_ids(live)
    assert rid in live
    buf.extend(b"x" * MIB)  # realloc
    live = set()
    c_live_ids(live)
    assert rid not in live
    assert c_stop(None, None) == ml_ok()
    assert len(buf) == 2 * MIB


def test_error_codes() -> None:
    assert c_start(-1, 0) == lib.ML_MEMPROF_ERR_ARG
    assert c_start(lib.ML_MEMPROF_MAX_FRAMES + 1, 0) == lib.ML_MEMPROF_ERR_ARG
    assert c_stop(None, None) == lib.ML_ERR_NOT_STARTED
    assert c_start(4, 0) == ml_ok()
    assert c_start(4, 0) == lib.ML_ERR_ALREADY_STARTED
    assert c_stop(None, None) == ml_ok()
    ml.stop()
    try:
        assert c_start(4, 0) == lib.ML_ERR_NOT_STARTED
        assert lib.ml_memprof_is_enabled() == 0
    finally:
        ml.start()


def test_max_frames_zero_records_no_frames() -> None:
    assert c_start(0, 0) == ml_ok()
    data = bytearray(MIB)
    records = drain()
    assert c_stop(None, None) == ml_ok()
    (rec,) = [r for r in records if r[2] == MIB + 1]
    assert rec[7] == () and rec[6] >= 1  # frames counted, none kept
    assert len(data) == MIB


def test_threads_hooks_without_the_gil_and_drains_concurrently() -> None:
    """Python threads allocating and freeing, C loops allocating in the RAW
    domain without the GIL, tracking on, and the main thread draining and
    listing live blocks at the same time: every record is well-formed and
    the counters end at zero."""
    ml.stop()
    ml.start(1 / 4000)  # many samples
    assert c_start(16, 1) == ml_ok()
    stop = threading.Event()
    idents: set[int] = set()
    errors: list[BaseException] = []

    def python_churn() -> None:
        idents.add(threading.get_ident())
        try:
            while not stop.is_set():
                keep = [bytearray(300) for _ in range(2000)]
                del keep[::2]
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    def raw_churn() -> None:
        idents.add(threading.get_ident())
        while not stop.is_set():
            nt.lib.mlt_measure_loop(ALLOCATED, nt.lib.MLT_RAW, 4096, 2000)

    threads = [threading.Thread(target=python_churn) for _ in range(2)]
    threads += [threading.Thread(target=raw_churn) for _ in range(2)]
    for t in threads:
        t.start()
    records: list[tuple[Any, ...]] = []
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline:
        records += drain()
        live: set[int] = set()
        assert c_live_ids(live) >= 0
        time.sleep(0.01)
    stop.set()
    for t in threads:
        t.join()
    out: list[tuple[Any, ...]] = []
    assert c_stop(out, set()) == ml_ok()
    records += out
    ml.stop()
    ml.start()
    assert not errors
    assert len(records) > 1000
    ids = [r[0] for r in records]
    assert len(set(ids)) == len(ids)
    no_gil = [r for r in records if r[5] & lib.ML_MEMPROF_NO_GIL]
    assert no_gil and all(r[7] == () and r[4] == 0 for r in no_gil)
    assert {r[1] for r in records} & idents
    assert all(r[3] >= 1 and r[2] > 0 for r in records)
    assert lib.ml_memprof_tracked_blocks() == 0
    assert lib.ml_memprof_pending_records() == 0


def test_forked_child_profiles_while_the_parent_had_threads_in_hooks() -> None:
    """A thread allocating in the RAW domain without the GIL holds the
    profiler's lock about 1.5 % of the time: a fork then copies a locked
    lock.  The child re-initialises it (pthread_atfork); without that, about
    3 children in 200 hang (measured), so 150 forks catch a regression with
    probability ~0.9."""
    proc = run_python(
        """
        import os, threading, time, warnings
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads
        import memprof_limits as ml
        from memprof_limits import _native, memprof
        from memprof_limits import _native_testing as nt
        ml.start(1 / 4000)
        memprof.start(sampling_rate=1 / 4000, track_frees=True)
        stop = threading.Event()
        allocated = nt.ffi.cast(
            "int64_t(*)(void)",
            _native.ffi.cast("void *", _native.ffi.addressof(_native.lib, "ml_allocated")),
        )
        def raw_churn():
            while not stop.is_set():
                nt.lib.mlt_measure_loop(allocated, nt.lib.MLT_RAW, 4096, 10000)
        def python_churn():
            while not stop.is_set():
                [bytearray(100) for _ in range(1000)]
        threads = [threading.Thread(target=raw_churn), threading.Thread(target=python_churn)]
        for t in threads:
            t.start()
        hung = failed = 0
        for i in range(150):
            pid = os.fork()
            if pid == 0:
                memprof.clear()  # takes the lock; the parent's records are not ours
                if i % 10 == 0:
                    data = [bytearray(1000) for _ in range(2000)]
                    if not memprof.snapshot().samples:
                        os._exit(3)
                    memprof.stop()
                os._exit(0)
            deadline = time.monotonic() + 10
            while True:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    failed += os.waitstatus_to_exitcode(status) != 0
                    break
                if time.monotonic() > deadline:
                    hung += 1
                    os.kill(pid, 9)
                    os.waitpid(pid, 0)
                    break
                time.sleep(0.002)
            memprof.clear()
        stop.set()
        for t in threads:
            t.join()
        memprof.stop()
        print("hung", hung, "failed", failed)
        """,
        timeout=300,
    )
    assert "hung 0 failed 0" in proc.stdout


def ml_ok() -> int:
    return int(lib.ML_OK)
