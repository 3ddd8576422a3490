"""The engine's life cycle against running tasks (issue 12, item 15): ``stop()``/``start()`` from
another thread cannot let a running task escape its limit; ``stop()`` refuses while any thread
runs a task, with a clear error, and works once they are done."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

import memprof_limits as ml


def test_stop_from_another_thread_while_a_task_runs_is_refused() -> None:
    """A task under a 10 MB budget keeps its budget while another thread tries to stop and
    restart the engine (before: it ran 165 MB past it)."""
    inside = threading.Event()
    done = threading.Event()
    refused: list[str] = []
    allocated: list[int] = []

    def task() -> None:
        inside.set()
        total = 0
        while total < 300_000_000:
            bytearray(1_000_000)
            total += 1_000_000
            allocated.append(total)
            if total == 5_000_000:
                time.sleep(0.2)  # the other thread tries now

    def meddle() -> None:
        inside.wait(10)
        for _ in range(20):
            try:
                ml.stop()
                ml.start()
            except RuntimeError as e:
                refused.append(str(e))
            if done.is_set():
                break
            time.sleep(0.01)

    meddler = threading.Thread(target=meddle)
    meddler.start()
    result = ml.limit_allocations(task, limit="10 MB")
    done.set()
    meddler.join(30)
    assert isinstance(result, ml.Error), result
    assert max(allocated) <= 11_000_000, max(allocated)
    assert refused and "running tasks under limits" in refused[0], refused
    assert ml.is_started()
    ml.stop()  # no task now: allowed
    assert not ml.is_started()
    ml.start()


def test_stop_inside_a_task_is_refused_too() -> None:
    """The task's own thread counts as well."""
    with pytest.raises(RuntimeError, match="running tasks under limits"):
        ml.limit_with_token(ml.stop, token=ml.Token())
    assert ml.is_started()


def test_a_subinterpreter_cannot_take_over_the_process_wide_callbacks(
    python: Callable[..., Any],
) -> None:
    """A (legacy) subinterpreter can load the compiled module; importing the library there
    used to hand the C side callbacks of that interpreter, which died with it: the next fork
    in the main interpreter called them (``NameError: getattr``, found by CPython's
    test_threading).  The import is refused there with a clear error, and the main
    interpreter's engine, limits and fork reset stay intact."""
    proc = python(
        """
        import os, _testcapi, memprof_limits as ml
        ml.start()
        rc = _testcapi.run_in_subinterp('''
        try:
            import memprof_limits
            print("imported")
        except ImportError as e:
            print("refused:", e)
        ''')
        assert rc == 0, rc
        pid = os.fork()
        if pid == 0:
            r = ml.limit_allocations(lambda: bytearray(10**7), limit="1 MB")
            os._exit(0 if isinstance(r, ml.Error) else 3)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, status
        r = ml.limit_allocations(lambda: bytearray(10**7), limit="1 MB")
        assert isinstance(r, ml.Error) and isinstance(r.exc, ml.AllocationLimitExceeded), r
        print("main ok")
        """
    )
    assert proc.stdout.splitlines() == [
        "refused: memprof_limits runs in the main interpreter only (its allocator hooks are "
        "process-wide): import and start it in the main interpreter",
        "main ok",
    ], proc.stdout
    assert proc.stderr == "", proc.stderr
