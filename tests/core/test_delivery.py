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
    task with nothing pending (50 re-delivery intervals) it made none after its first scan
    (it made ~15 calls per interval before: 700+ in all)."""
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
    assert first > 0, "the profile did not see the watchdog's first scan: the check is blind"
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


def _swallowing_spin(swallow: int, deadline_s: float = 10.0) -> Callable[[], int]:
    """A task that never allocates and swallows its first ``swallow`` interrupts."""

    def task() -> int:
        caught = 0
        end = time.monotonic() + deadline_s
        while True:
            try:
                while time.monotonic() < end:
                    pass
                return -caught  # never interrupted again: the watchdog lost it
            except ml.Interrupted:
                caught += 1
                if caught > swallow:
                    raise

    return task


@pytest.mark.parametrize("where", ["main", "worker"])
def test_a_token_set_before_its_scope_opens_is_redelivered(where: str) -> None:
    """The token was set while the watchdog slept with nothing pending; the scope opening on
    it makes the reason pending (and wakes the watchdog): each swallowed interrupt comes back."""
    results: list[Any] = []

    def run() -> None:
        token = ml.Token()
        token.set()
        time.sleep(0.05)  # the watchdog scans, finds nothing pending, sleeps
        results.append(ml.limit_with_token(_swallowing_spin(3), token=token))

    ml.limit_with_token(lambda: None, token=ml.Token())  # the watchdog exists
    if where == "main":
        run()
    else:
        t = threading.Thread(target=run)
        t.start()
        t.join()
    (result,) = results
    assert isinstance(result, ml.Error) and isinstance(result.exc, ml.Cancelled), result


def test_allocation_and_memory_reasons_pending_without_allocation_are_redelivered() -> None:
    """A reason set by the allocator hook (the sampler, without the GIL) wakes the watchdog
    too: the task that swallows it and stops allocating is interrupted again."""

    def task() -> int:
        bytearray(2_000_000)  # over the budget: the hook sets the reason
        return _swallowing_spin(2)()

    result = ml.limit_allocations(task, limit=1_000_000)
    assert isinstance(result, ml.Error) and isinstance(result.exc, ml.AllocationLimitExceeded)


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
        result = ml.limit_with_token(_swallowing_spin(swallow, deadline_s=3.0), token=token)
        setter.join()
        if not (isinstance(result, ml.Error) and isinstance(result.exc, ml.Cancelled)):
            lost.append((i, delay, swallow, result))
    assert not lost, lost
    assert _delivery.running_tasks() == 0
