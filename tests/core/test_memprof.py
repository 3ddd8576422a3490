"""The statistical profiler (memprof_limits.memprof) on real workloads.

Tolerances come from the sampling model (docs/statistical.md, section 3.3): a
site that allocated ``n`` bytes gets ``Bin(n, rate)`` samples, so its estimate
``samples / rate`` has a standard deviation of about ``sqrt(n / rate)`` bytes
(relative ``1 / sqrt(n * rate)``: 9 % for 10 MB at 1/80 000).  Tests allow
``Z_TOLERANCE`` = 4.5 standard deviations: with the seeds fixed they are
deterministic, and a change of seed or of the sampler fails one of them with
probability about 7e-6.
"""

from __future__ import annotations

import json
import lzma
import math
import os
import re
import sys
import threading
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from memprof_limits._native import ffi, lib

import memprof_limits as ml
from memprof_limits import _native_testing as nt  # type: ignore[attr-defined]
from memprof_limits import _sampler, memprof
from tests.conftest import run_python

ALLOCATED = nt.ffi.cast("int64_t(*)(void)", ffi.cast("void *", ffi.addressof(lib, "ml_allocated")))
RATE = 1 / 80_000
Z_TOLERANCE = 4.5
HERE = __file__


def within_model(estimate: float, exact: float, rate: float, z: float = Z_TOLERANCE) -> bool:
    """|estimate - exact| <= z standard deviations of the Bin(exact, rate) model."""
    sd_bytes = math.sqrt(exact * (1 - rate) / rate)
    return abs(estimate - exact) <= z * sd_bytes


def restart_engine(seed: int, rate: float = RATE) -> None:
    """A fresh engine with a fixed seed: reproducible sample positions."""
    if memprof.is_tracing():
        memprof.stop()
    if ml.is_started():
        ml.stop()
    ml.start(rate, seed=seed)


@pytest.fixture(autouse=True)
def _profiler_stopped() -> Iterator[None]:
    """Every test leaves the profiler stopped and the engine at the default rate."""
    yield
    if memprof.is_tracing():
        memprof.stop()
    memprof.clear()
    if tracemalloc.is_tracing():
        tracemalloc.stop()
    if not ml.is_started() or ml.sampling_rate() != RATE:
        if ml.is_started():
            ml.stop()
        ml.start()


# --------------------------------------------------------------------------
# Workloads with known allocation lines.  Each allocating line is the only
# one of its function that allocates; LINE_* hold their numbers.


def alloc_10mb() -> list[bytearray]:
    return [bytearray(1000) for _ in range(10_000)]  # LINE_10MB


def alloc_2mb() -> list[bytearray]:
    return [bytearray(1000) for _ in range(2_000)]  # LINE_2MB


def keep_and_drop(n: int) -> list[bytearray | None]:
    kept: list[bytearray | None] = [None] * n
    for i in range(n):
        kept[i] = bytearray(2000)  # LINE_KEPT
        tmp = bytearray(2000)  # LINE_DROPPED
        del tmp
    return kept


def helper_allocates(n: int) -> list[bytes]:
    return [b"x" * 1000 for _ in range(n)]  # LINE_HELPER


def caller_a() -> list[bytes]:
    return helper_allocates(6000)  # LINE_CALLER_A


def caller_b() -> list[bytes]:
    return helper_allocates(3000)  # LINE_CALLER_B


def recurse(depth: int) -> bytearray:
    if depth == 0:
        return bytearray(10**6)  # LINE_DEEP
    return recurse(depth - 1)


def _line(marker: str) -> int:
    for i, text in enumerate(Path(HERE).read_text().splitlines(), 1):
        if text.rstrip().endswith(f"# {marker}"):
            return i
    raise AssertionError(marker)


LINE_10MB, LINE_2MB = _line("LINE_10MB"), _line("LINE_2MB")
LINE_KEPT, LINE_DROPPED = _line("LINE_KEPT"), _line("LINE_DROPPED")
LINE_HELPER = _line("LINE_HELPER")
LINE_CALLER_A, LINE_CALLER_B = _line("LINE_CALLER_A"), _line("LINE_CALLER_B")
LINE_DEEP = _line("LINE_DEEP")


def exact_bytes(fn: Callable[[], Any]) -> tuple[Any, int]:
    """fn() and the exact bytes it requested (the engine's count)."""
    before = ml.allocated_bytes()
    value = fn()
    return value, ml.allocated_bytes() - before


def stat_for(stats: list[memprof.Statistic], line: int) -> memprof.Statistic:
    return next(s for s in stats if s.traceback[-1] == (HERE, line))


# --------------------------------------------------------------------------
# Estimates.


def test_top_line_is_the_biggest_allocation_site_with_a_sound_estimate() -> None:
    restart_engine(seed=1)
    memprof.start()
    big, exact_big = exact_bytes(alloc_10mb)
    small, exact_small = exact_bytes(alloc_2mb)
    snap = memprof.snapshot()
    memprof.stop()

    stats = snap.statistics("lineno")
    assert stats[0].traceback == ((HERE, LINE_10MB),)
    assert stats[1].traceback == ((HERE, LINE_2MB),)
    for stat, exact in ((stats[0], exact_big), (stats[1], exact_small)):
        assert within_model(stat.size, exact, RATE), (stat, exact)
        assert stat.size == round(stat.n_samples / RATE)
        # The exact figure is inside the (wider) 99.99 % Poisson interval.
        low, high = memprof.poisson_interval(stat.n_samples, 0.9999)
        assert low / RATE <= exact <= high / RATE
        assert stat.size_low <= stat.size <= stat.size_high
    # 10 000 bytearrays = 20 000 allocations (object + buffer) and the list's
    # growth: the count estimate is in the right range.
    assert 5_000 < stats[0].count < 50_000
    assert len(big) + len(small) == 12_000


def test_estimates_are_unbiased_over_seeds() -> None:
    """Mean relative error over 12 seeds: its standard deviation is
    0.09 / sqrt(12) = 2.6 %."""
    errors = []
    for seed in range(100, 112):
        restart_engine(seed=seed)
        memprof.start()
        _, exact = exact_bytes(alloc_10mb)
        snap = memprof.snapshot()
        memprof.stop()
        stat = stat_for(snap.statistics("lineno"), LINE_10MB)
        errors.append(stat.size / exact - 1)
    mean = sum(errors) / len(errors)
    sd_of_mean = 1 / math.sqrt(10**7 * RATE) / math.sqrt(len(errors))
    assert abs(mean) < Z_TOLERANCE * sd_of_mean, errors


def test_higher_rate_gives_tighter_estimates_and_is_restored() -> None:
    restart_engine(seed=2)
    memprof.start(sampling_rate=1 / 4000)
    assert ml.sampling_rate() == 1 / 4000
    assert memprof.get_sampling_rate() == 1 / 4000
    _, exact = exact_bytes(alloc_10mb)
    snap = memprof.snapshot()
    memprof.stop()
    assert ml.sampling_rate() == RATE  # the limits' rate is back
    assert memprof.get_sampling_rate() is None
    stat = stat_for(snap.statistics("lineno"), LINE_10MB)
    assert snap.sampling_rate == 1 / 4000
    assert stat.n_samples > 2000
    assert within_model(stat.size, exact, 1 / 4000)
    assert abs(stat.size / exact - 1) < 0.1


def test_rate_one_counts_every_byte_exactly() -> None:
    """At rate 1 every byte is a sample: each allocation carries as many
    samples as bytes, and the estimates are exact (a degenerate interval)."""
    restart_engine(seed=3)
    memprof.start(sampling_rate=1.0, max_frames=1)
    data = alloc_2mb()
    snap = memprof.snapshot()
    memprof.stop()
    here = [s for s in snap.samples if s.traceback[-1] == (HERE, LINE_2MB)]
    assert len(here) > 4000  # every allocation of the line is sampled
    # ... except the first one: the thread's first gap was drawn at the
    # engine's previous rate (known failure case, see the module docstring).
    partial = [s for s in here if s.n_samples != s.size_bytes]
    assert len(partial) <= 1 and all(s.n_samples < s.size_bytes for s in partial)
    stat = stat_for(snap.statistics("lineno"), LINE_2MB)
    assert stat.size == sum(s.n_samples for s in here)
    assert stat.size_low == stat.size == stat.size_high
    assert stat.count == len(here)
    assert len(data) == 2000


# --------------------------------------------------------------------------
# Grouping, comparison, selections.


def test_statistics_by_filename_traceback_and_cumulative() -> None:
    restart_engine(seed=4)
    memprof.start()
    a = caller_a()
    b = caller_b()
    snap = memprof.snapshot()
    memprof.stop()

    by_line = snap.statistics("lineno")
    helper = stat_for(by_line, LINE_HELPER)
    by_tb = [s for s in snap.statistics("traceback") if s.traceback[-1] == (HERE, LINE_HELPER)]

    def caller(tb: tuple[memprof.Frame, ...]) -> int:
        # 3.11 has a frame for the list comprehension: skip the helper's frames.
        return next(f.lineno for f in reversed(tb) if f.lineno != LINE_HELPER)

    assert {caller(s.traceback) for s in by_tb} == {LINE_CALLER_A, LINE_CALLER_B}
    assert sum(s.n_samples for s in by_tb) == helper.n_samples
    by_caller = {caller(s.traceback): s.n_samples for s in by_tb}
    assert by_caller[LINE_CALLER_A] > by_caller[LINE_CALLER_B]  # 6 MB vs 3 MB

    cumulative = snap.statistics("lineno", cumulative=True)
    assert stat_for(cumulative, LINE_CALLER_A).n_samples == by_caller[LINE_CALLER_A]
    assert stat_for(cumulative, LINE_HELPER).n_samples == helper.n_samples

    files = snap.statistics("filename")
    mine = next(s for s in files if s.traceback == ((HERE, 0),))
    assert mine.n_samples == sum(s.n_samples for s in by_line if s.traceback[-1].filename == HERE)
    assert str(mine).startswith(f"{HERE}: size=")
    assert len(a) == 6000 and len(b) == 3000

    with pytest.raises(ValueError, match="cumulative"):
        snap.statistics("traceback", cumulative=True)
    with pytest.raises(ValueError, match="key_type"):
        snap.statistics("function")  # type: ignore[arg-type]


def test_compare_to_shows_what_was_allocated_in_between() -> None:
    restart_engine(seed=5)
    memprof.start()
    first = alloc_10mb()
    old = memprof.snapshot()
    second = alloc_2mb()
    new = memprof.snapshot()
    memprof.stop()

    diffs = new.compare_to(old, "lineno")
    top = diffs[0]
    assert top.traceback == ((HERE, LINE_2MB),)
    assert top.size_diff == top.size > 0 and top.count_diff == top.count
    unchanged = next(d for d in diffs if d.traceback == ((HERE, LINE_10MB),))
    assert unchanged.size_diff == 0 and unchanged.n_samples_diff == 0
    assert "+" in str(top)
    # Groups that disappear count as removed.
    back = old.compare_to(new, "lineno")
    gone = next(d for d in back if d.traceback == ((HERE, LINE_2MB),))
    assert gone.size == 0 and gone.size_diff == -top.size
    assert len(first) == 10_000 and len(second) == 2_000


def test_tracked_frees_mark_samples_dead_or_alive() -> None:
    restart_engine(seed=6)
    _, per_bytearray = exact_bytes(lambda: bytearray(2000))
    memprof.start(track_frees=True)
    kept = keep_and_drop(5000)  # 10 MB kept, 10 MB dropped
    snap = memprof.snapshot()
    memprof.stop()

    kept_samples = [s for s in snap.samples if s.traceback[-1] == (HERE, LINE_KEPT)]
    dropped_samples = [s for s in snap.samples if s.traceback[-1] == (HERE, LINE_DROPPED)]
    assert len(kept_samples) > 50 and len(dropped_samples) > 50
    assert all(s.alive is True for s in kept_samples)
    assert all(s.alive is False for s in dropped_samples)
    live = snap.alive().statistics("lineno")
    assert live[0].traceback == ((HERE, LINE_KEPT),)
    assert all(s.traceback != ((HERE, LINE_DROPPED),) for s in live)
    assert within_model(live[0].size, 5000 * per_bytearray, RATE)

    # Liveness is the one at stop(): freeing now changes nothing.
    del kept
    after = memprof.snapshot()
    assert [s.alive for s in after.samples] == [s.alive for s in snap.samples]
    assert lib.ml_memprof_tracked_blocks() == 0


def test_untracked_samples_have_unknown_liveness() -> None:
    memprof.start()
    data = alloc_2mb()
    snap = memprof.snapshot()
    memprof.stop()
    assert snap.samples and all(s.alive is None for s in snap.samples)
    with pytest.raises(ValueError, match="track_frees"):
        snap.alive()
    assert len(data) == 2000


def test_filter_and_snapshot_properties() -> None:
    memprof.start()
    data = alloc_10mb()
    snap = memprof.snapshot()
    memprof.stop()
    mine = snap.filter(lambda s: s.traceback[-1].filename == HERE)
    assert 0 < len(mine.samples) <= len(snap.samples)
    assert mine.sampling_rate == snap.sampling_rate
    assert snap.total_size() == round(snap.n_samples / snap.sampling_rate)
    assert "samples" in repr(snap)
    frame = mine.samples[0].traceback[-1]
    assert snap.function_name(frame) in ("alloc_10mb", "alloc_10mb.<locals>.<listcomp>")
    assert "#1:" in snap.format_top(3)
    assert len(data) == 10_000


def test_max_frames_keeps_the_innermost_frames() -> None:
    memprof.start(max_frames=5)
    data = recurse(30)
    snap = memprof.snapshot()
    memprof.stop()
    deep = [s for s in snap.samples if s.traceback[-1] == (HERE, LINE_DEEP)]
    assert deep
    for s in deep:
        assert len(s.traceback) == 5
        assert s.total_nframe >= 31
        assert [f.filename for f in s.traceback] == [HERE] * 5
    assert memprof.get_traceback_limit() == 5

    memprof.start(max_frames=0)
    data = recurse(3)
    snap = memprof.snapshot()
    memprof.stop()
    assert snap.samples and all(s.traceback == (memprof.UNKNOWN_FRAME,) for s in snap.samples)
    assert len(data) == 10**6


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="max_frames"):
        memprof.start(max_frames=-1)
    with pytest.raises(ValueError, match="max_frames"):
        memprof.start(max_frames=memprof.MAX_FRAMES + 1)
    with pytest.raises(TypeError, match="max_frames"):
        memprof.start(max_frames=2.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="sampling_rate"):
        memprof.start(sampling_rate="often")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="sampling_rate"):
        memprof.start(sampling_rate=1.5)
    assert not memprof.is_tracing()
    memprof.start()
    with pytest.raises(RuntimeError, match="already tracing"):
        memprof.start()
    memprof.stop()
    memprof.stop()  # stopping twice is harmless


def test_a_rate_lower_than_the_limits_rate_is_refused() -> None:
    """OCaml parity: the profiler may only sample more often than the limits."""
    with pytest.raises(ValueError, match="lower than the rate the engine samples at"):
        memprof.start(sampling_rate=1 / 100_000)
    assert not memprof.is_tracing()
    assert ml.sampling_rate() == RATE
    # With the engine at a higher rate, the default rate is that rate and the
    # engine's default is refused.
    restart_engine(seed=7, rate=1 / 40_000)
    with pytest.raises(ValueError, match=r"2\.5e-05"):
        memprof.start(sampling_rate=RATE)
    memprof.start()
    assert memprof.get_sampling_rate() == 1 / 40_000
    memprof.stop()
    assert ml.sampling_rate() == 1 / 40_000


# --------------------------------------------------------------------------
# Export.


def test_collapsed_stacks_parse(tmp_path: Path) -> None:
    memprof.start()
    a = caller_a()
    snap = memprof.snapshot()
    memprof.stop()
    path = tmp_path / "profile.folded"
    snap.to_collapsed(path)
    lines = path.read_text().splitlines()
    assert lines
    total = 0
    for line in lines:
        m = re.fullmatch(r"(.+) (\d+)", line)
        assert m, line
        frames = m.group(1).split(";")
        assert all(frames)
        total += int(m.group(2))
    assert abs(total - snap.total_size()) <= len(lines)  # rounding per line
    helper = [ln for ln in lines if f"helper_allocates ({HERE}:{LINE_HELPER})" in ln]
    assert helper and all(f"caller_a ({HERE}:{LINE_CALLER_A})" in ln for ln in helper)
    # Samples instead of bytes, and threads as root frames.
    snap.to_collapsed(path, weight="samples", by_thread=True)
    lines = path.read_text().splitlines()
    assert sum(int(ln.rsplit(" ", 1)[1]) for ln in lines) == snap.n_samples
    assert all(ln.startswith("thread ") for ln in lines)
    with pytest.raises(ValueError, match="weight"):
        snap.to_collapsed(path, weight="count")
    assert len(a) == 6000


def test_speedscope_file_is_valid(tmp_path: Path) -> None:
    memprof.start()
    a = caller_b()
    snap = memprof.snapshot()
    memprof.stop()
    path = tmp_path / "profile.speedscope.json"
    snap.to_speedscope(path, name="test")
    doc = json.loads(path.read_text())
    assert doc["$schema"] == "https://www.speedscope.app/file-format-schema.json"
    frames = doc["shared"]["frames"]
    (profile,) = doc["profiles"]
    assert profile["type"] == "sampled" and profile["unit"] == "bytes"
    assert len(profile["samples"]) == len(profile["weights"]) == len(snap.samples)
    assert all(0 <= i < len(frames) for stack in profile["samples"] for i in stack)
    assert math.isclose(profile["endValue"], sum(profile["weights"]))
    assert math.isclose(sum(profile["weights"]), snap.n_samples / snap.sampling_rate)
    names = {f["name"] for f in frames}
    assert {"helper_allocates", "caller_b"} <= names
    assert all(set(f) == {"name", "file", "line"} for f in frames)
    snap.to_speedscope(path, by_thread=True)
    assert all("thread" in p["name"] for p in json.loads(path.read_text())["profiles"])
    assert len(a) == 3000


def test_dump_and_load_round_trip(tmp_path: Path) -> None:
    memprof.start(track_frees=True)
    data = alloc_2mb()
    snap = memprof.snapshot()
    memprof.stop()
    path = tmp_path / "snap.pickle"
    snap.dump(path)
    loaded = memprof.Snapshot.load(path)
    assert loaded.samples == snap.samples
    assert loaded.statistics("traceback") == snap.statistics("traceback")
    assert loaded.function_names == snap.function_names
    (tmp_path / "other.pickle").write_bytes(b"\x80\x04K\x01.")  # pickle of the int 1
    with pytest.raises(TypeError, match="Snapshot"):
        memprof.Snapshot.load(tmp_path / "other.pickle")
    assert len(data) == 2000


# --------------------------------------------------------------------------
# Threads, life cycle, coexistence with the limits.


def test_samples_carry_their_thread() -> None:
    restart_engine(seed=8)
    results: dict[str, tuple[int, int]] = {}
    keep: list[object] = []

    def worker(name: str, fn: Callable[[], Any]) -> None:
        value, exact = exact_bytes(fn)
        keep.append(value)
        results[name] = (threading.get_ident(), exact)

    memprof.start()
    threads = [
        threading.Thread(target=worker, args=("big", alloc_10mb), name="big"),
        threading.Thread(target=worker, args=("small", alloc_2mb), name="small"),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    snap = memprof.snapshot()
    memprof.stop()

    for name, line in (("big", LINE_10MB), ("small", LINE_2MB)):
        ident, exact = results[name]
        mine = snap.filter(lambda s, ident=ident: s.thread_id == ident)
        assert {s.traceback[-1] for s in mine.samples} >= {(HERE, line)}
        stat = stat_for(mine.statistics("lineno"), line)
        assert within_model(stat.size, exact, RATE)
        other = snap.filter(lambda s, ident=ident, line=line: s.traceback[-1] == (HERE, line))
        assert {s.thread_id for s in other.samples} == {ident}


def test_raw_allocations_with_and_without_the_gil() -> None:
    """RAW allocations made with the GIL get their traceback (lzma allocates
    its encoder with PyMem_RawMalloc); those made without it (a cffi call
    releases the GIL) are recorded with the unknown traceback."""
    restart_engine(seed=10)
    memprof.start(sampling_rate=1 / 8000)
    packed = lzma.compress(os.urandom(1 << 16), preset=6)
    exact = nt.lib.mlt_measure_loop(ALLOCATED, nt.lib.MLT_RAW, 100_000, 100)  # no GIL
    snap = memprof.snapshot()
    memprof.stop()
    raw = [s for s in snap.samples if s.domain == "raw"]
    with_gil = [s for s in raw if s.traceback[-1].filename == lzma.__file__]
    without = [s for s in raw if s.traceback == (memprof.UNKNOWN_FRAME,)]
    assert with_gil and without
    # (lzma itself allocates some buffers without the GIL, during compression.)
    loop = [s for s in without if s.size_bytes == 100_000]
    assert within_model(sum(s.n_samples for s in loop) * 8000, exact, 1 / 8000)
    assert len(packed) > 0


def test_start_stop_cycles_release_everything() -> None:
    """Records hold strong references to code objects until they are drained:
    after many cycles the code objects' reference counts are back, the C
    buffer is empty and the resident memory has not grown."""
    codes = [
        alloc_2mb.__code__,
        *[c for c in alloc_2mb.__code__.co_consts if hasattr(c, "co_code")],
    ]
    refs_before = [sys.getrefcount(c) for c in codes]

    def cycle(track: bool) -> None:
        memprof.start(sampling_rate=1 / 8000, track_frees=track)
        alloc_2mb()
        memprof.snapshot()
        memprof.stop()
        memprof.clear()

    for i in range(20):
        cycle(i % 2 == 0)
    rss_before = _sampler.rss_bytes()
    for i in range(200):
        cycle(i % 2 == 0)
    rss_growth = _sampler.rss_bytes() - rss_before
    assert [sys.getrefcount(c) for c in codes] == refs_before
    assert lib.ml_memprof_pending_records() == 0
    assert lib.ml_memprof_buffer_bytes() == 0
    assert lib.ml_memprof_tracked_blocks() == 0
    assert rss_growth < 8 * 2**20, rss_growth


def test_works_under_limits_and_records_masked_regions() -> None:
    restart_engine(seed=9)
    memprof.start()

    def task() -> int:
        data = alloc_2mb()
        more = ml.masked(alloc_10mb)  # an allocation in a masked region
        return len(data) + len(more)

    result = ml.limit_allocations(task, limit="100 MB")
    assert isinstance(result, ml.Ok)
    interrupted = ml.limit_allocations(lambda: [alloc_10mb() for _ in range(100)], limit="30 MB")
    assert isinstance(interrupted, ml.Error)
    snap = memprof.snapshot()
    memprof.stop()
    stats = snap.statistics("lineno")
    assert stat_for(stats, LINE_2MB).n_samples > 0
    masked_stat = stat_for(stats, LINE_10MB)
    # 10 MB (masked) + about 30 MB before the limit interrupted the second task.
    assert within_model(masked_stat.size, 40 * 10**6, RATE, z=8)


def test_start_inside_a_limited_task() -> None:
    def task() -> memprof.Snapshot:
        with memprof.tracing(sampling_rate=1 / 8000) as session:
            alloc_2mb()
        assert session.snapshot is not None
        return session.snapshot

    result = ml.limit_allocations(task, limit="1 GB")
    assert isinstance(result, ml.Ok)
    snap, _ = result.value
    assert stat_for(snap.statistics("lineno"), LINE_2MB).n_samples > 100
    assert not memprof.is_tracing()
    assert ml.sampling_rate() == RATE


def test_tracing_block_stops_even_when_interrupted() -> None:
    def task() -> None:
        with memprof.tracing():
            while True:
                alloc_2mb()

    assert isinstance(ml.limit_allocations(task, limit="20 MB"), ml.Error)
    assert not memprof.is_tracing()
    assert ml.sampling_rate() == RATE


def test_tracemalloc_on_top_blocks_tracking_only() -> None:
    ml.start()
    tracemalloc.start()
    try:
        with pytest.raises(RuntimeError, match="tracemalloc"):
            memprof.start(track_frees=True)
        assert not memprof.is_tracing()
        memprof.start()
        data = alloc_2mb()
        snap = memprof.snapshot()
        memprof.stop()
    finally:
        tracemalloc.stop()
    assert stat_for(snap.statistics("lineno"), LINE_2MB).n_samples > 0
    assert len(data) == 2000


def test_stopping_the_engine_makes_liveness_unknown() -> None:
    memprof.start(track_frees=True)
    data = alloc_2mb()
    ml.stop()  # turns tracking off
    ml.start()
    snap = memprof.snapshot()
    memprof.stop()
    assert snap.samples and all(s.alive is None for s in snap.samples)
    assert len(data) == 2000


def test_snapshot_after_stop_keeps_the_session_and_clear_forgets_it() -> None:
    memprof.start()
    data = alloc_2mb()
    live = memprof.snapshot()
    memprof.stop()
    final = memprof.snapshot()
    assert {s.sample_id for s in live.samples} <= {s.sample_id for s in final.samples}
    memprof.clear()
    assert memprof.snapshot().samples == ()
    assert len(data) == 2000


def test_profiler_own_allocations_are_not_recorded() -> None:
    memprof.start(sampling_rate=1 / 1000)
    data = alloc_2mb()
    for _ in range(5):
        memprof.snapshot()
    snap = memprof.snapshot()
    memprof.stop()
    ours = os.path.dirname(memprof.__file__) + os.sep  # (the profiler's package)
    mine = [s for s in snap.samples if s.traceback[-1].filename.startswith(ours)]
    assert mine == []
    assert len(data) == 2000


def test_fresh_process_snapshot_before_start_and_exit_while_tracing() -> None:
    proc = run_python(
        """
        from memprof_limits import memprof
        try:
            memprof.snapshot()
        except RuntimeError as e:
            print("refused:", e)
        memprof.start(track_frees=True)
        data = [bytearray(1000) for _ in range(1000)]
        print("tracing", memprof.is_tracing())
        """
    )
    assert "refused: memprof was never started" in proc.stdout
    assert "tracing True" in proc.stdout
    assert proc.stderr == ""


# --------------------------------------------------------------------------
# Confidence intervals.


@pytest.mark.parametrize(
    ("k", "low", "high"),
    # Garwood intervals (chi-square quantiles / 2), 95 %.
    [(0, 0.0, 3.6889), (1, 0.0253, 5.5716), (10, 4.7954, 18.3904), (100, 81.3639, 121.6268)],
)
def test_poisson_interval_matches_published_values(k: int, low: float, high: float) -> None:
    lo, hi = memprof.poisson_interval(k)
    assert lo == pytest.approx(low, abs=1e-3)
    assert hi == pytest.approx(high, abs=1e-3)


def test_poisson_interval_large_counts_and_errors() -> None:
    lo, hi = memprof.poisson_interval(10_000)
    assert lo == pytest.approx(9804.0, rel=1e-3) and hi == pytest.approx(10198.0, rel=1e-3)
    with pytest.raises(ValueError):
        memprof.poisson_interval(-1)
    with pytest.raises(ValueError):
        memprof.poisson_interval(3, 1.5)


# --------------------------------------------------------------------------
# The IPython magic, in a real InteractiveShell.


@pytest.fixture
def shell() -> Any:
    pytest.importorskip("IPython")
    from IPython.core.interactiveshell import InteractiveShell

    sh = InteractiveShell.instance()
    memprof.load_ipython_extension(sh)
    return sh


def test_cell_magic_prints_the_top_lines_of_the_cell(
    shell: Any, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    speedscope = tmp_path / "cell.json"
    result = shell.run_cell(
        f"%%memprof -n 3 --speedscope {speedscope}\n"
        "small = [bytearray(1000) for _ in range(1000)]\n"
        "big = [bytearray(1000) for _ in range(20000)]\n"
        "len(big)\n"
    )
    result.raise_error()
    out = capsys.readouterr().out
    assert "Top lines of the cell" in out
    cell_lines = re.findall(r"^  line +(\d+):", out, re.M)
    assert cell_lines[0] == "2"  # the 20 MB line comes first
    assert "big = [bytearray(1000)" in out
    assert "Top allocation sites" in out
    assert json.loads(speedscope.read_text())["profiles"]
    assert shell.user_ns["big"] and len(shell.user_ns["big"]) == 20000
    snap = memprof.last_magic_snapshot()
    assert snap is not None and snap.sampling_rate == memprof.MAGIC_DEFAULT_RATE
    assert not memprof.is_tracing()
    assert ml.sampling_rate() == RATE


def test_line_magic_returns_the_value(shell: Any, capsys: pytest.CaptureFixture[str]) -> None:
    result = shell.run_cell("n = %memprof -r 1/4000 len([bytearray(500) for _ in range(20000)])")
    result.raise_error()
    assert shell.user_ns["n"] == 20000
    out = capsys.readouterr().out
    assert "memprof: ~" in out and "line    1" in out
    snap = memprof.last_magic_snapshot()
    assert snap is not None and snap.sampling_rate == 1 / 4000


def test_magic_reports_errors_and_stops(shell: Any, capsys: pytest.CaptureFixture[str]) -> None:
    shell.run_cell("%%memprof\nx = [bytearray(1000) for _ in range(5000)]\n1 / 0\n")
    out = capsys.readouterr()
    assert "ZeroDivisionError" in out.out + out.err
    assert "memprof: ~" in out.out
    assert not memprof.is_tracing()
    shell.run_cell("%memprof -r 1/100000 x = 1")
    out = capsys.readouterr()
    assert "lower than the rate" in out.out + out.err
    assert not memprof.is_tracing()
