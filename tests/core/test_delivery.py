"""The watchdog (``_delivery._watch``): it re-delivers every interrupt that a task swallowed,
however the reason became pending, and it runs no Python while nothing is pending -- so that
it shares none of CPython's free lists with the tasks (the same task, the same count, on a
loaded machine too: issue 14)."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

import memprof_limits as ml
from memprof_limits import _delivery


def test_the_watchdog_runs_no_python_while_nothing_is_pending(
    python: Callable[..., Any],
) -> None:
    """A profile function sees every Python call of the watchdog thread: during a 0.5 s
    task with nothing pending (50 re-delivery intervals) it made none once started (it made
    ~15 calls per interval before: 700+ in all)."""
    out = python(
        """
        import sys, threading, time, memprof_limits as ml
        calls = {}
        def profile(frame, event, arg):
            if event == "call":
                name = threading.current_thread().name
                calls[name] = calls.get(name, 0) + 1
        threading.setprofile(profile)
        def spin():
            end = time.monotonic() + 0.5
            while time.monotonic() < end:
                pass
        assert isinstance(ml.limit_with_token(lambda: time.sleep(0.05), token=ml.Token()), ml.Ok)
        before = calls.get("memprof_limits-watchdog", 0)
        assert isinstance(ml.limit_with_token(spin, token=ml.Token()), ml.Ok)
        assert isinstance(ml.limit_allocations(spin, limit=10**9), ml.Ok)
        print(before, calls.get("memprof_limits-watchdog", 0) - before)
        """
    ).stdout.split()
    first, during = map(int, out)
    assert first > 0, "the profile did not see the watchdog start: the check is blind"
    assert during == 0, out


def _voluntary_switches(native_id: int) -> int:
    with open(f"/proc/self/task/{native_id}/status") as f:
        return int(
            next(line for line in f if line.startswith("voluntary_ctxt_switches")).split()[1]
        )


def test_the_watchdog_does_not_wake_while_no_task_is_open() -> None:
    """An idle kernel or REPL has no task open for hours: the watchdog then blocks instead
    of waking every re-delivery interval (it would have woken ~50 times here); during a task
    it polls in C."""
    assert isinstance(ml.limit_with_token(lambda: None, token=ml.Token()), ml.Ok)
    watchdog = _delivery._watchdog
    assert watchdog is not None and watchdog.native_id is not None
    time.sleep(0.05)
    before = _voluntary_switches(watchdog.native_id)
    time.sleep(0.5)
    idle = _voluntary_switches(watchdog.native_id) - before
    assert idle <= 2, idle
    before = _voluntary_switches(watchdog.native_id)
    assert isinstance(ml.limit_with_token(lambda: time.sleep(0.3), token=ml.Token()), ml.Ok)
    assert _voluntary_switches(watchdog.native_id) - before >= 10  # the control: it polls


def _swallowing_spin(
    swallow: int, caught: list[int] | None = None, deadline_s: float = 10.0
) -> Callable[[], int]:
    """A task that never allocates and swallows its first ``swallow`` interrupts (appends
    each to ``caught``).  Not ``while cond: pass``: on CPython 3.13.0 an exception raised at
    that loop's back edge skips the ``except`` around it (docs/recovering.md).  An interrupt
    can also land between the ``except`` and the next ``try`` (the outer loop's back edge):
    then it ends the task with fewer swallowed -- not lost, so the tests bound the count."""
    seen = caught if caught is not None else []

    def task() -> int:
        end = time.monotonic() + deadline_s
        while True:
            try:
                i = 0
                while True:
                    i ^= 1
                    if time.monotonic() >= end:
                        return -len(seen)  # never interrupted again: the watchdog lost it
            except ml.Interrupted:
                seen.append(1)
                if len(seen) > swallow:
                    raise

    return task


@pytest.mark.parametrize("where", ["main", "worker"])
def test_a_token_set_while_the_watchdog_is_blocked_is_redelivered(where: str) -> None:
    """The watchdog blocked with no task open; a task opens (waking it to poll) and its token
    is set later: each interrupt the task swallows comes back."""
    results: list[Any] = []
    caught: list[int] = []

    def run() -> None:
        token = ml.Token()
        threading.Timer(0.05, token.set).start()
        results.append(ml.limit_with_token(_swallowing_spin(3, caught), token=token))

    ml.limit_with_token(lambda: None, token=ml.Token())  # the watchdog exists
    time.sleep(0.05)  # and blocks: no task open
    if where == "main":
        run()
    else:
        t = threading.Thread(target=run)
        t.start()
        t.join()
    (result,) = results
    assert isinstance(result, ml.Error) and isinstance(result.exc, ml.Cancelled), result
    assert 2 <= len(caught) <= 4, caught  # re-delivered after a swallow (see _swallowing_spin)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_restarted_watchdog_redelivers_what_was_pending_before_it_started() -> None:
    """A watchdog that died is started again by the next task that opens; a reason that was
    pending before (a task in another thread that swallowed its interrupt) must not wait for
    the next change of any reason to be re-delivered."""
    caught: list[int] = []
    results: list[Any] = []
    token = ml.Token()
    original = _delivery.nudge
    died = threading.Event()

    def dying_once(st: Any) -> None:  # (pytest reports the thread's SystemExit as a warning)
        if threading.current_thread() is _delivery._watchdog and not died.is_set():
            died.set()
            raise SystemExit  # ends the watchdog thread (an Exception is survived)
        original(st)

    def worker() -> None:
        results.append(ml.limit_with_token(_swallowing_spin(3, caught), token=token))

    _delivery.nudge = dying_once  # type: ignore[assignment]
    try:
        ml.limit_with_token(lambda: None, token=ml.Token())  # the watchdog exists
        t = threading.Thread(target=worker)
        t.start()
        time.sleep(0.05)
        token.set()  # delivered by the setter, swallowed; the watchdog's first nudge kills it
        assert died.wait(5), "the watchdog never re-delivered: the check is blind"
        old = _delivery._watchdog
        assert old is not None
        old.join(5)
        assert not old.is_alive() and len(caught) == 1, caught
        ml.limit_with_token(lambda: time.sleep(0.2), token=ml.Token())  # a new watchdog
        t.join(15)
    finally:
        _delivery.nudge = original  # type: ignore[assignment]
    (result,) = results
    assert isinstance(result, ml.Error) and isinstance(result.exc, ml.Cancelled), result
    assert 2 <= len(caught) <= 4, caught


def test_allocation_and_memory_reasons_pending_without_allocation_are_redelivered() -> None:
    """A reason set by the allocator hook (the sampler, without the GIL) wakes the watchdog
    too: the task that swallows it and stops allocating is interrupted again."""

    caught: list[int] = []

    def task() -> int:
        try:
            bytearray(2_000_000)  # over the budget: the hook sets the reason
        except ml.Interrupted:
            caught.append(1)
        return _swallowing_spin(2, caught)()

    result = ml.limit_allocations(task, limit=1_000_000)
    assert isinstance(result, ml.Error) and isinstance(result.exc, ml.AllocationLimitExceeded)
    assert 2 <= len(caught) <= 3, caught


def _started(task: Callable[[], int], started: list[int]) -> Callable[[], int]:
    def run() -> int:
        started.append(1)
        return task()

    return run


def test_random_coincidences_of_set_open_and_idle_lose_no_redelivery() -> None:
    """Hundreds of rounds: the token is set by another thread at a random moment around the
    scope's opening and the watchdog's sleep (before, during, after); the task swallows the
    first interrupts.  Every round ends interrupted, none runs to its deadline."""
    rng = random.Random(1234)
    lost = []
    for i in range(200):
        token = ml.Token()
        delay = rng.choice([0.0, 0.0001, 0.001, 0.005, 0.009, 0.011, 0.02])
        swallow = rng.randrange(3)
        setter = threading.Timer(delay, token.set)
        setter.start()
        if rng.random() < 0.5:
            time.sleep(rng.random() * 0.012)
        caught: list[int] = []
        started: list[int] = []
        result = ml.limit_with_token(
            _started(_swallowing_spin(swallow, caught, 3.0), started), token=token
        )
        setter.join()
        cancelled = isinstance(result, ml.Error) and isinstance(result.exc, ml.Cancelled)
        # (A token set before the task started: limit_with_token does not start it.)
        if not cancelled or (started and not 1 <= len(caught) <= swallow + 1):
            lost.append((i, delay, swallow, len(caught), result))
    assert not lost, lost
    assert _delivery.running_tasks() == 0
