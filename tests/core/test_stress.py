"""Stress tests for interrupt-safe state (issue 4).

Bombardment
    A task loops over the interrupt-safe idioms -- ``with ml.protect(lock)``,
    ``ml.with_resource`` around a counter pair, a ``SafeMutex``, a ``Guarded`` transaction --
    while interrupts arrive at random moments: tokens set by another thread after a random
    short delay (the task on a worker thread, armed by ``ml_arm``; or on the main thread,
    reached by the library's real signal), and allocation budgets that run out at random
    points (armed by the allocator hook). Expected: every interrupt gives ``Error``, no lock is
    leaked, no invariant is broken, nothing deadlocks. The CONTROL runs the same harness with
    the usual unmasked idioms (a Python ``__enter__`` that calls ``lock.acquire()``,
    ``try``/``finally``, a hand-written rollback) and must see leaks and broken invariants:
    that proves the harness can see them.

CPython's one-line-loop bugs
    gh-108214 (3.11, 3.12) and gh-130279 (3.13): an exception raised at the back-edge of a
    one-line loop skips the enclosing ``except``/``finally``/``__exit__``. The test pins which
    shapes are affected on each version, and shows that ``with_resource``'s release still runs
    and that the task still gives ``Error``.

Sisyphus
    OCaml memprof-limits' example: two threads push onto a shared stack protected by a
    ``SafeMutex`` under a global memory limit; when interrupted, the stack is wiped and the
    work restarts after ``ml.release_memory()``. It must never deadlock, fail prematurely or
    expose an invalid state.

``ML_STRESS_SCALE`` (default 1) multiplies the number of interrupts and the durations.
"""

from __future__ import annotations

import os
import queue
import random
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

import memprof_limits as ml
from memprof_limits import _sampler
from tests.conftest import run_python

SCALE = float(os.environ.get("ML_STRESS_SCALE", "1"))
BIG = 10**12  # counters far from the small-int cache: every update allocates


def scaled(n: float) -> int:
    return max(1, int(n * SCALE))


def touch() -> None:
    """A Python call: a delivery point."""


@pytest.fixture
def fast_switching() -> Iterator[None]:
    """Hand the GIL over often, so that the firing thread sets tokens at random moments."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-4)
    try:
        yield
    finally:
        sys.setswitchinterval(old)


# -- the shared state and its invariants ------------------------------------------------------


@dataclass
class Shared:
    lock: threading.Lock = field(default_factory=threading.Lock)
    a: int = BIG  # the counter pair: a == b == BIG outside with_resource, BIG + 1 inside
    b: int = BIG
    mutex: ml.SafeMutex = field(default_factory=ml.SafeMutex)
    plain_mutex: threading.Lock = field(default_factory=threading.Lock)  # the control's
    mx: int = BIG  # mx == my whenever the mutex is free and not poisoned
    my: int = BIG
    guard: ml.Guarded[dict[str, int]] = field(
        default_factory=lambda: ml.Guarded({"a": BIG, "b": BIG}, track=False)
    )
    owner: int | None = None
    iterations: int = 0
    seen_broken: Counter[str] = field(default_factory=Counter)  # seen from inside the task


@dataclass
class Tally:
    rounds: int = 0
    tokens_set: int = 0
    errors: int = 0
    ok: int = 0
    wrong_exception: Counter[str] = field(default_factory=Counter)
    leaked: Counter[str] = field(default_factory=Counter)
    broken: Counter[str] = field(default_factory=Counter)
    poisoned: int = 0
    landing_sites: Counter[tuple[str, int]] = field(default_factory=Counter)
    elapsed_s: float = 0.0

    def summary(self, label: str, shared: Shared) -> str:
        return (
            f"{label} on {sys.version.split()[0]}: {self.rounds} rounds, "
            f"{self.tokens_set} tokens set, {self.errors} Error, {self.ok} Ok, "
            f"leaked {sum(self.leaked.values())} {dict(self.leaked)}, "
            f"broken {sum(self.broken.values())} {dict(self.broken)}, "
            f"seen broken inside {dict(shared.seen_broken)}, poisoned {self.poisoned}, "
            f"{len(self.landing_sites)} landing sites, {shared.iterations} iterations, "
            f"{self.elapsed_s:.1f} s"
        )


def check_round(s: Shared, t: Tally) -> None:
    """After a round (the task has ended): count leaks and broken invariants, then reset."""
    if s.lock.locked():
        t.leaked["lock"] += 1
        s.lock.release()
    if s.plain_mutex.locked():
        t.leaked["mutex"] += 1
        s.plain_mutex.release()
    if s.mutex.locked():
        t.leaked["mutex"] += 1
        s.mutex._lock.release()
    if (s.a, s.b) != (BIG, BIG):
        t.broken["pair"] += 1
        s.a = s.b = BIG
    if s.mutex.poisoned:
        t.poisoned += 1  # legitimate: interrupted while held; repair, then clear
        s.my = s.mx
        s.mutex.clear_poison()
    elif s.mx != s.my:
        t.broken["mutex"] += 1
        s.my = s.mx
    d = s.guard.value
    if set(d) != {"a", "b"} or d["a"] != d["b"]:
        t.broken["guard"] += 1
        s.guard.value = {"a": BIG, "b": BIG}


# -- the protected idioms ---------------------------------------------------------------------


def acquire_pair(s: Shared) -> Shared:
    s.a += 1
    touch()
    s.b += 1
    return s


def body_pair(s: Shared) -> None:
    if not s.a == s.b == BIG + 1:
        s.seen_broken["pair"] += 1
    touch()


def release_pair(s: Shared) -> None:
    s.b -= 1
    touch()
    s.a -= 1


def repair_mutex_state(s: Shared) -> None:
    s.my = s.mx
    s.mutex.clear_poison()


def protected_iteration(s: Shared) -> None:
    with ml.protect(s.lock):
        s.owner = threading.get_ident()  # allocates
        touch()
        s.owner = None
    ml.with_resource(acquire_pair, s, body_pair, release_pair)
    try:
        with s.mutex:
            if s.mx != s.my:
                s.seen_broken["mutex"] += 1
            s.mx += 1
            touch()
            s.my += 1
    except ml.PoisonedError:
        # No one else can enter a poisoned mutex; repair and clear in one masked region.
        ml.masked(lambda: repair_mutex_state(s))
    with s.guard.transaction() as g:
        if g.value["a"] != g.value["b"]:
            s.seen_broken["guard"] += 1
        g.value["a"] += 1
        touch()
        g.value["b"] += 1
    s.iterations += 1


# -- the control: the usual unmasked idioms ---------------------------------------------------


class PythonLockCM:
    """What one writes without masking: a Python ``__enter__`` around ``lock.acquire()``."""

    def __init__(self, s: Shared) -> None:
        self.s = s

    def __enter__(self) -> PythonLockCM:
        self.s.lock.acquire()
        self.s.owner = threading.get_ident()
        return self

    def __exit__(self, *exc: object) -> None:
        self.s.owner = None
        self.s.lock.release()


def control_iteration(s: Shared) -> None:
    with PythonLockCM(s):
        touch()
    s.a += 1
    touch()
    s.b += 1
    try:
        body_pair(s)
    finally:
        s.b -= 1
        touch()
        s.a -= 1
    s.plain_mutex.acquire()
    try:
        if s.mx != s.my:
            s.seen_broken["mutex"] += 1
        s.mx += 1
        touch()
        s.my += 1
    finally:
        s.plain_mutex.release()
    d = s.guard.value
    snapshot = dict(d)
    try:
        if d["a"] != d["b"]:
            s.seen_broken["guard"] += 1
        d["a"] += 1
        touch()
        d["b"] += 1
    except BaseException:
        d.clear()
        d.update(snapshot)
        raise
    s.iterations += 1


ROUND_TIMEOUT_S = 20.0


def batch(s: Shared, iteration: Callable[[Shared], None]) -> str:
    """The task: loop until interrupted (bounded, so that a lost interrupt shows as Ok)."""
    deadline = time.monotonic() + ROUND_TIMEOUT_S
    while True:
        iteration(s)
        if time.monotonic() > deadline:
            return "never interrupted"


_LIBRARY_DIR = os.path.dirname(ml.__file__) + os.sep


def landing_site(exc: BaseException) -> tuple[str, int]:
    """The innermost frame of the task's own code in ``exc``'s traceback: where it landed
    (the main thread's delivery raises from the library's signal handler, called there)."""
    tb = exc.__traceback__
    site = ("?", 0)
    while tb is not None:
        if not tb.tb_frame.f_code.co_filename.startswith(_LIBRARY_DIR):
            site = (tb.tb_frame.f_code.co_name, tb.tb_lineno)
        tb = tb.tb_next
    return site


def record(
    s: Shared, t: Tally, result: ml.Ok[Any] | ml.Error, expected: type[BaseException]
) -> None:
    t.rounds += 1
    if isinstance(result, ml.Error):
        t.errors += 1
        if not isinstance(result.exc, expected):
            t.wrong_exception[repr(result.exc)] += 1
        t.landing_sites[landing_site(result.exc)] += 1
    else:
        t.ok += 1
    check_round(s, t)


def bombard_with_tokens(
    where: str, iteration: Callable[[Shared], None], rounds: int, max_delay_s: float = 0.001
) -> tuple[Shared, Tally]:
    """``rounds`` tasks, each under a fresh token that another thread sets after a random
    delay; the task runs on the main thread or on a worker thread."""
    s, t = Shared(), Tally()
    tokens: queue.Queue[ml.Token | None] = queue.Queue()
    rng = random.Random(0x5EED)

    def fire() -> None:
        while (token := tokens.get()) is not None:
            time.sleep(rng.uniform(0, max_delay_s))
            token.set()
            t.tokens_set += 1

    def rounds_of_tasks() -> None:
        for _ in range(rounds):
            token = ml.Token()
            tokens.put(token)
            record(
                s, t, ml.limit_with_token(lambda: batch(s, iteration), token=token), ml.Cancelled
            )

    firing = threading.Thread(target=fire, name="firing", daemon=True)
    t0 = time.monotonic()
    firing.start()
    try:
        if where == "main":
            rounds_of_tasks()
        else:
            task_thread = threading.Thread(target=rounds_of_tasks, name="task", daemon=True)
            task_thread.start()
            task_thread.join(rounds * 0.05 + 120)
            assert not task_thread.is_alive(), f"deadlock after {t.rounds} rounds"
    finally:
        tokens.put(None)
        firing.join(30)
    assert not firing.is_alive()
    t.elapsed_s = time.monotonic() - t0
    return s, t


def bombard_with_budgets(
    iteration: Callable[[Shared], None], rounds: int, max_limit: int = 300_000
) -> tuple[Shared, Tally]:
    """``rounds`` tasks under allocation budgets drawn at random: each runs out at a random
    point of the allocation stream, and the hook arms the interrupt there."""
    s, t = Shared(), Tally()
    rng = random.Random(0xB0D6E7)
    t0 = time.monotonic()
    for _ in range(rounds):
        limit = rng.randrange(max_limit)
        result = ml.limit_allocations(lambda: batch(s, iteration), limit=limit)
        record(s, t, result, ml.AllocationLimitExceeded)
    t.elapsed_s = time.monotonic() - t0
    return s, t


def assert_all_accounted_for(t: Tally, tokens: bool) -> None:
    assert t.ok == 0, "a round was never interrupted"
    assert t.errors == t.rounds
    if tokens:
        assert t.tokens_set == t.rounds
    assert not t.wrong_exception, t.wrong_exception


# -- the bombardment: 10 000 interrupts per version, and the control -------------------------

PATHS = {
    # path: interrupts in the protected run, in the control run
    "worker-token": (4000, 3000),
    "main-token": (3000, 3000),
    "allocations": (3000, 2000),
}


def bombard(path: str, iteration: Callable[[Shared], None], rounds: int) -> tuple[Shared, Tally]:
    if path == "allocations":
        return bombard_with_budgets(iteration, rounds)
    return bombard_with_tokens(path.split("-")[0], iteration, rounds)


@pytest.mark.slow
@pytest.mark.parametrize("path", list(PATHS))
def test_bombardment_protected_idioms(path: str, fast_switching: None) -> None:
    shared, tally = bombard(path, protected_iteration, scaled(PATHS[path][0]))
    print("\n" + tally.summary(f"protected/{path}", shared))
    assert_all_accounted_for(tally, tokens=path != "allocations")
    assert not tally.leaked, tally.leaked
    assert not tally.broken, tally.broken
    assert not shared.seen_broken, shared.seen_broken
    # The interrupts did land all over the loop (not always at one spot).
    assert len(tally.landing_sites) >= 5, tally.landing_sites
    assert shared.iterations >= tally.rounds


@pytest.mark.slow
@pytest.mark.parametrize("path", list(PATHS))
def test_bombardment_control_unmasked_idioms_leak(path: str, fast_switching: None) -> None:
    """The same harness with unmasked idioms: it must see leaks and broken invariants."""
    shared, tally = bombard(path, control_iteration, scaled(PATHS[path][1]))
    print("\n" + tally.summary(f"control/{path}", shared))
    assert_all_accounted_for(tally, tokens=path != "allocations")
    damage = sum(tally.leaked.values()) + sum(tally.broken.values())
    assert damage > 0, "the harness cannot see the damage done by unmasked idioms"
    if path != "allocations":
        # Each unmasked idiom fails on its own (tokens land at every delivery point).
        assert tally.leaked["lock"] > 0 and tally.broken["pair"] > 0, tally
        assert tally.leaked["mutex"] + tally.broken["guard"] > 0, tally


# -- CPython's one-line-loop bugs -------------------------------------------------------------

SHAPES = """
def try_one_line_loop(flag, log):
    log.append("started")
    try:
        while True: pass
    except BaseException:
        log.append("handled")
        raise

def try_flag_loop(flag, log):
    log.append("started")
    try:
        while not flag[0]:
            pass
    except BaseException:
        log.append("handled")
        raise

def try_two_line_loop(flag, log):
    log.append("started")
    try:
        while True:
            pass
    except BaseException:
        log.append("handled")
        raise

def finally_one_line_loop(flag, log):
    log.append("started")
    try:
        while True: pass
    finally:
        log.append("handled")

def finally_flag_loop(flag, log):
    log.append("started")
    try:
        while not flag[0]:
            pass
    finally:
        log.append("handled")

def with_flag_loop(flag, log):
    log.append("started")
    with Exits(log):
        while not flag[0]:
            pass

def protect_flag_loop(flag, log):
    log.append("started")
    with ml.protect(LOCK):
        while not flag[0]:
            pass
    log.append("unreachable")

def protect_calls_flag_loop(flag, log):
    log.append("started")
    with ml.protect(LOCK):
        try_flag_loop(flag, [])
"""


class Exits:
    def __init__(self, log: list[str]) -> None:
        self.log = log

    def __enter__(self) -> None:
        pass

    def __exit__(self, *exc: object) -> None:
        self.log.append("handled")


LOOP_NAMESPACE: dict[str, Any] = {"ml": ml, "Exits": Exits, "LOCK": threading.Lock()}
exec(compile(SHAPES, "<one-line-loop shapes>", "exec"), LOOP_NAMESPACE)

# Does the interrupt skip the handler (except/finally/__exit__/protect's release)? Measured on
# CPython 3.11.7, 3.12.1 and 3.13.0 (cpython-internals notes §5, gh-108214, gh-130279).
SKIPS_HANDLER: dict[str, dict[tuple[int, int], bool]] = {
    "try_one_line_loop": {(3, 11): True, (3, 12): True, (3, 13): False},
    "try_flag_loop": {(3, 11): False, (3, 12): False, (3, 13): True},
    "try_two_line_loop": {(3, 11): False, (3, 12): False, (3, 13): False},
    "finally_one_line_loop": {(3, 11): True, (3, 12): True, (3, 13): False},
    "finally_flag_loop": {(3, 11): False, (3, 12): False, (3, 13): True},
    "with_flag_loop": {(3, 11): False, (3, 12): False, (3, 13): True},
    # protect() masks __enter__/__exit__, but its *body* is compiled by CPython like any other:
    # on 3.13 the lock leaks. Calling a function from the body (next shape) avoids it.
    "protect_flag_loop": {(3, 11): False, (3, 12): False, (3, 13): True},
    "protect_calls_flag_loop": {(3, 11): False, (3, 12): False, (3, 13): False},
}


def run_shape(name: str, where: str, via_with_resource: bool) -> tuple[list[str], list[str], Any]:
    shape = LOOP_NAMESPACE[name]
    lock: threading.Lock = LOOP_NAMESPACE["LOCK"]
    for delay in (0.02, 0.1, 0.5):  # retry if the token beat the loop's start
        log: list[str] = []
        released: list[str] = []
        token = ml.Token()

        def task(log: list[str] = log, released: list[str] = released) -> None:
            if via_with_resource:
                ml.with_resource(
                    lambda _a: None, None, lambda _r: shape([False], log), released.append
                )
            else:
                shape([False], log)

        def run(
            token: ml.Token = token, task: Callable[[], None] = task, delay: float = delay
        ) -> Any:
            timer = threading.Timer(delay, token.set)
            timer.start()
            try:
                return ml.limit_with_token(task, token=token)
            finally:
                timer.join()

        if where == "main":
            result = run()
        else:
            out: list[Any] = []
            worker = threading.Thread(target=lambda run=run, out=out: out.append(run()))
            worker.start()
            worker.join(30)
            assert not worker.is_alive()
            result = out[0]
        leaked = lock.locked()
        if leaked:
            lock.release()
            log.append("lock leaked")
        if "started" in log:
            return log, released, result
    raise AssertionError(f"{name}: the loop never started")


@pytest.mark.parametrize("where", ["main", "worker"])
@pytest.mark.parametrize("name", list(SKIPS_HANDLER))
def test_cpython_one_line_loop_bugs(name: str, where: str) -> None:
    expected = SKIPS_HANDLER[name][sys.version_info[:2]]
    log, _, result = run_shape(name, where, via_with_resource=False)
    # The task runner is never fooled: the interrupt still reaches it.
    assert isinstance(result, ml.Error) and isinstance(result.exc, ml.Cancelled), result
    if where == "main":
        # On the main thread the interrupt comes from a signal handler, whose landing point
        # (and a possible re-delivery) varies with timing: only the runner's verdict above
        # is deterministic there.  The worker variant pins CPython's behaviour.
        return
    if name.startswith("protect"):
        skipped = "lock leaked" in log
    else:
        skipped = "handled" not in log
    assert skipped == expected, (
        f"{name} on {sys.version.split()[0]}: handler {'skipped' if skipped else 'ran'}; "
        f"expected {'skipped' if expected else 'ran'} -- update SKIPS_HANDLER and "
        "docs/recovering.md if CPython fixed or changed this"
    )


@pytest.mark.parametrize("name", list(SKIPS_HANDLER))
def test_with_resource_release_runs_whatever_the_scope_loop(name: str) -> None:
    """``with_resource`` calls the scope from C and catches whatever leaves it, wherever it was
    raised: its release runs for every shape, on every version."""
    log, released, result = run_shape(name, "main", via_with_resource=True)
    assert isinstance(result, ml.Error) and isinstance(result.exc, ml.Cancelled), result
    assert released == [None], log


# -- a token set just as its task ends ---------------------------------------------------------


@pytest.mark.parametrize("where", ["main", "worker"])
def test_a_token_set_as_its_task_ends_never_reaches_the_next_task(where: str) -> None:
    """The thread that sets a token can be preempted anywhere in ``Token.set()``. We pause it
    at each of its profiler events in turn (every Python-level point where a GIL switch may
    happen, and before each C call); meanwhile its task ends and the same thread starts an
    unrelated task, which must not be interrupted."""
    failures = []
    k = 1
    while True:
        events, outcome = _pause_token_set_at(k, where)
        if outcome is not None:
            failures.append(f"paused at event {k}: the next task {outcome}")
        if k > events or k > 200:
            break
        k += 1
    assert not failures, failures


def _pause_token_set_at(k: int, where: str) -> tuple[int, str | None]:
    token = ml.Token()
    setter_ready, setter_paused, next_task_started = (threading.Event() for _ in range(3))
    events = [0]

    def pause_at_k(frame: Any, event: str, arg: Any) -> None:
        events[0] += 1
        if events[0] == k:
            setter_paused.set()
            next_task_started.wait(0.3)  # short: a fix may hold a lock the task needs

    def setter() -> None:
        setter_ready.wait(10)
        sys.setprofile(pause_at_k)
        try:
            token.set()
        finally:
            sys.setprofile(None)
            setter_paused.set()  # k past the last event: it never paused

    def first_task() -> None:
        setter_ready.set()
        # Then end, while the setter is paused. Poll, not setter_paused.wait(): this task is
        # cancelled as the token is set, and an interrupt landing just after Event.wait's
        # Condition.__enter__ acquired its lock leaks that lock (the classic asynchronous
        # exception in a `with`, see docs/recovering.md) -- the setter would hang on it.
        deadline = time.monotonic() + 10
        while not setter_paused.is_set() and time.monotonic() < deadline:
            time.sleep(0.0005)

    def next_task() -> int:
        next_task_started.set()
        n, deadline = 0, time.monotonic() + 0.03  # several re-delivery intervals
        while time.monotonic() < deadline:
            n += 1
        return n

    outcome: list[str | None] = []

    def thread_a() -> None:
        ml.limit_with_token(first_task, token=token)
        try:
            result = ml.limit_allocations(next_task, limit="1 GB")
            outcome.append(None if isinstance(result, ml.Ok) else f"returned {result!r}")
        except BaseException as e:
            outcome.append(f"raised {e!r}")
        finally:
            next_task_started.set()

    b = threading.Thread(target=setter, name="setter", daemon=True)
    b.start()
    if where == "main":
        thread_a()
    else:
        a = threading.Thread(target=thread_a, name="task", daemon=True)
        a.start()
        a.join(30)
        assert not a.is_alive()
    b.join(30)
    assert not b.is_alive()
    return events[0], outcome[0]


# -- Sisyphus ---------------------------------------------------------------------------------

CHUNK = 64 * 1024
HEADROOM = 64 * 2**20
PREMATURE_SLACK = 16 * 2**20


@dataclass
class Boulder:
    """The shared stack. Invariant (under the mutex, when not poisoned): entries are numbered
    0, 1, ... in order, ``count == len(items)``, ``nbytes == count * CHUNK``."""

    mutex: ml.SafeMutex = field(default_factory=ml.SafeMutex)
    items: list[tuple[int, bytearray]] = field(default_factory=list)
    count: int = 0
    nbytes: int = 0
    epoch: int = 0  # bumped at each wipe
    peaks: list[int] = field(default_factory=list)  # nbytes when wiped, per epoch
    invalid: list[str] = field(default_factory=list)

    def check(self, where: str) -> None:
        ok = (
            self.count == len(self.items)
            and self.nbytes == self.count * CHUNK
            and (not self.items or self.items[-1][0] == self.count - 1)
        )
        if not ok:
            self.invalid.append(f"{where}: count={self.count} len={len(self.items)}")


def push_forever(boulder: Boulder) -> None:
    """The task: push onto the shared stack, forever."""
    while True:
        with boulder.mutex:
            boulder.check("push")
            boulder.items.append((boulder.count, bytearray(CHUNK)))
            touch()
            boulder.count += 1
            boulder.nbytes += CHUNK


def test_release_memory_returns_what_worker_threads_freed() -> None:
    """``release_memory()`` is the ``Gc.compact`` of the Sisyphus pattern: after a task under a
    global memory limit is interrupted and its data dropped, it must bring the resident memory
    back, or every later task is interrupted at once. A fresh process, so that glibc's state is
    known."""
    proc = run_python(
        """
        import threading
        import memprof_limits as ml
        from memprof_limits import _sampler

        def fill_and_free():
            keep = []
            def push():
                for _ in range(256):
                    keep.append(bytearray(64 * 1024))
            threads = [threading.Thread(target=push) for _ in range(2)]
            for t in threads: t.start()
            for t in threads: t.join()
            keep.clear()
            ml.release_memory()
            return _sampler.rss_bytes()

        ml.release_memory()
        baseline = _sampler.rss_bytes()
        assert fill_and_free() < baseline + 8 * 2**20  # fine in a fresh process
        big = bytearray(20 * 2**20)  # one big block, freed: glibc raises its thresholds
        del big
        after = [fill_and_free() for _ in range(3)]
        print((max(after) - baseline) >> 20)
        """
    )
    retained_mib = int(proc.stdout.split()[-1])
    assert retained_mib < 8, f"{retained_mib} MiB freed by worker threads stayed resident"


@pytest.mark.slow
def test_sisyphus() -> None:
    ml.release_memory()
    ml.start()
    limit = _sampler.rss_bytes() + HEADROOM
    boulder = Boulder()
    recovery = threading.Lock()  # wipes happen outside tasks: a plain lock is fine here
    deadline = time.monotonic() + 6.0 * SCALE
    stats = [Counter[str](), Counter[str]()]
    premature: list[str] = []
    rss_after_release: list[int] = []

    def wipe() -> None:
        with recovery:
            if boulder.mutex.poisoned:
                # No one can enter a poisoned mutex, and wipes are serialized: repair, clear.
                boulder.peaks.append(boulder.nbytes)
                boulder.items, boulder.count, boulder.nbytes = [], 0, 0
                boulder.epoch += 1
                boulder.mutex.clear_poison()
            else:
                with boulder.mutex:
                    boulder.check("wipe")
                    boulder.peaks.append(boulder.nbytes)
                    boulder.items, boulder.count, boulder.nbytes = [], 0, 0
                    boulder.epoch += 1
        ml.release_memory()  # Gc.compact: give the memory back before restarting
        rss_after_release.append(_sampler.rss_bytes())

    def sisyphus(me: int) -> None:
        st = stats[me]
        while time.monotonic() < deadline:
            epoch = boulder.epoch
            start_rss = _sampler.rss_bytes()
            try:
                result = ml.limit_global_memory(lambda: push_forever(boulder))
            except ml.PoisonedError:
                st["PoisonedError raised"] += 1  # the other one was interrupted holding it
                wipe()
                continue
            if not isinstance(result, ml.Error):
                premature.append(f"thread {me}: the task returned {result!r}")
                return
            st[f"Error({type(result.exc).__name__})"] += 1
            # What the process held when the task started, plus the most the shared stack
            # held while it ran, must come near the limit; else the interrupt was premature.
            # (RSS is the whole process's: PREMATURE_SLACK covers what is not the stack.)
            reached = max([*boulder.peaks[epoch:], boulder.nbytes])
            if start_rss + reached < limit - PREMATURE_SLACK:
                premature.append(
                    f"thread {me}: interrupted with RSS {start_rss >> 20} MiB at its start and "
                    f"the stack at most {reached >> 20} MiB, limit {limit >> 20} MiB"
                )
            wipe()

    ml.set_global_memory_limit(limit)
    try:
        threads = [threading.Thread(target=sisyphus, args=(i,), daemon=True) for i in range(2)]
        t0 = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()) + 60)
        elapsed = time.monotonic() - t0
    finally:
        ml.set_global_memory_limit(None)
    print(
        f"\nsisyphus on {sys.version.split()[0]}: limit = RSS + {HEADROOM >> 20} MiB, "
        f"{boulder.epoch} wipes, per thread {[dict(s) for s in stats]}, "
        f"RSS after release_memory {min(rss_after_release, default=0) >> 20}.."
        f"{max(rss_after_release, default=0) >> 20} MiB (limit {limit >> 20} MiB), {elapsed:.1f} s"
    )
    assert not any(thread.is_alive() for thread in threads), "deadlock"
    assert not premature, (premature[:5], f"RSS after release_memory: {rss_after_release[:20]}")
    assert not boulder.invalid, boulder.invalid[:5]
    assert not boulder.mutex.locked()
    for st in stats:
        # Both threads kept rolling the boulder up, and were stopped by the memory limit.
        assert st["Error(MemoryLimitExceeded)"] >= 3, stats
        # A task that finds the mutex poisoned fails with PoisonedError (inside an Error if
        # its own memory limit was also reached): the state it would have seen is never shown.
        allowed = {"Error(MemoryLimitExceeded)", "Error(PoisonedError)", "PoisonedError raised"}
        assert set(st) <= allowed, stats


BIG_BLOCKS_SCRIPT = """
import random, signal, sys, threading, time
from collections import Counter
import memprof_limits as ml
from memprof_limits import _sampler

MiB = 2**20
ml.start()
ml.limit_global_memory(lambda: None)
ml.release_memory()
limit = _sampler.rss_bytes() + 150 * MiB
ml.set_global_memory_limit(limit)
lock, mutex = threading.Lock(), ml.SafeMutex()
outcomes = [Counter(), Counter()]
biggest = [0]

def handler(signum, frame):
    raise KeyboardInterrupt

def task(rng):
    keep = []
    for _ in range(rng.randrange(1, 12)):
        n = rng.choice([rng.randrange(1, MiB), rng.randrange(MiB, 400 * MiB)])
        biggest[0] = max(biggest[0], n)
        how = rng.randrange(3)
        if how == 0:
            with ml.protect(lock):
                keep.append(b"x" * n)
        elif how == 1:
            with mutex:
                keep.append(bytearray(n))
        else:
            # Allocated masked (acquire): never refused, so kept under 1 MiB here.
            keep.append(ml.with_resource(lambda k: b"y" * k, n % MiB, len, lambda _r: None))
    return len(keep)

def worker(me, seed, rounds):
    rng = random.Random(seed)
    for _ in range(rounds):
        token = ml.Token()
        timer = threading.Timer(rng.random() * 0.01, token.set)
        if rng.random() < 0.3:
            timer.start()
        try:  # (the one alarm of a round raises once, wherever it lands in here)
            try:
                if me == 0 and rng.random() < 0.5:
                    signal.setitimer(signal.ITIMER_REAL, rng.randrange(1, 3000) / 1e6)
                r = ml.limit_global_memory(
                    lambda: ml.limit_with_token(lambda: task(rng), token=token)
                )
                if isinstance(r, ml.Ok):
                    r = r.value
                outcomes[me]["Ok" if isinstance(r, ml.Ok) else type(r.exc).__name__] += 1
            except ml.PoisonedError:
                outcomes[me]["PoisonedError"] += 1
            finally:
                timer.cancel()
        except KeyboardInterrupt:
            outcomes[me]["KeyboardInterrupt"] += 1
        if me == 0:
            while True:  # (the alarm may still be pending)
                try:
                    signal.setitimer(signal.ITIMER_REAL, 0)
                    break
                except KeyboardInterrupt:
                    outcomes[me]["KeyboardInterrupt"] += 1
        if mutex.poisoned:  # (an interrupted holder: its state is a list of blocks, fine)
            mutex.clear_poison()
        st = _sampler.thread_state()
        assert st.scopes == [] and int(st.ctl.active) == 0, st.scopes
    ml.release_memory()

signal.signal(signal.SIGALRM, handler)
rounds = int(sys.argv[1])
other = threading.Thread(target=worker, args=(1, 2, rounds))
other.start()
worker(0, 1, rounds)
other.join(120)
assert not other.is_alive(), "deadlock"
assert not lock.locked() and not mutex.locked(), "a lock leaked"
hwm = _sampler.high_water_mark_bytes()
# Never more than one block past the limit: two threads can both be granted a block before
# either is resident (bytearray's pages are touched later, by nobody here).
assert hwm is None or hwm < limit + biggest[0], (hwm >> 20, limit >> 20, biggest[0] >> 20)
assert _sampler.refused_blocks() > 0
print("ok", [dict(o) for o in outcomes], _sampler.refused_blocks(), "refused")
"""


def test_big_blocks_refused_among_signals_tokens_and_locks() -> None:
    """Big blocks refused for the memory limit (issue 15) at random moments, from two threads,
    inside ``protect``, a ``SafeMutex`` and a ``with_resource`` acquire, while tokens are set by
    timers and the main thread's raising ``SIGALRM`` handler fires: no crash, no deadlock, no
    lock held, no scope left open, and the process never more than one block past the limit."""
    script = BIG_BLOCKS_SCRIPT.replace("int(sys.argv[1])", str(scaled(150)))
    proc = run_python(script, timeout=300, env={"PYTHONFAULTHANDLER": "1"})
    assert proc.stdout.startswith("ok"), proc
    print(proc.stdout)
