"""Limits in asyncio tasks and generators (issue 12, item 5).

A sync ``LimitScope`` cannot follow a task across ``await``: misnesting is a
clear ``RuntimeError`` at once and the thread's bookkeeping stays exact.
``limit_async`` limits one coroutine correctly, step by step.
"""

from __future__ import annotations

import asyncio
import gc
import threading
import time
import warnings
from collections.abc import Generator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from memprof_limits._native import lib  # type: ignore[import-not-found,unused-ignore]

import memprof_limits as ml
from memprof_limits import _sampler
from tests.conftest import run_python

KB = 1000


def assert_clean_thread() -> None:
    """No scope open, nothing pending, no budget, no token watched."""
    state = _sampler.thread_state()
    ctl = state.ctl
    assert state.scopes == []
    assert (int(ctl.active), int(ctl.watch_global), int(ctl.n_tokens)) == (0, 0, 0)
    assert state.pending() == 0
    assert int(lib.ml_budget_end()) == _sampler.NO_BUDGET


def alloc(n: int) -> bytearray:
    return bytearray(n)


# -- sync scopes across await: a clear error, exact bookkeeping --------------------


def test_sync_scopes_held_across_await_by_two_tasks_raise_at_once() -> None:
    """Before: when A's scope closed it removed B's, B then allocated 200 MB under its 1 MB
    limit and ended in ValueError('list.remove(x)') from the library."""
    body_ran: list[str] = []

    async def worker(name: str, delay: float) -> None:
        with ml.LimitScope(allocations="1 MB"):
            body_ran.append(name)
            await asyncio.sleep(delay)

    async def main() -> list[Any]:
        return await asyncio.gather(worker("A", 0.02), worker("B", 0.01), return_exceptions=True)

    a, b = asyncio.run(main())
    assert isinstance(b, RuntimeError) and "cannot open" in str(b)
    assert "holds it across an `await`" in str(b) and "limit_async" in str(b)
    assert isinstance(a, RuntimeError) and "was held across an `await`" in str(a)
    assert body_ran == ["A"]  # B's body never ran without its limit
    assert_clean_thread()


def test_a_scope_around_the_loop_and_scopes_inside_tasks_are_fine() -> None:
    async def worker() -> int:
        with ml.LimitScope(allocations="10 MB") as scope:
            len(alloc(10 * KB))
        await asyncio.sleep(0)
        assert not scope.interrupted
        return scope.allocated_bytes or 0

    async def main() -> list[int]:
        return await asyncio.gather(worker(), worker(), worker())

    with ml.LimitScope(allocations="100 MB") as outer:
        results = asyncio.run(main())
    assert not outer.interrupted and all(r >= 10 * KB for r in results)
    assert_clean_thread()


def test_a_sync_scope_across_await_inside_limit_async_is_refused() -> None:
    async def holds() -> None:
        with ml.LimitScope(allocations="10 MB"):
            await asyncio.sleep(0)

    with pytest.raises(RuntimeError, match="out of order"):
        asyncio.run(ml.limit_async(holds, allocations="100 MB"))
    assert_clean_thread()


# -- generators ------------------------------------------------------------------


def scoped(**limits: Any) -> Generator[ml.LimitScope, None, None]:
    with ml.LimitScope(**limits) as scope:
        yield scope
        yield scope


def test_generators_closed_out_of_order_raise_and_keep_the_other_limit() -> None:
    """The outer generator's 1 MB scope closes first: the inner 100 MB scope must not
    inherit its budget end, and must stay open with its own limit."""
    g1 = scoped(allocations="1 MB")
    next(g1)
    g2 = scoped(allocations="100 MB", token=ml.Token())
    s2 = next(g2)
    with pytest.raises(RuntimeError, match="closed out of order") as info:
        g1.close()
    assert "generator" in str(info.value) and "keep their limits" in str(info.value)
    state = _sampler.thread_state()
    assert state.scopes == [s2]
    assert (int(state.ctl.active), int(state.ctl.n_tokens)) == (1, 1)
    assert int(lib.ml_budget_end()) == s2._end  # its own end, not the closed scope's
    keep = [alloc(100 * KB) for _ in range(50)]  # 5 MB: over the closed 1 MB limit only
    del keep
    g2.close()
    assert not s2.interrupted
    assert_clean_thread()


def test_the_scope_left_open_still_interrupts_with_its_own_limit() -> None:
    g1 = scoped(allocations="100 MB")
    next(g1)
    g2 = scoped(allocations="1 MB")
    s2 = next(g2)
    with pytest.raises(RuntimeError, match="closed out of order"):
        g1.close()
    caught = []
    try:
        keep = [alloc(100 * KB) for _ in range(50)]
        del keep
    except ml.AllocationLimitExceeded as e:
        caught.append(e)
    while True:  # the interrupt is sticky until its scope closes
        try:
            ml.masked(g2.close)
            break
        except ml.Interrupted:
            pass
    assert caught and "allocation limit of 1000000 bytes" in str(caught[0])
    assert s2.interrupted and s2.reason == "allocations"
    assert_clean_thread()


def test_an_enclosing_scope_closed_while_a_generator_holds_one() -> None:
    def task() -> None:
        g = scoped(allocations="10 MB")
        next(g)  # left suspended inside its scope
        task.g = g  # type: ignore[attr-defined]

    with pytest.raises(RuntimeError, match="closed out of order"):
        ml.limit_allocations(task, limit="100 MB")
    state = _sampler.thread_state()
    assert len(state.scopes) == 1 and int(state.ctl.active) == 1  # the generator's, still open
    task.g.close()  # type: ignore[attr-defined]
    assert_clean_thread()


def test_generators_closed_in_order_are_fine() -> None:
    g1 = scoped(allocations="100 MB")
    next(g1)
    g2 = scoped(allocations="100 MB")
    next(g2)
    g2.close()
    g1.close()
    assert_clean_thread()


def test_exit_without_enter_and_twice() -> None:
    scope = ml.LimitScope(allocations="1 MB")
    with pytest.raises(RuntimeError, match="without a matching __enter__"):
        scope.__exit__(None, None, None)
    with scope:
        pass
    with pytest.raises(RuntimeError, match="without a matching __enter__"):
        scope.__exit__(None, None, None)
    assert_clean_thread()


# -- limit_async --------------------------------------------------------------------


def test_returns_ok_and_propagates_other_exceptions_unchanged() -> None:
    async def value() -> str:
        await asyncio.sleep(0)
        return "done"

    assert asyncio.run(ml.limit_async(value, allocations="10 MB")) == ml.Ok("done")
    assert asyncio.run(ml.limit_async(value(), memory=True, token=ml.Token())) == ml.Ok("done")
    error = ZeroDivisionError("mine")

    async def fail() -> None:
        await asyncio.sleep(0)
        raise error

    with pytest.raises(ZeroDivisionError) as info:
        asyncio.run(ml.limit_async(fail, allocations="10 MB", token=ml.Token()))
    assert info.value is error
    assert_clean_thread()


def test_error_iff_its_own_limit_whatever_the_coroutine_does() -> None:
    async def grow() -> None:
        keep = []
        while True:
            keep.append(alloc(10 * KB))
            await asyncio.sleep(0)

    async def swallow_and_return() -> str:
        try:
            await grow()
        except ml.Interrupted:
            pass
        return "pretending"

    async def replace() -> None:
        try:
            await grow()
        except ml.Interrupted:
            raise ValueError("raised while interrupted") from None

    r1 = asyncio.run(ml.limit_async(grow, allocations="1 MB"))
    assert isinstance(r1, ml.Error) and isinstance(r1.exc, ml.AllocationLimitExceeded)
    assert "allocation limit of 1000000 bytes" in str(r1.exc)
    r2 = asyncio.run(ml.limit_async(swallow_and_return, allocations="1 MB"))
    assert isinstance(r2, ml.Error) and "returned normally" in str(r2.exc)
    r3 = asyncio.run(ml.limit_async(replace, allocations="1 MB"))
    assert isinstance(r3, ml.Error) and isinstance(r3.exc, ValueError)
    assert_clean_thread()


def test_interrupts_are_sticky_across_awaits() -> None:
    caught: list[BaseException] = []

    async def stubborn() -> int:
        while len(caught) < 5:
            try:
                while True:
                    alloc(10 * KB)
                    await asyncio.sleep(0.001)
            except ml.Interrupted as e:
                caught.append(e)
        return len(caught)

    result = asyncio.run(ml.limit_async(stubborn, allocations="100 kB"))
    assert isinstance(result, ml.Error) and len(caught) == 5
    assert_clean_thread()


def test_two_tasks_across_await_are_each_charged_their_own_bytes() -> None:
    """Steps interleave: A needs 1.5 MB (limit 1 MB), B 2.5 MB (limit 3 MB: Ok, though A + B
    is 4 MB), C 2.5 MB (limit 2 MB), and an unlimited task allocates 20 MB meanwhile."""

    def stepper(per_step: int, steps: int) -> Any:
        async def run() -> int:
            keep = []
            for _ in range(steps):
                keep.append(alloc(per_step))
                await asyncio.sleep(0.001)
            return len(keep)

        return run

    async def unlimited() -> int:
        keep = []
        for _ in range(20):
            keep.append(alloc(1000 * KB))
            await asyncio.sleep(0.001)
        return len(keep)

    async def main() -> list[Any]:
        return await asyncio.gather(
            ml.limit_async(stepper(300 * KB, 5), allocations="1 MB"),
            ml.limit_async(stepper(500 * KB, 5), allocations="3 MB"),
            ml.limit_async(stepper(500 * KB, 5), allocations="2 MB"),
            unlimited(),
        )

    a, b, c, free = asyncio.run(main())
    assert isinstance(a, ml.Error) and "allocation limit of 1000000 bytes" in str(a.exc)
    assert b == ml.Ok(5)
    assert isinstance(c, ml.Error) and "allocation limit of 2000000 bytes" in str(c.exc)
    assert free == 20
    assert_clean_thread()


def test_the_byte_count_is_exact_and_per_coroutine() -> None:
    """The same coroutine needs the same bytes whether or not other tasks interleave:
    its exact need n passes with limit n and fails with n - 1."""

    async def work() -> None:
        for i in range(5):
            [str(j) for j in range(i * 100)]
            await asyncio.sleep(0)

    def need() -> int:
        low, high = 0, 10**6
        while low < high:  # the smallest limit that passes
            mid = (low + high) // 2
            if isinstance(asyncio.run(ml.limit_async(work, allocations=mid)), ml.Ok):
                high = mid
            else:
                low = mid + 1
        return low

    gc.disable()
    try:
        n = need()

        async def crowded(limit: int) -> object:
            async def noise() -> None:
                for _ in range(20):
                    alloc(50 * KB)
                    await asyncio.sleep(0)

            results = await asyncio.gather(ml.limit_async(work, allocations=limit), noise())
            return results[0]

        assert isinstance(asyncio.run(crowded(n)), ml.Ok)
        assert isinstance(asyncio.run(crowded(n - 1)), ml.Error)
    finally:
        gc.enable()


def test_a_token_interrupts_a_suspended_coroutine_promptly() -> None:
    async def sleeper() -> None:
        await asyncio.sleep(60)

    async def from_a_task() -> tuple[object, float]:
        token = ml.Token()
        asyncio.get_running_loop().call_later(0.05, token.set)
        start = time.monotonic()
        result = await ml.limit_async(sleeper, token=token)
        return result, time.monotonic() - start - 0.05

    async def from_a_thread() -> tuple[object, float]:
        token = ml.Token()
        threading.Timer(0.05, token.set).start()
        start = time.monotonic()
        result = await ml.limit_async(sleeper, token=token)
        return result, time.monotonic() - start - 0.05

    for run in (from_a_task, from_a_thread):
        result, late = asyncio.run(run())
        assert isinstance(result, ml.Error) and isinstance(result.exc, ml.Cancelled)
        assert late < 0.1, f"{run.__name__}: interrupted {late * 1000:.0f} ms after set()"
    assert_clean_thread()


def test_a_token_in_a_worker_thread_loop() -> None:
    results: list[object] = []
    token = ml.Token()

    def worker() -> None:
        async def sleeper() -> None:
            await asyncio.sleep(60)

        results.append(asyncio.run(ml.limit_async(sleeper, token=token)))

    t = threading.Thread(target=worker)
    t.start()
    time.sleep(0.1)
    token.set()
    t.join(5)
    assert not t.is_alive() and isinstance(results[0], ml.Error)


def test_the_awaited_future_is_cancelled_and_cleanup_runs() -> None:
    events: list[str] = []

    async def waits(fut: asyncio.Future[None]) -> None:
        try:
            await fut
        finally:
            events.append("finally")

    async def main() -> tuple[object, bool]:
        fut = asyncio.get_running_loop().create_future()
        token = ml.Token()
        asyncio.get_running_loop().call_later(0.02, token.set)
        result = await ml.limit_async(waits(fut), token=token)
        return result, fut.cancelled()

    result, cancelled = asyncio.run(main())
    assert isinstance(result, ml.Error) and cancelled and events == ["finally"]


def test_a_token_set_before_gives_error_without_running() -> None:
    ran: list[int] = []

    async def task() -> None:
        ran.append(1)

    token = ml.Token()
    token.set()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "coroutine was never awaited"
        result = asyncio.run(ml.limit_async(task(), token=token))
        gc.collect()
    assert isinstance(result, ml.Error) and isinstance(result.exc, ml.Cancelled)
    assert ran == []


def test_tokens_do_not_reach_other_tasks() -> None:
    token = ml.Token()

    async def limited() -> None:
        await asyncio.sleep(60)

    async def bystander() -> str:
        for _ in range(20):
            await asyncio.sleep(0.005)
        return "fine"

    async def main() -> list[Any]:
        asyncio.get_running_loop().call_later(0.02, token.set)
        return await asyncio.gather(ml.limit_async(limited, token=token), bystander())

    limited_result, bystander_result = asyncio.run(main())
    assert isinstance(limited_result, ml.Error) and bystander_result == "fine"


def test_cancelling_the_task_propagates_cancelled_error() -> None:
    async def sleeper() -> None:
        await asyncio.sleep(60)

    async def main(**limits: Any) -> bool:
        task = asyncio.ensure_future(ml.limit_async(sleeper, **limits))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return task.cancelled()

    assert asyncio.run(main())
    assert asyncio.run(main(token=ml.Token(), allocations="1 MB"))
    assert_clean_thread()


def test_timeouts_work_inside() -> None:
    async def slow() -> str:
        try:
            async with asyncio.timeout(0.02):  # type: ignore[attr-defined,unused-ignore]
                await asyncio.sleep(60)
        except TimeoutError:
            return "timed out"
        return "no"

    if not hasattr(asyncio, "timeout"):
        pytest.skip("asyncio.timeout is 3.11+")
    assert asyncio.run(ml.limit_async(slow, token=ml.Token())) == ml.Ok("timed out")


def test_nested_limits_compose() -> None:
    async def grow() -> None:
        keep = []
        while True:
            keep.append(alloc(10 * KB))
            await asyncio.sleep(0)

    inner_results: list[object] = []

    async def outer_cause() -> None:
        inner_results.append(await ml.limit_async(grow, allocations="100 MB"))

    r = asyncio.run(ml.limit_async(outer_cause, allocations="1 MB"))
    assert isinstance(r, ml.Error) and "allocation limit of 1000000 bytes" in str(r.exc)
    assert inner_results == []

    async def inner_cause() -> object:
        return await ml.limit_async(grow, allocations="100 kB")

    r2 = asyncio.run(ml.limit_async(inner_cause, allocations="100 MB"))
    assert isinstance(r2, ml.Ok) and isinstance(r2.value, ml.Error)

    async def charged() -> None:
        inner = await ml.limit_async(lambda: _alloc_async(2 * 1000 * KB), allocations="10 MB")
        assert isinstance(inner, ml.Ok)
        await _alloc_async(2 * 1000 * KB)  # 4 MB in all: over the outer 3 MB

    assert isinstance(asyncio.run(ml.limit_async(charged, allocations="3 MB")), ml.Error)

    token = ml.Token()

    async def outer_token() -> None:
        asyncio.get_running_loop().call_later(0.02, token.set)
        await ml.limit_async(lambda: asyncio.sleep(60), allocations="100 MB")

    r3 = asyncio.run(ml.limit_async(outer_token, token=token))
    assert isinstance(r3, ml.Error) and isinstance(r3.exc, ml.Cancelled)
    assert_clean_thread()


async def _alloc_async(n: int) -> int:
    await asyncio.sleep(0)
    return len(alloc(n))


def test_limit_async_inside_a_sync_limit() -> None:
    async def grow() -> None:
        keep = []
        while True:
            keep.append(alloc(10 * KB))
            await asyncio.sleep(0)

    result = ml.limit_allocations(
        lambda: asyncio.run(ml.limit_async(grow, allocations="100 kB")), limit="100 MB"
    )
    assert isinstance(result, ml.Ok) and isinstance(result.value[0], ml.Error)
    assert_clean_thread()


def test_bad_input_says_what_is_expected() -> None:
    async def coro() -> None:
        pass

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the coroutines given are closed
        with pytest.raises(TypeError, match="memory: expected True or False"):
            ml.limit_async(coro(), memory=1)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="Token"):
            ml.limit_async(coro(), token="stop")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="non-negative number of bytes"):
            ml.limit_async(coro(), allocations=-1)
        with pytest.raises(TypeError, match="coroutine or a function returning one"):
            ml.limit_async(42)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="not a coroutine"):
            ml.limit_async(lambda: 42)  # type: ignore[arg-type,return-value]

        async def main() -> None:
            fut = asyncio.get_running_loop().create_future()
            with pytest.raises(TypeError, match="pass the coroutine itself"):
                ml.limit_async(fut)  # type: ignore[arg-type]

        asyncio.run(main())
        gc.collect()


# -- random interleavings -------------------------------------------------------------

task_spec = st.tuples(
    st.lists(st.integers(0, 40), min_size=1, max_size=6),  # KB allocated per step
    st.sampled_from(["none", "low", "high", "token", "token-high"]),
)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(st.lists(task_spec, min_size=1, max_size=6), st.randoms(use_true_random=False))
def test_random_interleavings(specs: list[tuple[list[int], str]], rnd: Any) -> None:
    """N tasks, random steps and limits, random sleeps: no internal error, and every
    Error is caused by the task's own limit (limits far from the need: no boundary)."""
    tokens = [ml.Token() for _ in specs]

    def make(steps: list[int], i: int) -> Any:
        async def run() -> int:
            keep = []
            for kb in steps:
                keep.append(alloc(kb * KB))
                await asyncio.sleep(rnd.choice([0, 0, 0.001]))
            return sum(steps)

        return run

    async def setter(i: int) -> None:
        await asyncio.sleep(rnd.choice([0, 0.001, 0.002]))
        tokens[i].set()

    async def main() -> list[Any]:
        runs = []
        for i, (steps, kind) in enumerate(specs):
            need = sum(steps) * KB
            limits: dict[str, Any] = {}
            if kind == "low":
                limits["allocations"] = need // 3 if need > 30 * KB else None
            elif kind in ("high", "token-high"):
                limits["allocations"] = 2 * need + 200 * KB
            if kind.startswith("token"):
                limits["token"] = tokens[i]
            runs.append(ml.limit_async(make(steps, i), **limits))
        setters = [setter(i) for i, (_, kind) in enumerate(specs) if kind.startswith("token")]
        return await asyncio.gather(*runs, *setters)

    results = asyncio.run(main())[: len(specs)]
    for (steps, kind), result, token in zip(specs, results, tokens, strict=True):
        need = sum(steps) * KB
        if kind == "low" and need > 30 * KB:
            assert isinstance(result, ml.Error), (steps, kind, result)
            assert isinstance(result.exc, ml.AllocationLimitExceeded)
            assert f"allocation limit of {need // 3} bytes" in str(result.exc)
        elif kind.startswith("token") and isinstance(result, ml.Error):
            assert isinstance(result.exc, ml.Cancelled) and token.is_set()
        else:
            assert result == ml.Ok(sum(steps)), (steps, kind, result)
    assert_clean_thread()


class _Suspend:
    """An awaitable that suspends once (no event loop needed)."""

    def __await__(self) -> Generator[str, None, None]:
        yield "suspended"


def test_closing_the_awaiting_coroutine_closes_the_limited_one() -> None:
    events: list[str] = []

    async def inner() -> None:
        try:
            await _Suspend()
            events.append("resumed")
        finally:
            events.append("finally")

    outer = ml.limit_async(inner, allocations="10 MB", token=ml.Token())
    assert outer.send(None) == "suspended"
    outer.close()
    assert events == ["finally"]
    assert_clean_thread()


def test_importing_the_library_does_not_import_asyncio() -> None:
    run_python(
        """
        import sys, memprof_limits as ml
        assert "asyncio" not in sys.modules
        ml.limit_allocations(lambda: None, limit=100)
        with ml.LimitScope(allocations=100):
            pass
        assert "asyncio" not in sys.modules
        """
    )


@pytest.mark.skipif(not hasattr(asyncio, "eager_task_factory"), reason="eager tasks: 3.12+")
def test_an_eager_task_started_inside_a_scope_nests_properly() -> None:
    """An eager task's first step runs inside its creator's step: its scopes nest inside
    the creator's (no false alarm), and a limit_async in it works."""

    async def child() -> object:
        with ml.LimitScope(allocations="10 MB") as scope:
            alloc(10 * KB)
        inner = await ml.limit_async(lambda: _alloc_async(2000 * KB), allocations="1 MB")
        return scope.interrupted, type(inner).__name__

    async def parent() -> object:
        loop = asyncio.get_running_loop()
        loop.set_task_factory(asyncio.eager_task_factory)  # type: ignore[attr-defined,unused-ignore]
        with ml.LimitScope(allocations="100 MB"):
            task = asyncio.create_task(child())
        return await task

    result = asyncio.run(ml.limit_async(parent, allocations="1 GB"))
    assert result == ml.Ok((False, "Error")), result
    assert_clean_thread()
