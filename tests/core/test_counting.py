"""AllocationCounter and AllocationCount: %%count_allocations of the kernel and the REPL.

Determinism, measured on CPython 3.11 and 3.13: a cell that builds a list of
strings, of tuples, a dict of floats or objects of a class reports the same
count in every run of a count (spread 0), but for two effects of the
namespace dict, which a rollback cannot undo: it grows its table (a few
hundred bytes for a small namespace) in a run that adds a name when the table
is full -- after a rollback a deleted name leaves its slot behind, so that
happens every few runs -- and a float or tuple the collector or the
allocator keeps for later (24-56 bytes).  ``SPREAD_BOUND`` is the bound the
tests hold a count to.  Two effects of CPython's own caches come on top: the
first run fills caches that outlive it (the instances' shared-keys table of a
class made before the count: 3608 bytes, once), and a class made in every run
registers in ``object.__subclasses__()``, a table that grows now and then
(36 888 bytes on 3.12 with pytest's classes).  Since the watchdog runs no
Python while nothing is pending (issue 14), runs after the first are
identical on a loaded machine too.
"""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

import memprof_limits as ml
from memprof_limits import _sampler

#: The spread allowed for a deterministic cell (see the module's docstring).
SPREAD_BOUND = 512
#: What the first run of a count may add (see the module's docstring).
FIRST_RUN_WARMUP = 8192


def count(
    runner: ml.CellRunner,
    code: str,
    ns: dict[str, Any],
    runs: int,
    limits: ml.CellLimits | None = None,
    during: Callable[[ml.AllocationCounter, ml.Cell], None] | None = None,
) -> ml.AllocationCount:
    """Count ``code`` as the REPL does (an exception propagates out of the run)."""
    compiled = compile(code, "<cell>", "exec")
    counter = ml.AllocationCounter(runner, runs, limits)
    try:
        while not counter.finished:
            with counter.run() as cell:
                try:
                    cell.run(lambda: exec(compiled, ns))
                finally:
                    cell.complete()
                    if during is not None:
                        during(counter, cell)
    finally:
        counter.close()
    return counter.report


@pytest.mark.parametrize(
    "code",
    [
        "words = [str(i) for i in range(10**5)]",
        "pairs = [(i, i) for i in range(10**4)]",
        "floats = {i: float(i) for i in range(10**4)}",
        "objects = [A() for _ in range(1000)]",
    ],
)
def test_a_deterministic_cell_counts_the_same_in_every_run(code: str) -> None:
    ns: dict[str, Any] = {"words": None, "pairs": None, "floats": None, "objects": None}
    exec("class A:\n    pass", ns)  # (a class made in the cell: next test)
    report = count(ml.CellRunner(ns), code, ns, 5)
    assert report.complete and len(report.allocated_bytes) == 5, report
    assert report.minimum > 50_000
    first, *later = report.allocated_bytes
    assert max(later) - min(later) <= SPREAD_BOUND, report.allocated_bytes
    # The first run may also fill caches that outlive it: the instances' shared-keys table
    # of a class made before the count (3608 bytes on 3.12, once per class).
    assert min(later) - SPREAD_BOUND <= first <= max(later) + FIRST_RUN_WARMUP, report


def test_a_class_made_in_each_run_costs_cpythons_table_of_subclasses_now_and_then() -> None:
    """A class registers itself in its bases' table of subclasses (``object.__subclasses__()``),
    a dict that CPython grows as classes come and go: a run that makes it grow pays for the
    new table (36 888 bytes on 3.12 with pytest's ~660 classes).  Bounded by one growth."""
    ns: dict[str, Any] = {"objects": None}
    code = "class A:\n    pass\nobjects = [A() for _ in range(1000)]"
    report = count(ml.CellRunner(ns), code, ns, 10)
    assert report.complete and report.spread <= 65_536, report.allocated_bytes
    assert report.allocated_bytes.count(report.minimum) >= 5, report.allocated_bytes


def test_a_new_name_costs_the_namespace_a_bigger_table_now_and_then() -> None:
    # The one variation left when runs add a name: the dict's table grows
    # (its deleted slots are only reclaimed then) -- measured, and bounded.
    ns: dict[str, Any] = {}
    report = count(ml.CellRunner(ns), "fresh = [str(i) for i in range(10**4)]", ns, 20)
    assert report.complete and report.spread <= SPREAD_BOUND, report.allocated_bytes
    assert report.allocated_bytes.count(report.minimum) >= 15, report.allocated_bytes


def test_the_state_after_counting_is_the_state_after_one_run() -> None:
    log = ml.Guarded([], name="log")
    ns: dict[str, Any] = {"x": 10, "log": log, "plain": [], "gone": "here"}
    code = "x = x + 1\nlog.value.append(x)\nplain.append(x)\nadded = x\ndel gone"
    report = count(ml.CellRunner(ns), code, ns, 5)
    assert report.complete and report.spread <= SPREAD_BOUND
    assert ns["x"] == 11 and ns["added"] == 11 and "gone" not in ns
    assert log.value == [11]  # Guarded: rolled back between the runs
    # Not Guarded, changed in place: every run changed it (the documented limit).
    assert ns["plain"] == [11] * 5


def test_the_allocation_limit_is_lifted_and_the_memory_limit_kept() -> None:
    ns: dict[str, Any] = {}
    memory = _sampler.rss_bytes() + 2**30
    limits = ml.CellLimits(memory=memory, allocations="100kB")
    runner = ml.CellRunner(ns, limits=limits)
    report = count(runner, "seen = __import__('memprof_limits').get_global_memory_limit()\n"
                   "big = [str(i) for i in range(10**5)]", ns, 2)  # fmt: skip
    assert report.complete and report.minimum > 10**6 and report.limit == 100_000
    assert ns["seen"] == memory  # the runs ran under the cell's memory limit
    assert ml.get_global_memory_limit() is None
    text = report.describe()
    assert "the allocation limit is 100kB: the count is over it" in text, text


def test_the_suggested_line_works_when_pasted() -> None:
    ns: dict[str, Any] = {"table": None}
    runner = ml.CellRunner(ns, limits=ml.CellLimits(allocations="1MB"))
    code = "table = [str(i * i) for i in range(10**5)]"
    report = count(runner, code, ns, 3)
    assert report.line is not None and report.line.startswith("%%limits allocations=")
    assert report.describe().splitlines()[-1] == report.line
    pasted = ml.CellLimits.parse(report.line.removeprefix("%%limits "), runner.limits)
    assert pasted.allocations == report.suggested
    assert 2 * report.maximum <= report.suggested <= 5 * report.maximum
    with runner.cell(pasted) as cell:
        assert isinstance(cell.run(lambda: exec(code, ns)), ml.Ok)
    assert not cell.outcome.interrupted
    below = ml.CellLimits(allocations=report.minimum - 1)
    with runner.cell(below) as cell:
        assert isinstance(cell.run(lambda: exec(code, ns)), ml.Error)
    assert cell.outcome.reason == "allocations"


@pytest.mark.parametrize(
    ("used", "suggested", "text"),
    [
        (0, 1000, "1kB"),
        (499, 1000, "1kB"),
        (501, 2000, "2kB"),
        (12_345, 50_000, "50kB"),
        (25_000, 50_000, "50kB"),
        (25_001, 100_000, "100kB"),
        (99_999, 200_000, "200kB"),
        (400_000, 1_000_000, "1MB"),
        (12_345_678, 50_000_000, "50MB"),
        (3 * 10**9, 10**10, "10GB"),
        (4 * 10**12, 10**13, "10TB"),
        (3 * 10**15, 10**16, "10000TB"),
    ],
)
def test_the_suggestion_is_twice_the_count_rounded_up_to_1_2_5(
    used: int, suggested: int, text: str
) -> None:
    assert ml.AllocationCount.suggest(used) == suggested
    count = ml.AllocationCount(runs=1, allocated_bytes=(used,))
    assert count.line == f"%%limits allocations={text}"
    assert ml.parse_bytes(text) == suggested  # as users type it, read back exactly


def test_an_absurd_count_is_suggested_the_largest_size() -> None:
    assert ml.AllocationCount.suggest(ml.MAX_BYTES) == ml.MAX_BYTES
    line = ml.AllocationCount(runs=1, allocated_bytes=(ml.MAX_BYTES,)).line
    assert line is not None and ml.parse_bytes(line.split("=")[1]) == ml.MAX_BYTES


def test_an_interrupted_run_stops_the_count_and_is_rolled_back() -> None:
    calls: list[int] = []  # not Guarded: counts the runs across rollbacks
    ns: dict[str, Any] = {"x": 0, "calls": calls}
    runner = ml.CellRunner(ns)
    code = "x = x + 1\nimport time\ncalls.append(1)\nwhile len(calls) == 3: time.sleep(0.01)"

    def interrupt_in_run_3() -> None:  # Ctrl+C, the kernel's button (not at a fixed time)
        deadline = time.monotonic() + 30
        while len(calls) < 3 and time.monotonic() < deadline:
            time.sleep(0.005)
        runner.interrupt()

    timer = threading.Thread(target=interrupt_in_run_3)
    timer.start()
    report = count(runner, code, ns, 5)
    timer.join()
    assert report.stopped == "interrupted" and report.reason == "token"
    assert len(report.allocated_bytes) == 2 and not report.complete
    assert report.suggested is None and report.line is None
    assert report.describe().startswith("count stopped: run 3 of 5 was interrupted (token)")
    # Runs 1 and 2 were discarded, run 3 rolled back: the state before the cell.
    assert ns["x"] == 0 and "time" not in ns and len(calls) == 3
    assert runner.last is not None and runner.last.rollback is not None
    assert runner.undo().reason == (
        "the last cell was interrupted, and its changes were rolled back already"
    )


def test_an_interrupt_between_two_runs_interrupts_the_next_run() -> None:
    ns: dict[str, Any] = {"x": 0}
    runner = ml.CellRunner(ns)

    def interrupt_after_run_2(counter: ml.AllocationCounter, cell: ml.Cell) -> None:
        if counter.run_number == 2:
            assert runner.interrupt() is True  # the cell completed: only the next run is hit

    report = count(runner, "x = x + 1", ns, 5, during=interrupt_after_run_2)
    assert report.stopped == "interrupted" and report.reason == "token"
    assert len(report.allocated_bytes) == 2
    assert ns["x"] == 0  # run 3 ran nothing, and was rolled back like the others
    assert runner.interrupt() is False  # the count is over: nothing is kept for later
    assert count(runner, "x = x + 1", ns, 2).complete and ns["x"] == 1


def test_the_memory_limit_interrupts_a_run_and_the_process_survives() -> None:
    ns: dict[str, Any] = {"x": 0}
    limits = ml.CellLimits(memory=_sampler.rss_bytes() + 64 * 2**20, allocations="1MB")
    runner = ml.CellRunner(ns, limits=limits)
    code = "x = x + 1\nkeep = []\nwhile True: keep.append(bytearray(10**5))"
    report = count(runner, code, ns, 3)
    assert report.stopped == "interrupted" and report.reason == "memory"
    assert report.allocated_bytes == ()
    assert ns["x"] == 0 and "keep" not in ns
    assert runner.last is not None and runner.last.freed_bytes is not None


def test_a_run_that_raises_stops_the_count_and_keeps_its_changes() -> None:
    calls: list[int] = []
    ns: dict[str, Any] = {"x": 0, "calls": calls}
    code = "calls.append(1)\nx = x + 1\nif len(calls) == 3:\n    raise ValueError('third')"
    with pytest.raises(ValueError, match="third"):
        count(ml.CellRunner(ns), code, ns, 5)
    # Runs 1 and 2 were discarded; run 3 raised and is kept, as a cell that raises is.
    assert ns["x"] == 1 and len(calls) == 3


def test_a_front_end_that_handles_the_exception_says_so() -> None:
    # The kernel: IPython shows the exception, nothing propagates.
    ns: dict[str, Any] = {"x": 0}
    runner = ml.CellRunner(ns)
    counter = ml.AllocationCounter(runner, 4)
    while not counter.finished:
        with counter.run() as cell:
            cell.run(lambda: exec("x = x + 1", ns))
            if counter.run_number == 2:
                counter.raised()
    report = counter.report
    assert report.stopped == "error" and len(report.allocated_bytes) == 1
    assert report.describe().startswith("count stopped: run 2 of 4 raised an exception")
    assert ns["x"] == 1
    assert runner.undo().undone and ns["x"] == 0  # back to before the counted cell


def test_undo_after_a_count_goes_back_to_before_the_counted_cell() -> None:
    guarded = ml.Guarded([0], name="guarded")
    ns: dict[str, Any] = {"x": 0, "guarded": guarded}
    runner = ml.CellRunner(ns)
    report = count(runner, "x = x + 1\nguarded.value.append(x)\ny = 1", ns, 3)
    assert report.complete and ns["x"] == 1 and guarded.value == [0, 1]
    undo = runner.undo()
    assert undo.undone and undo.rollback is not None
    assert set(undo.rollback.added) == {"y"} and set(undo.rollback.changed) == {"x"}
    assert ns["x"] == 0 and "y" not in ns and guarded.value == [0]


@pytest.mark.parametrize(
    ("runs", "error"),
    [(0, ValueError), (101, ValueError), (-1, ValueError), (True, TypeError), (2.0, TypeError),
     ("5", TypeError), (None, TypeError)],
)  # fmt: skip
def test_a_bad_number_of_runs_is_refused_saying_what_is_expected(runs: Any, error: type) -> None:
    with pytest.raises(error, match="expected a number of runs from 1 to 100"):
        ml.AllocationCounter(ml.CellRunner({}), runs)


@pytest.mark.parametrize(
    "text", ["abc", "0", "101", "100000", "-1", "1e3", "2.0", "5 6", "٣", "9" * 5000, "+3"]
)
def test_a_bad_count_line_says_what_is_expected(text: str) -> None:
    with pytest.raises(ValueError, match=r"^expected a number of runs from 1 to 100 \(no number"):
        ml.AllocationCounter.parse_runs(text)


def test_a_good_count_line() -> None:
    assert [ml.AllocationCounter.parse_runs(t) for t in ["", " ", "1", " 7 ", "100", "007"]] == [
        1, 1, 1, 7, 100, 7
    ]  # fmt: skip


def test_several_runs_need_rollback() -> None:
    runner = ml.CellRunner({}, rollback=False)
    with pytest.raises(ValueError, match="with rollback off"):
        ml.AllocationCounter(runner, 2)
    ns: dict[str, Any] = {"x": 0}
    runner = ml.CellRunner(ns, rollback=False)
    assert count(runner, "x = x + 1", ns, 1).complete and ns["x"] == 1


def test_runs_cannot_be_made_after_the_last_and_close_is_idempotent() -> None:
    ns: dict[str, Any] = {}
    runner = ml.CellRunner(ns)
    counter = ml.AllocationCounter(runner, 1)
    with counter.run() as cell:
        cell.run(lambda: None)
    assert counter.finished
    with pytest.raises(RuntimeError, match="every run was made"):
        with counter.run():
            pass
    counter.close()
    counter.close()
    # Closed before its runs: it stops, and no interrupt waits for it any more.
    counter = ml.AllocationCounter(runner, 3)
    with counter.run() as cell:
        cell.run(lambda: None)
    assert runner.interrupt() is True  # between two runs: for the next one
    counter.close()
    assert counter.finished and counter.report.stopped == "error"
    assert runner.interrupt() is False


def test_the_report_is_json_able_and_says_what_happened() -> None:
    import json

    report = ml.AllocationCount(
        runs=3, allocated_bytes=(1000, 1200, 1100), limits=ml.CellLimits(allocations="1kB")
    )
    figures = report.metadata()
    json.dumps(figures)
    assert figures["min"] == 1000 and figures["max"] == 1200 and figures["spread"] == 200
    assert figures["limit"] == 1000 and figures["suggested"] == 5000
    assert report.describe().splitlines() == [
        "allocated 1000 to 1200 bytes (1.20 kB) in 3 runs from the same state "
        "(spread 200 bytes, 17%)",
        "the allocation limit is 1kB: the count is over it (the cell is interrupted at that limit)",
        "suggested limit (2 x the largest count, rounded up to 1, 2 or 5 x 10^k bytes):",
        "%%limits allocations=5kB",
    ]
    one = ml.AllocationCount(runs=1, allocated_bytes=(400_000,), limits=ml.CellLimits(10**9, 10**7))
    assert one.describe().splitlines()[:2] == [
        "allocated 400000 bytes (400 kB)",
        "the allocation limit is 10000000 bytes: the count is 4% of it",
    ]


def test_every_run_starts_from_a_collected_heap() -> None:
    # Free lists serve small objects without the allocator: a full collection
    # before each run empties them, so that the first run is not the odd one.
    ns: dict[str, Any] = {"pairs": None}
    junk = [(i, i) for i in range(10**4)]
    del junk  # fills the free list of 2-tuples
    report = count(ml.CellRunner(ns), "pairs = [(i, i) for i in range(3000)]", ns, 3)
    assert report.spread <= SPREAD_BOUND, report.allocated_bytes
    cold = report.minimum
    junk = [(i, i) for i in range(10**4)]
    del junk
    gc.disable()  # no automatic collection between the two lines below
    try:
        warm = ml.limit_allocations(lambda: [(i, i) for i in range(3000)], limit=10**9)
    finally:
        gc.enable()
    assert isinstance(warm, ml.Ok)
    assert warm.value[1] < cold  # without it, the first run would have found them
