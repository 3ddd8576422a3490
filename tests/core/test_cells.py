"""The cell runner shared by the kernel and the REPL."""

from __future__ import annotations

import threading
import time

import pytest

import memprof_limits as ml


def test_interrupted_cell_rolls_back_the_namespace() -> None:
    ns: dict[str, object] = {"x": 1, "gone": "soon?"}
    runner = ml.CellRunner(ns, limits=ml.CellLimits(allocations=10**6))
    with runner.cell() as cell:
        code = "x = 2\nnew = 3\ndel gone\ny = [str(i) for i in range(10**6)]"
        result = cell.run(lambda: exec(code, ns))
    assert isinstance(result, ml.Error)
    outcome = cell.outcome
    assert outcome.interrupted and outcome.reason == "allocations"
    assert ns["x"] == 1 and ns["gone"] == "soon?" and "new" not in ns
    assert outcome.rollback is not None
    assert set(outcome.rollback.changed) == {"x"} and set(outcome.rollback.removed) == {"gone"}
    assert "new" in outcome.rollback.added
    assert outcome.interrupt_line().startswith("allocation limit of 1000000 bytes reached")
    assert outcome.ename == "AllocationLimitExceeded"


def test_successful_cell_commits_and_reports() -> None:
    ns: dict[str, object] = {}
    runner = ml.CellRunner(ns)
    with runner.cell() as cell:
        assert isinstance(cell.run(lambda: exec("a = [0] * 1000", ns)), ml.Ok)
    assert ns["a"] == [0] * 1000
    assert not cell.outcome.interrupted and cell.outcome.rollback is None
    assert cell.outcome.allocated_bytes >= 8000
    meta = cell.outcome.metadata()
    assert meta["allocated_bytes"] == cell.outcome.allocated_bytes and meta["reason"] is None
    assert runner.last is cell.outcome


def test_cell_budget_is_shared_by_its_tasks_and_later_tasks_do_not_run() -> None:
    ns: dict[str, object] = {}
    runner = ml.CellRunner(ns, limits=ml.CellLimits(allocations=3 * 10**6))
    ran = []
    with runner.cell() as cell:
        assert isinstance(cell.run(lambda: bytearray(2 * 10**6)), ml.Ok)
        assert isinstance(cell.run(lambda: bytearray(2 * 10**6)), ml.Error)
        assert isinstance(cell.run(lambda: ran.append(1)), ml.Error)
    assert ran == []


def test_interrupt_sets_only_the_running_cells_token() -> None:
    ns: dict[str, object] = {"x": 1}
    runner = ml.CellRunner(ns)
    assert runner.interrupt() is False  # no cell: nothing to interrupt, nothing kept
    threading.Timer(0.2, runner.interrupt).start()
    with runner.cell() as cell:
        cell.run(lambda: exec("x = 0\nwhile True: pass", ns))
    assert cell.outcome.reason == "token" and ns["x"] == 1
    with runner.cell() as cell:
        assert isinstance(cell.run(lambda: exec("x = 5", ns)), ml.Ok)
    assert ns["x"] == 5


def test_memory_limit_cell_releases_memory() -> None:
    from memprof_limits import _sampler

    ns: dict[str, object] = {}
    limit = _sampler.rss_bytes() + 64 * 2**20
    runner = ml.CellRunner(ns, limits=ml.CellLimits(memory=limit))
    with runner.cell() as cell:
        cell.run(lambda: exec("keep = []\nwhile True: keep.append(bytearray(10**5))", ns))
    outcome = cell.outcome
    assert outcome.reason == "memory" and outcome.freed_bytes is not None
    assert "keep" not in ns
    assert outcome.peak_rss_bytes >= limit
    assert ml.get_global_memory_limit() is None  # the cell's limit does not leak


def test_tracked_guarded_values_roll_back_with_the_cell() -> None:
    store = ml.Guarded([1, 2, 3])
    runner = ml.CellRunner({})
    token_cell = []
    threading.Timer(0.1, runner.interrupt).start()
    with runner.cell() as cell:
        token_cell.append(cell)

        def mutate() -> None:
            store.value.append(4)
            time.sleep(30)

        cell.run(mutate)
    assert store.value == [1, 2, 3]


def test_limits_parse() -> None:
    base = ml.CellLimits.parse("memory=2GiB allocations=500MB")
    assert base == ml.CellLimits(memory=2 * 2**30, allocations=500 * 10**6)
    assert ml.CellLimits.parse("allocations=off", base).allocations is None
    assert ml.CellLimits.parse("off", base) == ml.CellLimits()
    assert "memory=2.0 GiB" in base.describe()
    for bad in ("memory", "speed=3", "memory=lots"):
        with pytest.raises(ValueError, match="expected"):
            ml.CellLimits.parse(bad)
