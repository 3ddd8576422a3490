"""Fork (issue 12, item 6): a child created by ``os.fork`` or multiprocessing's "fork" start
method inside a limited task carries no limit of its parent -- as with threads -- whatever was
pending, armed or watched in the parent at the moment of the fork; the child can open limits of
its own; the parent is unaffected.  Each test runs in a fresh interpreter (forking the pytest
process would copy its threads' state)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

pytestmark = pytest.mark.skipif(
    not hasattr(__import__("os"), "fork"), reason="os.fork is not available"
)


def test_a_child_forked_inside_a_task_has_no_budget(python: Callable[..., Any]) -> None:
    """The parent's budget (1 MB, almost used up) does not follow the child, which allocates
    50 MB without an interrupt; the parent's task still ends as its own limit says.  (3.12
    warns at a fork with threads running; the first warning's formatting imports modules,
    ~120 kB of the 1 MB: not what this test is about.)"""
    python(
        """
        import os, warnings, memprof_limits as ml
        warnings.simplefilter("ignore", DeprecationWarning)
        def task():
            bytearray(900_000)
            pid = os.fork()
            if pid == 0:
                try:
                    data = [bytearray(1000) for _ in range(50_000)]
                    os._exit(0 if len(data) == 50_000 else 3)
                except BaseException:
                    os._exit(4)
            _, status = os.waitpid(pid, 0)
            return os.waitstatus_to_exitcode(status)
        result = ml.limit_allocations(task, limit=1_000_000)
        assert isinstance(result, ml.Ok) and result.value[0] == 0, result
        print("ok")
        """
    )


def test_a_child_forked_with_an_interrupt_pending_is_not_interrupted(
    python: Callable[..., Any],
) -> None:
    """Forked while the parent's task had reasons pending (a token set, a memory limit
    exceeded; the interrupt swallowed, so it comes back): the child runs on, and returns
    through the parent's scopes normally; the parent is still interrupted."""
    python(
        """
        import os, memprof_limits as ml
        masked_call = ml._sampler._masked_call
        token = ml.Token()
        def task():
            try:
                token.set()
                ml.set_global_memory_limit(0)  # every memory sample is over it
                while True:
                    bytearray(100_000)
            except ml.Interrupted:
                pass                           # swallowed: still pending, comes back
            def fork_and_wait():                # masked: the parent is being interrupted
                pid = os.fork()
                if pid:
                    child_status.append(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
                return pid
            # The C entry point itself: a Python wrapper's first line would take the sticky
            # interrupt back before the region.
            if masked_call(fork_and_wait) == 0:
                try:
                    for _ in range(2000):
                        bytearray(100_000)     # many samples: nothing to deliver here
                    return "child"
                except BaseException as e:
                    os._exit(5)
            while True:
                bytearray(100_000)             # the parent is still interrupted
        child_status = []
        result = ml.limit_global_memory(lambda: ml.limit_with_token(task, token=token))
        if result == ml.Ok(ml.Ok("child")):
            os._exit(0)                        # the child returned through the scopes
        assert child_status == [0], child_status
        assert isinstance(result, ml.Error) or isinstance(result.value, ml.Error), result
        print("parent ok")
        """
    )


def test_the_child_can_limit_its_own_tasks(python: Callable[..., Any]) -> None:
    """In the child, a new limit works (exactly) while the parent's scope is still open
    around it."""
    python(
        """
        import os, memprof_limits as ml
        def task():
            pid = os.fork()
            if pid == 0:
                small = ml.limit_allocations(lambda: bytearray(10_000), limit=1_000_000)
                big = ml.limit_allocations(lambda: bytearray(2_000_000), limit=1_000_000)
                t = ml.Token(); t.set()
                tok = ml.limit_with_token(lambda: 1, token=t)
                ok = isinstance(small, ml.Ok) and isinstance(big, ml.Error) and isinstance(
                    tok, ml.Error)
                os._exit(0 if ok else 6)
            _, status = os.waitpid(pid, 0)
            return os.waitstatus_to_exitcode(status)
        result = ml.limit_allocations(task, limit=100_000_000)
        assert result.value[0] == 0, result
        print("ok")
        """
    )


def test_pool_map_inside_a_limited_task_completes(python: Callable[..., Any]) -> None:
    """``multiprocessing`` with the "fork" start method inside a limited task used to hang
    forever (the workers inherited the budget and died interrupted)."""
    proc = python(
        """
        import multiprocessing as mp, memprof_limits as ml
        def square(x):
            data = [bytearray(1000) for _ in range(2000)]   # 2 MB per item: 20 MB > the budget
            return x * x
        def task():
            with mp.get_context("fork").Pool(2) as pool:
                return pool.map(square, range(20))
        # (The first pool imports multiprocessing's modules in the task: about 5.1 MB.)
        result = ml.limit_allocations(task, limit=8_000_000)
        assert isinstance(result, ml.Ok), result
        assert result.value[0] == [x * x for x in range(20)]
        t = ml.Token()
        result = ml.limit_with_token(task, token=t)
        assert result == ml.Ok([x * x for x in range(20)]), result
        print("ok")
        """,
        timeout=120,
    )
    assert "ok" in proc.stdout


def test_the_child_watchdog_redelivers_to_its_own_tasks(python: Callable[..., Any]) -> None:
    """The parent's watchdog thread does not exist in the child; the child starts its own for
    its own tasks (a token set from another thread of the child stops a loop that does not
    allocate)."""
    python(
        """
        import os, threading, memprof_limits as ml
        def busy():
            while True:
                pass
        t = ml.Token(); threading.Timer(0.05, t.set).start()
        assert isinstance(ml.limit_with_token(busy, token=t), ml.Error)   # watchdog started
        def task():
            pid = os.fork()
            if pid == 0:
                t = ml.Token(); threading.Timer(0.05, t.set).start()
                r = ml.limit_with_token(busy, token=t)
                os._exit(0 if isinstance(r, ml.Error) else 7)
            _, status = os.waitpid(pid, 0)
            return os.waitstatus_to_exitcode(status)
        result = ml.limit_allocations(task, limit=10**9)
        assert result.value[0] == 0, result
        print("ok")
        """,
        timeout=60,
    )


def test_the_childs_memory_limit_watches_the_childs_memory(python: Callable[..., Any]) -> None:
    """The resident memory is read from ``/proc/self/statm`` kept open: a child used to read
    its *parent's* (an open ``/proc/self`` file names the process that opened it), so the
    global memory limit of a forked child never fired, whatever it allocated."""
    python(
        """
        import os, memprof_limits as ml
        from memprof_limits import _sampler
        ml.start()
        parent = _sampler.rss_bytes()
        pid = os.fork()
        if pid == 0:
            keep = b"x" * 200_000_000
            own = _sampler.rss_bytes()
            limit = own + 100_000_000
            def hog():
                more = []
                while True:
                    more.append(b"x" * 10_000_000)
            ml.set_global_memory_limit(limit)
            result = ml.limit_global_memory(hog)
            ok = own > parent + 150_000_000 and isinstance(result, ml.Error) and isinstance(
                result.exc, ml.MemoryLimitExceeded)
            os._exit(0 if ok else 6)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert _sampler.rss_bytes() < parent + 50_000_000  # the parent's own, as before
        print("ok")
        """
    )
