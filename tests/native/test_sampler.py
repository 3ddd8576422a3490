"""The native sampler: exact counts, sampling law, life cycle, threads."""

from __future__ import annotations

import importlib.util
import itertools
import math
import random
import threading
import time

import pytest
from memprof_limits._native import ffi, lib

import memprof_limits as ml
from memprof_limits import _native_testing as nt
from memprof_limits import _sampler
from tests.conftest import run_python

ALLOCATED = nt.ffi.cast("int64_t(*)(void)", ffi.cast("void *", ffi.addressof(lib, "ml_allocated")))
DOMAINS = {"raw": nt.lib.MLT_RAW, "mem": nt.lib.MLT_MEM, "obj": nt.lib.MLT_OBJ}
SIZES = [1, 8, 100, 512, 513, 4096, 65536, 10**6]


@pytest.fixture(autouse=True)
def _started() -> None:
    ml.start()


@pytest.mark.parametrize("domain", DOMAINS)
@pytest.mark.parametrize("size", SIZES)
def test_malloc_and_calloc_are_counted_exactly(domain: str, size: int) -> None:
    """Each domain counts exactly the requested bytes: no double count when
    pymalloc falls back to RAW for blocks > 512 bytes."""
    d = DOMAINS[domain]
    assert nt.lib.mlt_measure(ALLOCATED, d, nt.lib.MLT_MALLOC, size, 0) == size
    assert nt.lib.mlt_measure(ALLOCATED, d, nt.lib.MLT_CALLOC, size, 0) == size


@pytest.mark.parametrize("domain", DOMAINS)
def test_realloc_counts_the_new_size(domain: str) -> None:
    d = DOMAINS[domain]
    assert nt.lib.mlt_measure(ALLOCATED, d, nt.lib.MLT_REALLOC, 100, 5000) == 5100
    assert nt.lib.mlt_measure(ALLOCATED, d, nt.lib.MLT_REALLOC, 5000, 100) == 5100


def test_loop_counts_are_exact_across_many_samples() -> None:
    """10^5 allocations cross ~hundreds of samples: still exact to the byte."""
    assert nt.lib.mlt_measure_loop(ALLOCATED, nt.lib.MLT_OBJ, 1000, 100_000) == 10**8
    assert _sampler.samples() > 0


def test_python_level_allocations_are_counted() -> None:
    before = ml.allocated_bytes()
    data = bytearray(10**6)
    assert ml.allocated_bytes() - before >= len(data)


def test_concurrent_threads_do_not_mix_counts() -> None:
    """RAW allocations run without the GIL: two threads really allocate at
    the same time, and each counts exactly its own bytes."""
    results: dict[int, int] = {}

    def work(size: int) -> None:
        results[size] = nt.lib.mlt_measure_loop(ALLOCATED, nt.lib.MLT_RAW, size, 200_000)

    threads = [threading.Thread(target=work, args=(s,)) for s in (24, 1000)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {24: 24 * 200_000, 1000: 1000 * 200_000}


def test_python_threads_count_their_own_allocations() -> None:
    def f() -> int:
        before = ml.allocated_bytes()
        for _ in range(20):
            "-".join(str(i) for i in range(2000))
        return ml.allocated_bytes() - before

    f()  # warm up
    solo = f()
    deltas: list[int] = []
    threads = [threading.Thread(target=lambda: deltas.append(f())) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # Within 1 %: free lists are shared between threads (documented).
    assert all(abs(d - solo) <= solo // 100 for d in deltas), (solo, deltas)


def test_exited_threads_leave_nothing_behind() -> None:
    base = lib.ml_registered_threads()
    threads = [threading.Thread(target=lambda: [str(i) for i in range(1000)]) for _ in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # join() returns before the pthread exits and runs its TLS destructors.
    deadline = time.monotonic() + 10
    while lib.ml_registered_threads() > base and time.monotonic() < deadline:
        time.sleep(0.01)
    assert lib.ml_registered_threads() <= base


def _gaps_ks_distance(gaps: list[int], rate: float) -> float:
    """Kolmogorov-Smirnov distance between gaps and Geometric(rate)."""
    gaps = sorted(gaps)
    n = len(gaps)
    d = 0.0
    for i, g in enumerate(gaps):
        cdf = 1 - (1 - rate) ** g
        d = max(d, abs(cdf - (i + 1) / n), abs(cdf - i / n))
    return d


def test_sample_gaps_are_geometric() -> None:
    """Gaps between samples follow Geometric(rate) (KS test, fixed seed)."""
    rate = 1 / 1000
    ml.stop()
    ml.start(sampling_rate=rate, seed=12345)
    try:
        done = _sampler.record_samples(20_000)
        nt.lib.mlt_alloc_loop(nt.lib.MLT_OBJ, 64, 400_000)
        positions = done()
    finally:
        ml.stop()
        ml.start()
    gaps = [b - a for a, b in itertools.pairwise(positions)]
    assert len(gaps) > 15_000
    mean = sum(gaps) / len(gaps)
    sd_of_mean = math.sqrt((1 - rate) / rate**2 / len(gaps))
    assert abs(mean - 1 / rate) < 4 * sd_of_mean
    # Critical value for alpha = 0.001 is 1.95 / sqrt(n).
    assert _gaps_ks_distance(gaps, rate) < 1.95 / math.sqrt(len(gaps))
    # ... and the test can tell: gaps of twice the rate are rejected.
    assert _gaps_ks_distance(gaps, 2 * rate) > 1.95 / math.sqrt(len(gaps))


def test_bytes_to_first_sample_after_a_threshold_are_geometric() -> None:
    """Memorylessness, the basis of docs/statistical.md: over many seeds, the
    bytes from a fixed position to the next sample are Geometric(rate)."""
    rate = 1 / 4000
    threshold = 50_000
    distances = []
    try:
        for seed in range(300):
            ml.stop()
            ml.start(sampling_rate=rate, seed=seed)
            done = _sampler.record_samples(200)
            nt.lib.mlt_alloc_loop(nt.lib.MLT_OBJ, 100, 2000)
            after = [p for p in done() if p >= threshold]
            distances.append(after[0] - threshold + 1)
    finally:
        ml.stop()
        ml.start()
    assert _gaps_ks_distance(distances, rate) < 1.95 / math.sqrt(len(distances))


def test_same_seed_gives_same_sample_positions() -> None:
    positions = []
    try:
        for _ in range(2):
            ml.stop()
            ml.start(sampling_rate=1 / 500, seed=7)
            done = _sampler.record_samples(100)
            nt.lib.mlt_alloc_loop(nt.lib.MLT_OBJ, 50, 2000)
            positions.append(done())
    finally:
        ml.stop()
        ml.start()
    assert positions[0] == positions[1] and len(positions[0]) > 50


def test_counts_are_deterministic_across_processes() -> None:
    code = """
        import memprof_limits as ml, json
        ml.start()
        def work():
            d = {}
            for i in range(5000):
                d["k%d" % i] = [i, str(i), (i, i)]
            return json.dumps(d)
        work()
        before = ml.allocated_bytes()
        work()
        print(ml.allocated_bytes() - before)
    """
    env = {"PYTHONHASHSEED": "0"}
    a = run_python(code, env=env).stdout
    b = run_python(code, env=env).stdout
    assert a == b and int(a) > 100_000


def test_stop_refuses_when_another_hook_is_on_top() -> None:
    import tracemalloc

    tracemalloc.start()
    try:
        with pytest.raises(RuntimeError, match="tracemalloc"):
            ml.stop()
        assert ml.is_started()
    finally:
        tracemalloc.stop()
    ml.stop()
    assert not ml.is_started()
    before = ml.allocated_bytes()
    bytearray(10**6)
    assert ml.allocated_bytes() == before  # nothing counts once stopped
    ml.start()


def test_restart_counts_from_zero() -> None:
    ml.stop()
    ml.start()
    assert ml.allocated_bytes() < 10_000
    ml.stop()
    ml.start(sampling_rate=1 / 1000)
    with pytest.raises(RuntimeError, match="already started"):
        ml.start(sampling_rate=1 / 2000)
    ml.stop()
    ml.start()


def test_bad_start_arguments() -> None:
    ml.stop()
    try:
        for bad in (0, -1.0, 2.0, float("nan")):
            with pytest.raises(ValueError, match=r"\(0, 1\]"):
                ml.start(sampling_rate=bad)
        with pytest.raises(TypeError):
            ml.start(sampling_rate="fast")  # type: ignore[arg-type]
    finally:
        ml.start()


def test_start_stop_1000_times_with_threads_allocating() -> None:
    run_python(
        """
        import threading, memprof_limits as ml
        stop = False
        def churn():
            while not stop:
                [str(i) for i in range(100)]
        threads = [threading.Thread(target=churn) for _ in range(2)]
        for t in threads: t.start()
        for i in range(1000):
            ml.start(seed=i)
            [bytes(100) for _ in range(10)]
            ml.stop()
        stop = True
        for t in threads: t.join()
        print("ok")
        """,
        timeout=240,
    )


def test_shutdown_with_engine_running_and_threads_allocating() -> None:
    proc = run_python(
        """
        import sys, threading, memprof_limits as ml
        ml.start()
        def churn():
            while True:
                [str(i) for i in range(100)]
        for _ in range(3):
            threading.Thread(target=churn, daemon=True).start()
        ml.limit_allocations(lambda: [0] * 1000, limit="1 MB")
        sys.exit(7)
        """,
        check=False,
    )
    assert proc.returncode == 7, proc.stderr
    assert "Fatal" not in proc.stderr and "Segmentation" not in proc.stderr


def test_hook_never_calls_the_c_api_budget_zero_current_frames() -> None:
    """Regression: arming from the hook with PyThreadState_SetAsyncExc
    deadlocks inside sys._current_frames() (HEAD_LOCK held while it
    allocates).  A budget of 0 makes the very first allocation there arm."""
    proc = run_python(
        """
        import sys, memprof_limits as ml
        for _ in range(100):
            r = ml.limit_allocations(sys._current_frames, limit=0)
            assert isinstance(r, ml.Error), r
        print("ok")
        """,
        timeout=60,
    )
    assert proc.stdout.strip() == "ok"


@pytest.mark.skipif(importlib.util.find_spec("numpy") is None, reason="NumPy is not installed")
def test_numpy_buffers_are_counted() -> None:
    import numpy as np

    with ml.LimitScope(allocations=10**12) as scope:  # patches NumPy on first scope
        x = np.ones(10**6)
    assert scope.allocated_bytes is not None and scope.allocated_bytes >= x.nbytes
    before = ml.allocated_bytes()
    y = np.zeros(10**6)
    assert ml.allocated_bytes() - before >= y.nbytes


def test_random_sizes_sum_exactly() -> None:
    rng = random.Random(5)
    for _ in range(200):
        d = rng.choice(list(DOMAINS.values()))
        n = rng.randrange(1, 200_000)
        assert nt.lib.mlt_measure(ALLOCATED, d, nt.lib.MLT_MALLOC, n, 0) == n
