"""``SafeMutex`` (DESIGN §6, issue 4): acquired and released masked; poisoned when an interrupt
arrives while it is held, so that the next acquisition raises ``PoisonedError`` until the state
is repaired and ``clear_poison()`` is called; waiting for it is interruptible by the waiting
task's own limits; it never deadlocks."""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import memprof_limits as ml

BUDGET = 1_000_000


@pytest.fixture(autouse=True)
def no_cyclic_gc() -> Iterator[None]:
    """These tests assert exactly where an interrupt lands. A cyclic collection, triggered by
    any allocation, may run some earlier test's finalizer at that moment; an interrupt armed
    then is delivered inside the finalizer, where CPython prints and drops it (stickiness
    makes that harmless for a task, not for an assertion about the landing point)."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def touch() -> None:
    """A Python call: a delivery point."""


def allocate_forever() -> None:
    keep = []
    while True:
        keep.append(str(len(keep)) * 10)


def in_thread(fn: Callable[[], Any], name: str = "task") -> tuple[threading.Thread, list[Any]]:
    out: list[Any] = []

    def target() -> None:
        try:
            out.append(fn())
        except BaseException as e:
            out.append(e)

    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    return thread, out


def test_plain_use() -> None:
    m = ml.SafeMutex()
    assert not m.locked() and not m.poisoned
    with m as entered:
        assert entered is m and m.locked()
    assert not m.locked() and not m.poisoned
    m.clear_poison()  # a no-op on a healthy mutex
    assert not m.poisoned
    assert issubclass(ml.PoisonedError, RuntimeError)


def test_an_ordinary_exception_does_not_poison() -> None:
    m = ml.SafeMutex()
    with pytest.raises(KeyError), m:
        raise KeyError("a bug, not an interrupt")
    assert not m.locked() and not m.poisoned
    with m:
        pass


def test_interrupt_while_held_poisons_and_the_next_acquisition_raises() -> None:
    m = ml.SafeMutex()
    state = {"a": 0, "b": 0}

    def task() -> None:
        keep = []
        with m:
            state["a"] += 1
            while True:  # interrupted here, between the two halves of the update
                keep.append(str(len(keep)) * 10)
            state["b"] += 1

    result = ml.limit_allocations(task, limit=BUDGET)
    assert isinstance(result, ml.Error) and isinstance(result.exc, ml.AllocationLimitExceeded)
    assert m.poisoned and not m.locked()
    with pytest.raises(ml.PoisonedError, match="clear_poison"), m:
        pytest.fail("a poisoned mutex must not be entered")
    assert m.poisoned and not m.locked()  # still poisoned, and not left held by the refusal
    # Repair (no one can enter while it is poisoned), then declare it consistent.
    state["b"] = state["a"]
    m.clear_poison()
    with m:
        assert state["a"] == state["b"]
    assert not m.poisoned


def test_a_swallowed_interrupt_still_poisons() -> None:
    m = ml.SafeMutex()

    def task() -> str:
        with m:
            try:
                allocate_forever()
            except ml.Interrupted:
                pass  # the state may be half-updated all the same
        return "pretending all is fine"

    result = ml.limit_allocations(task, limit=BUDGET)
    assert isinstance(result, ml.Error)
    assert m.poisoned and not m.locked()


def test_entering_after_an_interrupt_without_being_interrupted_inside_does_not_poison() -> None:
    """A task that was interrupted before taking the mutex, and whose body runs to the end (the
    interrupt re-armed at the end of the masked enter lands after ``__exit__``: ``pass`` has no
    delivery point), has not half-updated anything."""
    m = ml.SafeMutex()
    token = ml.Token()
    log: list[str] = []

    def task() -> None:
        try:
            ml.masked(token.set)
        except ml.Interrupted:
            pass
        try:
            with m:
                pass
        except ml.Interrupted:
            log.append("delivered after the with")

    assert isinstance(ml.limit_with_token(task, token=token), ml.Error)
    assert log == ["delivered after the with"]
    assert not m.poisoned and not m.locked()

    # The same with a delivery point in the body: interrupted while held, hence poisoned.
    token = ml.Token()

    def task2() -> None:
        try:
            ml.masked(token.set)
        except ml.Interrupted:
            pass
        with m:
            touch()

    assert isinstance(ml.limit_with_token(task2, token=token), ml.Error)
    assert m.poisoned and not m.locked()


@pytest.mark.parametrize("where", ["main", "worker"])
def test_waiting_for_the_mutex_is_interruptible(where: str) -> None:
    m = ml.SafeMutex()
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with m:
            held.set()
            release.wait(60)

    holder, _ = in_thread(hold, "holder")
    assert held.wait(30)
    token = ml.Token()
    entered: list[bool] = []

    def task() -> None:
        with m:
            entered.append(True)

    try:
        timer = threading.Timer(0.1, token.set)
        timer.start()
        t0 = time.monotonic()
        if where == "main":
            result = ml.limit_with_token(task, token=token)
        else:
            waiter, out = in_thread(lambda: ml.limit_with_token(task, token=token))
            waiter.join(30)
            assert not waiter.is_alive(), "the waiting task was not interrupted"
            result = out[0]
        elapsed = time.monotonic() - t0
        timer.join()
    finally:
        release.set()
        holder.join(30)
    assert isinstance(result, ml.Error) and isinstance(result.exc, ml.Cancelled), result
    assert elapsed < 10
    assert entered == []
    assert not m.poisoned and not m.locked()  # the waiter never held it
    with m:
        pass


def test_a_waiter_learns_about_the_poison_instead_of_deadlocking() -> None:
    m = ml.SafeMutex()
    inside, waiting = threading.Event(), threading.Event()

    def task() -> None:
        with m:
            inside.set()
            assert waiting.wait(30)
            time.sleep(0.05)  # let the waiter block on the mutex
            allocate_forever()

    holder, holder_out = in_thread(lambda: ml.limit_allocations(task, limit=BUDGET))
    assert inside.wait(30)

    def wait_for_it() -> str:
        waiting.set()
        try:
            with m:  # no task here: waits until the holder's task lets go
                return "entered"
        except ml.PoisonedError:
            return "poisoned"

    waiter, waiter_out = in_thread(wait_for_it, "waiter")
    holder.join(60)
    waiter.join(60)
    assert not holder.is_alive() and not waiter.is_alive(), "deadlock"
    assert isinstance(holder_out[0], ml.Error)
    assert waiter_out == ["poisoned"]
    assert m.poisoned and not m.locked()


def test_poison_is_seen_by_other_threads() -> None:
    m = ml.SafeMutex()

    def task() -> None:
        with m:
            allocate_forever()

    worker, out = in_thread(lambda: ml.limit_allocations(task, limit=BUDGET))
    worker.join(60)
    assert isinstance(out[0], ml.Error)
    with pytest.raises(ml.PoisonedError), m:
        pass
    m.clear_poison()

    def use() -> str:
        with m:
            return "entered"

    other, other_out = in_thread(use)
    other.join(30)
    assert other_out == ["entered"] and not m.locked()


def test_re_entering_it_in_the_holding_thread_raises_at_once() -> None:
    """Not reentrant, as ``threading.Lock`` -- but instead of waiting for itself forever the
    holder gets a clear ``RuntimeError`` at once, in or out of a task; the outer ``with``
    releases, and nothing is poisoned (no interrupt happened)."""
    m = ml.SafeMutex()

    def task() -> None:
        with m, m:
            pytest.fail("entered twice")

    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="not reentrant"):
        ml.limit_with_token(task, token=ml.Token())
    with pytest.raises(RuntimeError, match="not reentrant"):
        task()
    assert time.monotonic() - t0 < 1.0
    assert not m.poisoned and not m.locked()
    with m:  # still usable
        assert m.locked()


def test_only_the_holder_can_leave_it() -> None:
    """Another thread leaving a ``SafeMutex`` it does not hold (a generator holding it,
    closed in another thread) gets a ``RuntimeError``; the mutex is released *poisoned*
    (its holder will never release it: no thread waits forever, and no thread gets in
    without repairing the state); the holder's own exit then raises too."""
    m = ml.SafeMutex()
    errors: list[BaseException] = []

    def intruder() -> None:
        try:
            m.__exit__(None, None, None)
        except BaseException as e:
            errors.append(e)

    with pytest.raises(RuntimeError, match="does not hold it"):
        with m:
            t = threading.Thread(target=intruder)
            t.start()
            t.join(10)
            assert not m.locked() and m.poisoned
    assert len(errors) == 1 and isinstance(errors[0], RuntimeError), errors
    assert "does not hold it" in str(errors[0])
    with pytest.raises(ml.PoisonedError):
        with m:
            pass
    with m.recover():
        pass
    with m:
        assert not m.poisoned


def test_a_generator_holding_it_closed_in_another_thread_does_not_deadlock() -> None:
    """The reviewer's case: the mutex is not left locked forever."""
    m = ml.SafeMutex()

    def gen() -> Iterator[int]:
        with m:
            yield 1

    g = gen()
    next(g)
    errors: list[BaseException] = []

    def close() -> None:
        try:
            g.close()
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=close)
    t.start()
    t.join(10)
    assert errors and isinstance(errors[0], RuntimeError)
    assert not m.locked() and m.poisoned


def test_contention_under_interrupts_never_deadlocks() -> None:
    """Three threads hammer one mutex, two of them under allocation budgets that run out at
    varying points; the third (no task) repairs it when poisoned and checks the invariant each
    time it gets in. Runs until the checker got in often enough (bounded: a loaded machine
    gives it few turns)."""
    m = ml.SafeMutex()
    state = {"a": 0, "b": 0}
    stop = threading.Event()
    seen = {"broken": 0, "poisoned": 0, "checks": 0, "errors": 0}

    def update() -> None:
        while True:
            try:
                with m:
                    state["a"] += 1
                    touch()
                    state["b"] += 1
            except ml.PoisonedError:
                pass
            str(len(state)) * 100

    def interrupted_worker(limit_step: int) -> None:
        i = 0
        while not stop.is_set():
            i += 1
            if isinstance(ml.limit_allocations(update, limit=limit_step * i % 200_000), ml.Error):
                seen["errors"] += 1

    def checker() -> None:
        while not stop.is_set():
            if m.poisoned:
                # Only this thread repairs, and no one can enter while it is poisoned.
                seen["poisoned"] += 1
                state["b"] = state["a"]
                m.clear_poison()
            try:
                with m:
                    seen["checks"] += 1
                    if state["a"] != state["b"]:
                        seen["broken"] += 1
            except ml.PoisonedError:
                pass
            time.sleep(0.0005)

    threads = [in_thread(lambda s=s: interrupted_worker(s))[0] for s in (7919, 104729)]
    threads.append(in_thread(checker, "checker")[0])
    t0 = time.monotonic()
    while time.monotonic() - t0 < 30 and not (
        time.monotonic() - t0 > 1.0 and seen["checks"] >= 100 and seen["poisoned"] >= 10
    ):
        time.sleep(0.05)
    stop.set()
    for thread in threads:
        thread.join(60)
    assert not any(thread.is_alive() for thread in threads), "deadlock"
    assert not m.locked()
    assert seen["broken"] == 0, seen
    assert seen["errors"] > 50 and seen["checks"] >= 100 and seen["poisoned"] >= 10, seen


def test_recover_holds_the_mutex_despite_the_poison_and_clears_it() -> None:
    m = ml.SafeMutex()

    def hold_and_get_interrupted() -> None:
        with m:
            while True:
                str(time.monotonic())

    assert isinstance(ml.limit_allocations(hold_and_get_interrupted, limit="100 kB"), ml.Error)
    assert m.poisoned
    with pytest.raises(ml.PoisonedError, match="recover"), m:
        pass
    with m.recover() as held:
        assert held is m and m.locked() and m.poisoned  # repairing, still poisoned
    assert not m.poisoned and not m.locked()
    with m:
        pass


def test_recover_interrupted_keeps_the_poison() -> None:
    m = ml.SafeMutex()

    def repair_forever() -> None:
        with m.recover():
            while True:
                str(time.monotonic())

    assert isinstance(ml.limit_allocations(repair_forever, limit="100 kB"), ml.Error)
    assert m.poisoned and not m.locked()
