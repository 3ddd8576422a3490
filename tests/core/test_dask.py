"""memprof_limits.dask on a real LocalCluster of worker processes (issue 15): typed errors on
the client, workers that survive a memory hog, fuel across workers, timeouts and cancellations
that free a worker's only thread, and a soak of interrupted tasks.

One cluster for the module (two worker processes, one thread each, 600 MB each), with the
plugin registered; tests that need a worker to themselves pin their tasks to one.
"""

from __future__ import annotations

import collections
import os
import pickle
import random
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

distributed = pytest.importorskip("distributed")

import cloudpickle  # noqa: E402
import dask  # noqa: E402
from distributed import Client, Event, LocalCluster  # noqa: E402

import memprof_limits as ml  # noqa: E402
from memprof_limits import dask as mld  # noqa: E402
from memprof_limits.dask import LimitsPlugin, TaskReport, TaskStopped, limited  # noqa: E402

WORKER_MEMORY = 600 * 10**6


@pytest.fixture(scope="module", autouse=True)
def environment_given_back() -> Iterator[None]:
    """Dask's nanny sets variables in the environment of the process that starts it (its
    ``pre-spawn-environ``: ``PYTHONHASHSEED=6640``, ``MALLOC_TRIM_THRESHOLD_``...) before
    spawning a worker: the kernels that later tests start would inherit them."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="module")
def client() -> Iterator[Client]:
    # The workers cannot import this module: its functions travel by value.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    with (
        LocalCluster(
            n_workers=2,
            threads_per_worker=1,
            processes=True,
            memory_limit=WORKER_MEMORY,
            dashboard_address=":0",
            env={"PYTHONHASHSEED": "0"},
        ) as cluster,
        Client(cluster) as c,
    ):
        c.register_plugin(LimitsPlugin())
        yield c


def workers(client: Client) -> list[str]:
    return sorted(client.scheduler_info()["workers"])


def pids(client: Client) -> dict[str, int]:
    return client.run(os.getpid)  # type: ignore[no-any-return]


def settled(client: Client, address: str | None = None) -> dict[str, dict[str, Any]]:
    """The workers' state once no limited task is registered (the end of a cancelled task
    reaches the worker's state machine a little after the next task may have run)."""
    deadline = time.monotonic() + 10
    while True:
        states = client.run(state_of_the_process, workers=[address] if address else None)
        clean = all(s["running"] == (0, 0) and s["deadlines"] == 0 for s in states.values())
        if clean or time.monotonic() > deadline:
            return states  # type: ignore[no-any-return]
        time.sleep(0.05)


# -- tasks


def hog() -> None:
    keep = []
    while True:
        keep.append(bytearray(10**7))


def spin(*_ignored: object) -> None:
    while True:
        pass


def strings(n: int) -> int:
    return len([str(i) for i in range(n)])


def swallow() -> str:
    try:
        [0] * 10**7
    except ml.Interrupted:
        pass
    return "pretending all is fine"


def wait_for(event_name: str) -> str:
    Event(event_name).set()
    spin()
    return "unreachable"


def state_of_the_process() -> dict[str, Any]:
    return {
        "running": mld._running.sizes(),
        "deadlines": len(mld._deadlines),
        "threads": sorted(t.name for t in threading.enumerate()),
        "rss": ml._sampler.rss_bytes(),
        "limit": ml.get_global_memory_limit(),
    }


# -- the plugin ---------------------------------------------------------------------------


def test_the_plugin_sets_a_memory_limit_below_the_nannys(client: Client) -> None:
    limits = {s["limit"] for s in client.run(state_of_the_process).values()}
    # 90 % of the worker's limit: above the pause threshold (80 %), below terminate (95 %).
    assert limits == {int(WORKER_MEMORY * mld.DEFAULT_FRACTION)}, limits


def test_a_memory_hog_is_stopped_and_its_worker_lives_on(client: Client) -> None:
    before = pids(client)
    future = client.submit(limited(hog), pure=False)
    with pytest.raises(ml.MemoryLimitExceeded) as info:
        future.result(timeout=120)
    exc = info.value
    assert isinstance(exc, TaskStopped) and isinstance(exc, Exception)
    report = exc.report
    assert report.reason == "memory" and report.pid in before.values()
    assert report.allocated_bytes > WORKER_MEMORY * 0.5, report
    assert "in hog" in (report.where or ""), report.where
    assert "global memory limit of" in str(exc) and f"pid {report.pid}" in str(exc)
    # Same processes; the memory was given back; the worker takes the next task.
    assert pids(client) == before
    rss = client.run(state_of_the_process)[report.worker]["rss"]
    assert rss < WORKER_MEMORY * 0.5, rss
    again = client.submit(strings, 10, workers=[report.worker], pure=False)
    assert again.result(timeout=30) == 10


def one_block(n: int) -> int:
    return len(b"x" * n)  # every page touched before Python runs again


def numpy_block(n: int) -> int:
    import numpy as np

    return int(np.ones(n // 8).nbytes)


@pytest.mark.parametrize("make", [one_block, numpy_block])
def test_one_block_past_the_nannys_threshold_is_refused(client: Client, make: Any) -> None:
    """One allocation bigger than the room between the plugin's limit and the nanny's (5 % of
    the worker's memory, here 30 MB) whose pages are touched at once: before, the worker was
    killed by the nanny before the interrupt could land (measured: 100 MB blocks in a 400 MB
    worker).  Now the block is refused before its pages are touched: the task's call raises,
    the task gets MemoryLimitExceeded, the worker never held the block (same pid, RSS low)."""
    if make is numpy_block:
        pytest.importorskip("numpy")
    before = pids(client)
    for n in (int(WORKER_MEMORY * 0.95), WORKER_MEMORY * 2, 10**12):
        future = client.submit(limited(make), n, pure=False)
        with pytest.raises(ml.MemoryLimitExceeded) as info:
            future.result(timeout=60)
        report = info.value.report
        assert report.reason == "memory" and report.peak_rss_bytes < WORKER_MEMORY * 0.5, report
        assert "requested" in str(info.value), info.value
    assert pids(client) == before
    assert client.submit(limited(make), 10 * 2**20, pure=False).result(timeout=30) > 0


def test_an_allocation_limit_is_an_error_with_the_figures(client: Client) -> None:
    future = client.submit(limited(strings, allocations="1 MB"), 10**6, pure=False)
    with pytest.raises(ml.AllocationLimitExceeded) as info:
        future.result(timeout=60)
    report = info.value.report
    assert report.reason == "allocations"
    assert 1_000_000 < report.allocated_bytes < 1_200_000, report
    assert report.wall_time_s > 0 and report.peak_rss_bytes > 10**7
    assert future.status == "error"


def test_a_task_that_swallows_the_interrupt_is_still_an_error(client: Client) -> None:
    future = client.submit(limited(swallow, allocations="1 MB"), pure=False)
    # (the interrupt may be delivered again after the `except`: sticky interrupts)
    with pytest.raises(ml.AllocationLimitExceeded, match="allocation limit of 1000000 bytes"):
        future.result(timeout=60)


def test_report_returns_the_value_and_the_figures(client: Client) -> None:
    value, report = client.submit(
        limited(strings, allocations="100 MB", report=True), 1000, pure=False
    ).result(timeout=60)
    assert value == 1000
    assert isinstance(report, TaskReport) and report.reason is None and report.where is None
    assert report.worker in workers(client) and 40_000 < report.allocated_bytes < 200_000


def test_other_exceptions_propagate_unchanged(client: Client) -> None:
    future = client.submit(limited(int, allocations="1 MB"), "not a number", pure=False)
    with pytest.raises(ValueError, match="invalid literal"):
        future.result(timeout=60)


def test_the_same_task_counts_the_same_bytes_on_both_workers(client: Client) -> None:
    """Fuel is deterministic across processes: the same count on every worker, but for the
    odd task during which the worker's event loop ran Python (it shares CPython's free lists
    with the task): measured 39 of 40 identical, the other 64 bytes apart (docs/dask.md)."""
    counts: dict[str, collections.Counter[int]] = {}
    for address in workers(client):
        counts[address] = collections.Counter(
            client.submit(
                limited(strings, allocations="100 MB", report=True),
                100_000,
                workers=[address],
                pure=False,
            )
            .result(timeout=60)[1]
            .allocated_bytes
            for _ in range(12)
        )
    modes = {c.most_common(1)[0][0] for c in counts.values()}
    assert len(modes) == 1, counts
    for c in counts.values():
        assert c.most_common(1)[0][1] >= 9, counts
        assert max(c) - min(c) <= 1024, counts


# -- timeouts and cancellation ------------------------------------------------------------


def test_a_timeout_stops_a_loop_that_never_allocates_and_frees_the_thread(
    client: Client,
) -> None:
    address = workers(client)[0]
    start = time.monotonic()
    future = client.submit(limited(spin, timeout=0.5), workers=[address], pure=False)
    with pytest.raises(ml.Cancelled, match=r"timeout of 0.5 s reached") as info:
        future.result(timeout=60)
    assert time.monotonic() - start < 10
    assert info.value.report.reason == "timeout"
    assert 0.5 <= info.value.report.wall_time_s < 3, info.value.report
    # The worker's only thread is free: the next task runs at once.
    assert client.submit(strings, 5, workers=[address], pure=False).result(timeout=10) == 5


def test_cancelling_a_running_task_stops_it_and_frees_the_thread(client: Client) -> None:
    address = workers(client)[1]
    started = Event("cancel-me-started")
    future = client.submit(limited(wait_for), "cancel-me-started", workers=[address], pure=False)
    assert started.wait(timeout=30)
    time.sleep(0.2)  # well inside the loop
    start = time.monotonic()
    future.cancel()
    nxt = client.submit(strings, 7, workers=[address], pure=False)
    assert nxt.result(timeout=30) == 7
    assert time.monotonic() - start < 1.0
    state = settled(client, address)[address]
    assert state["running"] == (0, 0) and state["deadlines"] == 0, state


def test_a_worker_takes_thousands_of_interrupted_tasks(client: Client) -> None:
    """Interrupted by allocations, by timeouts and by cancellation: no thread, registry entry
    or memory left behind, and the workers are the same processes."""
    before_pids = pids(client)
    before = client.run(state_of_the_process)
    # Half of them from the canonical collector state (the default with a budget), half not.
    fuel = [
        *client.map(limited(strings, allocations="100 kB"), [10**5 + i for i in range(1000)]),
        *client.map(
            limited(strings, allocations="100 kB", deterministic=False),
            [10**5 + i for i in range(1000)],
        ),
    ]
    timeouts = client.map(limited(spin, timeout=0.01), range(100), pure=False)
    for batch in (fuel, timeouts):
        for f in batch:
            assert isinstance(f.exception(timeout=120), TaskStopped)
    for i in range(20):
        name = f"soak-{i}"
        f = client.submit(limited(wait_for), name, pure=False)
        assert Event(name).wait(timeout=30)
        f.cancel()
    # Cancellations at random moments: before the task starts, while it registers, while it
    # runs, as it ends, after it ended.
    rng = random.Random(15)
    for _ in range(200):
        f = client.submit(limited(strings, timeout=5), rng.choice([10, 10**4, 10**6]), pure=False)
        time.sleep(rng.uniform(0, 0.01))
        f.cancel()
    assert client.submit(strings, 3, pure=False).result(timeout=30) == 3
    after = settled(client)
    assert pids(client) == before_pids
    for address, state in after.items():
        assert state["running"] == (0, 0), state
        assert state["deadlines"] == 0, state
        assert state["threads"] == before[address]["threads"] or set(state["threads"]) - set(
            before[address]["threads"]
        ) <= {"memprof-limits-deadlines"}, (before[address], state)
        assert state["rss"] < before[address]["rss"] + 50 * 10**6, (before[address], state)


# -- on the client, without a cluster -----------------------------------------------------


def test_the_exceptions_pickle_with_their_report() -> None:
    report = TaskReport(10, 20, 0.5, "allocations", 1, "tcp://w", "where")
    for cls in (mld.AllocationLimitExceeded, mld.MemoryLimitExceeded, mld.Cancelled):
        exc = cls("message")
        exc.report = report
        again = pickle.loads(pickle.dumps(exc))
        assert type(again) is cls and str(again) == "message" and again.report == report
        assert isinstance(again, ml.Interrupted) and isinstance(again, Exception)


def test_a_limited_function_runs_outside_a_worker_too() -> None:
    assert limited(strings, allocations="10 MB", timeout=10)(100) == 100
    with pytest.raises(mld.AllocationLimitExceeded):
        limited(strings, allocations="10 kB")(10**5)
    assert mld._running.sizes() == (0, 0) and len(mld._deadlines) == 0


def test_limited_keeps_the_functions_name_for_dask() -> None:
    wrapped = limited(strings, allocations="1 MB", timeout=2)
    assert wrapped.__name__ == "strings"
    assert repr(wrapped).startswith("limited(<function strings")
    assert pickle.loads(pickle.dumps(wrapped))(10) == 10


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"fn": 3}, TypeError, "fn: expected a function, got 3"),
        ({"allocations": "lots"}, ValueError, "allocation limit"),
        ({"memory": "1 GB"}, TypeError, r"memory: expected None, True or False.*LimitsPlugin"),
        ({"timeout": 0}, ValueError, "timeout: expected a positive number of seconds, got 0"),
        ({"timeout": float("inf")}, ValueError, "positive number of seconds"),
        ({"timeout": "1s"}, TypeError, "timeout: expected a number of seconds, got '1s'"),
        ({"timeout": True}, TypeError, "timeout: expected a number of seconds"),
        ({"timeout": 10**400}, ValueError, "positive number of seconds"),
        ({"report": 1}, TypeError, "report: expected True or False"),
        ({"deterministic": "yes"}, TypeError, "deterministic: expected None, True or False"),
    ],
)
def test_bad_arguments_say_what_is_expected(
    kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    fn = kwargs.pop("fn", strings)
    with pytest.raises(error, match=match):
        limited(fn, **kwargs)


def test_an_async_function_is_refused() -> None:
    async def coro() -> None:
        pass

    async def agen() -> Any:
        yield 1

    for fn in (coro, agen):
        with pytest.raises(TypeError, match=r"async function.*limit_async"):
            limited(fn)


def test_a_function_that_returns_a_coroutine_is_an_error() -> None:
    """Only the call is limited, not the coroutine it returns: said at once, not later."""

    async def coro() -> int:
        return 1

    class AsyncCallable:
        async def __call__(self) -> int:
            return 1

    for fn in (lambda: coro(), AsyncCallable()):
        with pytest.raises(TypeError, match=r"returned coroutine.*limit_async"):
            limited(fn)()


def test_memory_true_needs_a_limit_in_the_process() -> None:
    assert ml.get_global_memory_limit() is None
    with pytest.raises(RuntimeError, match="no global memory limit; register"):
        limited(strings, memory=True)(10)


class FakeWorker:
    def __init__(self, memory_limit: int | None) -> None:
        self.memory_manager = type("M", (), {"memory_limit": memory_limit})()


def test_the_plugins_memory_policy() -> None:
    assert mld.worker_memory_limit(None, FakeWorker(10**9)) == 900_000_000
    assert mld.worker_memory_limit(10**8, FakeWorker(10**9)) == 10**8
    assert mld.worker_memory_limit("off", FakeWorker(10**9)) is None
    # A worker without a memory limit: the library's default for the machine.
    assert mld.worker_memory_limit(None, FakeWorker(None)) == ml.default_memory_limit().bytes
    # A lower terminate threshold: 5 points below it.
    with dask.config.set({"distributed.worker.memory.terminate": 0.8}):
        assert mld.worker_memory_limit(None, FakeWorker(10**9)) == 750_000_000
    with dask.config.set({"distributed.worker.memory.terminate": False}):
        assert mld.worker_memory_limit(None, FakeWorker(10**9)) == 900_000_000


def test_the_plugin_refuses_a_bad_memory_limit() -> None:
    with pytest.raises(ValueError, match="memory limit"):
        LimitsPlugin(memory="a lot")
    assert repr(LimitsPlugin(memory="off")) == "LimitsPlugin(memory='off')"


def test_a_cancellation_that_arrives_before_the_task_registers_is_not_lost() -> None:
    """The worker may move the task to cancelled between the thread starting it and the
    wrapper registering its key: the plugin remembers the key until the worker is done."""
    from distributed.utils import set_thread_state

    plugin = LimitsPlugin()
    plugin.transition("early", "executing", "released")
    with set_thread_state(key="early"):
        with pytest.raises(mld.Cancelled, match="cancelled while it ran") as info:
            limited(spin)()
    assert info.value.report.reason == "cancelled"
    assert mld._running.sizes() == (0, 1)
    plugin.transition("early", "cancelled", "released")  # the worker is done with it
    assert mld._running.sizes() == (0, 0)
    with set_thread_state(key="early"):  # the same key, run again: not cancelled
        assert limited(strings)(3) == 3


def test_a_cancellation_stops_only_its_own_task() -> None:
    """Two tasks on two threads of one worker: cancelling one leaves the other running."""
    with (
        LocalCluster(
            n_workers=1, threads_per_worker=2, processes=True, dashboard_address=":0"
        ) as cluster,
        Client(cluster) as c,
    ):
        c.register_plugin(LimitsPlugin())
        first = c.submit(limited(wait_for), "first-started", pure=False)
        second = c.submit(limited(wait_for, timeout=3), "second-started", pure=False)
        assert Event("first-started", client=c).wait(30)
        assert Event("second-started", client=c).wait(30)
        start = time.monotonic()
        first.cancel()
        time.sleep(1)
        assert second.status == "pending"  # still running
        with pytest.raises(ml.Cancelled, match="timeout of 3 s"):
            second.result(timeout=30)
        assert time.monotonic() - start > 1.5
        assert c.submit(strings, 4, pure=False).result(timeout=10) == 4
        (state,) = settled(c).values()
        assert state["running"] == (0, 0), state


def test_an_absurd_timeout_does_not_stop_the_watch_of_the_others() -> None:
    """A wait longer than ``threading.TIMEOUT_MAX`` raises OverflowError: the deadline thread
    would have died with it, and every later timeout of the process would have been lost."""
    assert limited(strings, timeout=1e300)(10) == 10
    slow = limited(strings, timeout=1e300)
    with pytest.raises(mld.Cancelled, match=r"timeout of 0\.2 s"):
        limited(lambda: [slow(10) for _ in iter(int, 1)], timeout=0.2)()
    assert [t.name for t in threading.enumerate()].count("memprof-limits-deadlines") == 1
    assert len(mld._deadlines) == 0


def test_a_cancellation_that_arrives_after_the_task_ended_touches_nothing() -> None:
    from distributed.utils import set_thread_state

    plugin = LimitsPlugin()
    with set_thread_state(key="late"):
        assert limited(strings)(3) == 3
    plugin.transition("late", "executing", "released")  # the task had just returned
    assert strings(10**5) == 10**5  # no interrupt anywhere
    assert mld._running.sizes() == (0, 1)
    plugin.transition("late", "cancelled", "released")
    assert mld._running.sizes() == (0, 0)


@pytest.mark.skipif(
    threading.current_thread() is not threading.main_thread(), reason="signals: main thread"
)
def test_a_raising_signal_handler_never_leaves_a_registration_behind() -> None:
    """A ``SIGALRM`` handler raising ``KeyboardInterrupt`` at every moment of a limited call
    (before, while registering, running, ending, after): no registration, deadline or peak
    count is left behind, and the next call runs.  Found by this stress: a handler left unwrapped
    by the library's own installation broke the registrations' masked regions (a registration
    left behind, once a lock held for good: test_signals.py has the fix's test)."""
    import signal

    from distributed.utils import set_thread_state

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    task = limited(strings, allocations="100 MB", timeout=100)
    saved = signal.signal(signal.SIGALRM, handler)
    interrupted = 0
    try:
        for delay_us in range(1, 3000, 7):
            with set_thread_state(key=("alarm", delay_us)):
                try:
                    signal.setitimer(signal.ITIMER_REAL, delay_us / 1e6)
                    task(2000)
                    time.sleep(0.004)
                except KeyboardInterrupt:
                    interrupted += 1
                while True:  # (the alarm may still be pending)
                    try:
                        signal.setitimer(signal.ITIMER_REAL, 0)
                        break
                    except KeyboardInterrupt:
                        pass
            assert mld._running.sizes() == (0, 0), delay_us
            assert (len(mld._deadlines), mld._peak._tasks) == (0, 0), delay_us
            assert ml._sampler.thread_state().scopes == [], delay_us
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, saved)
    assert interrupted > 100, interrupted
    assert task(10) == 10


def test_registering_the_plugin_again_changes_the_limit(client: Client) -> None:
    try:
        client.register_plugin(LimitsPlugin(memory="200 MB"))
        assert {s["limit"] for s in client.run(state_of_the_process).values()} == {200 * 10**6}
        client.register_plugin(LimitsPlugin(memory="off"))
        assert {s["limit"] for s in client.run(state_of_the_process).values()} == {None}
    finally:
        client.register_plugin(LimitsPlugin())
    limits = {s["limit"] for s in client.run(state_of_the_process).values()}
    assert limits == {int(WORKER_MEMORY * mld.DEFAULT_FRACTION)}, limits


def test_teardown_gives_back_the_limit_and_forgets_cancellations() -> None:
    plugin = LimitsPlugin(memory="300 MB")
    worker = FakeWorker(None)
    ml.set_global_memory_limit("1 GB")
    try:
        plugin.setup(worker)
        assert ml.get_global_memory_limit() == 300 * 10**6
        plugin.transition("stale", "executing", "released")
        plugin.teardown(worker)
        assert ml.get_global_memory_limit() == 10**9
        assert mld._running.sizes() == (0, 0)
    finally:
        ml.set_global_memory_limit(None)


def test_a_fork_child_forgets_the_parents_tasks(python: Any) -> None:
    python(
        """
        import os
        from memprof_limits import dask as mld

        def fork_inside():
            pid = os.fork()
            if pid == 0:
                state = (mld._running.sizes(), len(mld._deadlines), mld._peak._tasks)
                ok = state == ((0, 0), 0, 0) and mld.limited(len, timeout=5)("abc") == 3
                os._exit(0 if ok else 1)
            _, status = os.waitpid(pid, 0)
            return os.waitstatus_to_exitcode(status)

        from distributed.utils import set_thread_state
        with set_thread_state(key="parent-task"):
            assert mld.limited(fork_inside, timeout=60)() == 0
        """
    )


def test_the_peak_sees_a_block_freed_between_two_samples(python: Any) -> None:
    """A 200 MB block allocated and freed with no sample in between (a big block is read
    before its pages are touched; the end reads the RSS after it is gone): the kernel's
    high-water mark of the process sees it.  Fresh interpreter: no older, higher peak."""
    python(
        """
        from memprof_limits import dask as mld

        def spike():
            block = b"x" * (200 * 2**20)
            del block
            return "done"

        value, report = mld.limited(spike, report=True)()
        assert value == "done" and report.peak_rss_bytes > 200 * 2**20, report
        value, report = mld.limited(len, report=True)("abc")  # an older peak: not this task's
        assert report.peak_rss_bytes < 150 * 2**20, report
        """
    )
