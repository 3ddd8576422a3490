"""Interrupt delivery: token latency and memory-limit overshoot (issue 3).

Part 1 -- ``token.set()`` -> interrupt latency.  Each trial: a fresh token, the
target runs ``ml.limit_with_token(task, token=token)``; once the task is
running, the setter thread waits 1-3 ms (random, seeded), takes
``t0 = time.perf_counter_ns()`` and calls ``token.set()``, then blocks (waits
for the trial to end: it gives the GIL away at once); the target takes
``t1 = perf_counter_ns()`` when ``limit_with_token`` returns ``Error``.
Latency = t1 - t0 (CLOCK_MONOTONIC in both threads).  Scenarios:

  worker_busy      target: a worker thread in ``while flag: pass`` (never allocates);
                   setter: the main thread
  main_busy        target: the main thread in the same loop; setter: a helper thread
  main_sleep       target: the main thread in ``time.sleep(10)``
  main_event_wait  target: the main thread in ``threading.Event().wait(10)``
  main_recv        target: the main thread in ``socket.recv`` on a silent socketpair
  worker_busy_setter_busy   informative: as worker_busy, but the setter keeps running
                   Python for 30 ms after set() (the target must wait for the GIL:
                   bounded by the switch interval, sys.getswitchinterval())
  reference_busy_flag       informative, no library code: as worker_busy, with the
                   token replaced by a plain ``flag[0] = True`` that the worker's loop
                   tests.  The floor that the GIL hand-off and the OS scheduler set on
                   this machine for a busy target: worker_busy/main_busy cannot do
                   better than this row (a thread that was burning CPU waits behind
                   the other runnable processes to get a CPU back).
  reference_event_wakeup    informative, no library code: ``Event.set()`` -> a thread
                   blocked in ``Event.wait()`` runs again (the floor for the blocked
                   rows: a thread that slept is woken with priority).

Targets: p99 <= 2 ms busy, <= 20 ms blocked.

Part 2 -- global memory limit overshoot: ``ml.release_memory()``, then
``ml.set_global_memory_limit(RSS + 256 MiB)`` and a task under
``ml.limit_global_memory`` that allocates fast and keeps everything.  Overshoot
= the task's peak resident memory (the kernel's VmHWM, reset through
``/proc/self/clear_refs`` just before the task) - limit; as a cross-check, the
RSS read in the task's ``except ml.Interrupted`` before anything is freed (not
always available: the interrupt is sticky and can come back inside the handler
while the memory is still over the limit).  Safety net: a task that gets 2 GiB
past the limit without being interrupted stops itself (reported as not
interrupted).  Target <= 16 MiB.

  small_objects    ``data.append((i, str(i), [i]))``: small objects, pymalloc
  bytearray_1MiB   ``data.append(bytearray(2**20))``: 1 MiB blocks (RAW domain)
  numpy_1MiB       ``data.append(np.ones(2**17))``: float64 arrays of 1 MiB
  numpy_7.6MiB     ``data.append(np.ones(10**6))``
  numpy_64MiB      informative: ``np.ones(2**23)``.  An allocation is never refused:
                   the interrupt lands after the C call that crossed the limit returns,
                   so the overshoot is about one allocation, whatever the target.

Part 3 -- the cost of an armed limit against the engine idle on the overhead
workloads is the ``armed / idle`` column of ``bench_overhead.py`` (section
"Engine overhead" of RESULTS.md); not repeated here.

    python benchmarks/bench_delivery.py [--trials 300] [--mem-trials 5]
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import random
import socket
import statistics
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import memprof_limits as ml
from memprof_limits import _sampler

MiB = 2**20


# ---------------------------------------------------------------------------
# Part 1: latency.


def _busy() -> None:
    flag = True
    while flag:
        pass


def _percentile(xs: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    s = sorted(xs)
    k = max(0, min(len(s) - 1, int(-(-q * len(s) // 100)) - 1))
    return s[k]


def latency_worker(trials: int, setter_busy_s: float = 0.0) -> list[float]:
    """Target: a worker thread; setter: this (main) thread.  Latencies in ms."""
    rng = random.Random(1)
    tokens: list[ml.Token] = []
    running = threading.Event()
    trial_done = threading.Event()
    go = threading.Event()
    t1s: list[int] = []
    errors: list[str] = []

    def task() -> None:
        running.set()
        _busy()

    def worker() -> None:
        for _ in range(trials):
            go.wait()
            go.clear()
            res = ml.limit_with_token(task, token=tokens[-1])
            t1 = time.perf_counter_ns()
            if not isinstance(res, ml.Error):
                errors.append(repr(res))
            t1s.append(t1)
            trial_done.set()

    th = threading.Thread(target=worker)
    th.start()
    t0s: list[int] = []
    for _ in range(trials):
        tokens.append(ml.Token())
        go.set()
        running.wait()
        running.clear()
        time.sleep(rng.uniform(0.001, 0.003))
        t0 = time.perf_counter_ns()
        tokens[-1].set()
        if setter_busy_s:
            deadline = time.perf_counter() + setter_busy_s
            while time.perf_counter() < deadline:
                pass
        t0s.append(t0)
        trial_done.wait()
        trial_done.clear()
    th.join()
    if errors:
        raise RuntimeError(f"task not interrupted: {errors[:3]}")
    return [(b - a) / 1e6 for a, b in zip(t0s, t1s, strict=True)]


def latency_reference(trials: int) -> list[float]:
    """The floor set by the OS and the GIL: ``Event.set()`` in this thread ->
    the thread blocked in ``Event.wait()`` runs Python again (no library code)."""
    rng = random.Random(3)
    ev = threading.Event()
    waiting = threading.Event()
    trial_done = threading.Event()
    t1s: list[int] = []

    def waiter() -> None:
        for _ in range(trials):
            waiting.set()
            ev.wait()
            t1s.append(time.perf_counter_ns())
            ev.clear()
            trial_done.set()

    th = threading.Thread(target=waiter)
    th.start()
    t0s: list[int] = []
    for _ in range(trials):
        waiting.wait()
        waiting.clear()
        time.sleep(rng.uniform(0.001, 0.003))
        t0 = time.perf_counter_ns()
        ev.set()
        t0s.append(t0)
        trial_done.wait()
        trial_done.clear()
    th.join()
    return [(b - a) / 1e6 for a, b in zip(t0s, t1s, strict=True)]


def latency_reference_busy(trials: int) -> list[float]:
    """The floor for a *busy* target, no library code: a worker thread spins on
    ``while not flag[0]: pass``; this thread sets ``flag[0] = True`` and blocks;
    latency until the worker leaves its loop (it must get the GIL and a CPU)."""
    rng = random.Random(4)
    flag = [False]
    running = threading.Event()
    go = threading.Event()
    trial_done = threading.Event()
    t1s: list[int] = []

    def worker() -> None:
        for _ in range(trials):
            go.wait()
            go.clear()
            running.set()
            while not flag[0]:
                pass
            t1s.append(time.perf_counter_ns())
            flag[0] = False
            trial_done.set()

    th = threading.Thread(target=worker)
    th.start()
    t0s: list[int] = []
    for _ in range(trials):
        go.set()
        running.wait()
        running.clear()
        time.sleep(rng.uniform(0.001, 0.003))
        t0 = time.perf_counter_ns()
        flag[0] = True
        t0s.append(t0)
        trial_done.wait()
        trial_done.clear()
    th.join()
    return [(b - a) / 1e6 for a, b in zip(t0s, t1s, strict=True)]


def latency_main(trials: int, body: Callable[[], None]) -> list[float]:
    """Target: the main thread running ``body``; setter: a helper thread."""
    rng = random.Random(2)
    slot: list[ml.Token] = []
    running = threading.Event()
    trial_done = threading.Event()
    t0s: list[int] = []

    def setter() -> None:
        for _ in range(trials):
            running.wait()
            running.clear()
            time.sleep(rng.uniform(0.001, 0.003))
            t0 = time.perf_counter_ns()
            slot[-1].set()
            t0s.append(t0)
            trial_done.wait()
            trial_done.clear()

    def task() -> None:
        running.set()
        body()

    th = threading.Thread(target=setter)
    th.start()
    t1s: list[int] = []
    errors = []
    for _ in range(trials):
        slot.append(ml.Token())
        res = ml.limit_with_token(task, token=slot[-1])
        t1s.append(time.perf_counter_ns())
        if not isinstance(res, ml.Error):
            errors.append(repr(res))
        trial_done.set()
    th.join()
    if errors:
        raise RuntimeError(f"task not interrupted: {errors[:3]}")
    return [(b - a) / 1e6 for a, b in zip(t0s, t1s, strict=True)]


def _sleep() -> None:
    time.sleep(10)


def _event_wait() -> None:
    threading.Event().wait(10)


def _make_recv() -> Callable[[], None]:
    a, b = socket.socketpair()
    a.settimeout(10)
    _make_recv.keep = (a, b)  # type: ignore[attr-defined]

    def recv() -> None:
        a.recv(1)

    return recv


def latency_table(results: dict[str, list[float]]) -> str:
    lines = [
        "| scenario | trials | median ms | p90 ms | p99 ms | max ms | target (p99) | met |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, xs in results.items():
        blocked = name.startswith(("main_sleep", "main_event", "main_recv"))
        informative = name.endswith("setter_busy") or name.startswith("reference")
        target = "informative" if informative else ("<= 20 ms" if blocked else "<= 2 ms")
        p99 = _percentile(xs, 99)
        met = "" if informative else ("yes" if p99 <= (20 if blocked else 2) else "**no**")
        lines.append(
            f"| {name} | {len(xs)} | {statistics.median(xs):.3f} | {_percentile(xs, 90):.3f} "
            f"| {p99:.3f} | {max(xs):.3f} | {target} | {met} |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# Part 2: overshoot.

SAFETY = 2 * 1024 * MiB
MARGIN = 256 * MiB


def _alloc_small(data: list[Any], i: int) -> None:
    for j in range(i, i + 1000):
        data.append((j, str(j), [j]))


def _alloc_bytearray(data: list[Any], i: int) -> None:
    data.append(bytearray(MiB))


def _numpy_alloc(n: int) -> Callable[[list[Any], int], None]:
    import numpy as np

    def alloc(data: list[Any], i: int) -> None:
        data.append(np.ones(n))

    return alloc


def _vm_hwm() -> int:
    """The kernel's resident-memory high-water mark (VmHWM), in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _reset_hwm() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # "5": reset the peak RSS (Linux >= 4.0)
        f.write("5")


def overshoot_once(alloc: Callable[[list[Any], int], None]) -> dict[str, Any]:
    gc.collect()
    ml.release_memory()
    base = _sampler.rss_bytes()
    limit = base + MARGIN
    out: dict[str, Any] = {}

    def task() -> None:
        data: list[Any] = []
        i = 0
        try:
            while True:
                alloc(data, i)
                i += 1
                if i % 16 == 0 and _sampler.rss_bytes() > limit + SAFETY:
                    return
        except ml.Interrupted:
            # Best effort: the interrupt is sticky and may come back inside this handler.
            out["rss_at_except"] = _sampler.rss_bytes()
            raise

    ml.set_global_memory_limit(limit)
    _reset_hwm()
    t0 = time.perf_counter()
    try:
        res = ml.limit_global_memory(task)
    finally:
        ml.set_global_memory_limit(None)
    out["seconds"] = time.perf_counter() - t0
    out["peak"] = _vm_hwm()
    out["interrupted"] = isinstance(res, ml.Error)
    out["overshoot"] = out["peak"] - limit
    if "rss_at_except" in out:
        out["overshoot_at_except"] = out["rss_at_except"] - limit
    del res
    gc.collect()
    ml.release_memory()
    return out


def overshoot_table(results: dict[str, list[dict[str, Any]]]) -> str:
    lines = [
        "| scenario | trials | interrupted | peak overshoot median MiB | peak overshoot max MiB "
        "| at `except`: median MiB (n) | median s | target | met |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, runs in results.items():
        if not runs:
            lines.append(f"| {name} | 0 | skipped (NumPy not installed) | | | | | | |")
            continue
        xs = [r["overshoot"] / MiB for r in runs]
        ex = [r["overshoot_at_except"] / MiB for r in runs if "overshoot_at_except" in r]
        n_int = sum(r["interrupted"] for r in runs)
        all_int = n_int == len(runs)
        informative = name == "numpy_64MiB"
        met = "yes" if all_int and max(xs) <= 16 else "**no**"
        target = "<= 16 MiB"
        if informative:
            met, target = "", "informative"
        note = "" if all_int else f" (others: {SAFETY // MiB} MiB safety net)"
        at_except = f"{statistics.median(ex):.2f} ({len(ex)})" if ex else "- (0)"
        secs = statistics.median(r["seconds"] for r in runs)
        lines.append(
            f"| {name} | {len(runs)} | {n_int}/{len(runs)}{note} | {statistics.median(xs):.2f} "
            f"| {max(xs):.2f} | {at_except} | {secs:.2f} | {target} | {met} |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--trials", type=int, default=300, help="latency trials per scenario")
    p.add_argument("--mem-trials", type=int, default=5, help="overshoot trials per scenario")
    p.add_argument("--skip-latency", action="store_true")
    p.add_argument("--skip-overshoot", action="store_true")
    args = p.parse_args(argv)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    ml.start()
    print(f"# Delivery latency and overshoot -- CPython {platform.python_version()}")
    print()
    cmd = " ".join(["python", "benchmarks/bench_delivery.py", *(argv or sys.argv[1:])])
    print(f"- command: `{cmd}`")
    print(
        f"- load average at start: {os.getloadavg()[0]:.2f} ({os.cpu_count()} CPUs), "
        f"switch interval {sys.getswitchinterval() * 1e3:g} ms, not pinned"
    )
    if not args.skip_latency:
        lat: dict[str, list[float]] = {}
        scenarios: list[tuple[str, Callable[[], list[float]]]] = [
            ("worker_busy", lambda: latency_worker(args.trials)),
            ("main_busy", lambda: latency_main(args.trials, _busy)),
            ("main_sleep", lambda: latency_main(args.trials, _sleep)),
            ("main_event_wait", lambda: latency_main(args.trials, _event_wait)),
            ("main_recv", lambda: latency_main(args.trials, _make_recv())),
            ("worker_busy_setter_busy", lambda: latency_worker(min(args.trials, 100), 0.03)),
            ("reference_busy_flag", lambda: latency_reference_busy(args.trials)),
            ("reference_event_wakeup", lambda: latency_reference(args.trials)),
        ]
        for name, fn in scenarios:
            log(f"latency: {name}")
            gc.collect()
            lat[name] = fn()
        print()
        print("token.set() -> limit_with_token returned Error, in the target thread:")
        print()
        print(latency_table(lat))
    if not args.skip_overshoot:
        try:
            import numpy  # noqa: F401

            have_numpy = True
        except ImportError:
            have_numpy = False
        mem: dict[str, list[dict[str, Any]]] = {}
        cases: list[tuple[str, Callable[[], Callable[[list[Any], int], None]] | None]] = [
            ("small_objects", lambda: _alloc_small),
            ("bytearray_1MiB", lambda: _alloc_bytearray),
            ("numpy_1MiB", (lambda: _numpy_alloc(2**17)) if have_numpy else None),
            ("numpy_7.6MiB", (lambda: _numpy_alloc(10**6)) if have_numpy else None),
            ("numpy_64MiB", (lambda: _numpy_alloc(2**23)) if have_numpy else None),
        ]
        for name, make in cases:
            mem[name] = []
            if make is None:
                continue
            alloc = make()
            for k in range(args.mem_trials):
                log(f"overshoot: {name} {k + 1}/{args.mem_trials}")
                mem[name].append(overshoot_once(alloc))
        print()
        print(
            f"Global memory limit = RSS after ml.release_memory() + {MARGIN // MiB} MiB. Peak "
            "overshoot = the task's peak RSS (VmHWM, reset before the task) - limit; at "
            "`except` = RSS read in the task's `except ml.Interrupted` - limit (when that "
            "read was not itself interrupted by the sticky re-delivery):"
        )
        print()
        print(overshoot_table(mem))
    print()
    print(
        "The cost of an armed limit against the engine idle on the overhead workloads is the "
        '`armed / idle` column of bench_overhead.py (section "Engine overhead").'
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
