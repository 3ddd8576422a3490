"""``memprof_limits.dask`` (issue 15): the throughput of small limited tasks against plain
tasks, side by side on the same cluster.

One ``LocalCluster`` (2 worker processes, 1 thread each, ``LimitsPlugin`` registered); each
round submits ``--tasks`` small tasks (``strings(1000)``: a list of 1000 strings, ~60 kB of
allocations) with ``client.map`` in each mode, waits for all of them, and times the batch
(wall clock, from the client).  The modes run interleaved, in a rotated order every round;
the table gives the median over rounds of tasks per second and of the per-round ratio to the
plain tasks:

* ``plain``: ``strings`` itself;
* ``limited``: ``limited(strings)`` -- the wrapper, the engine and the memory limit's watch;
* ``fuel``: ``limited(strings, allocations="10 MB")`` -- with the canonical collector state
  before each task (``deterministic``, the default with a budget);
* ``fuel, not deterministic``: the same with ``deterministic=False``;
* ``timeout``: ``limited(strings, timeout=60)``.

Then the cost of the canonical collector state alone, in a worker (its heap: Dask, the
library, the test data), per call: median of 200 calls of ``canonical_collector()``.

    python benchmarks/bench_dask.py [--tasks 500] [--rounds 7]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from distributed import Client, LocalCluster

from memprof_limits.dask import LimitsPlugin, limited


def strings(n: int) -> int:
    return len([str(i) for i in range(n)])


def canonical_cost_ms(calls: int) -> float:
    """In a worker: the median time of one ``canonical_collector()``."""
    from memprof_limits._cells import canonical_collector

    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        canonical_collector()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tasks", type=int, default=500, help="tasks per batch (default 500)")
    p.add_argument("--rounds", type=int, default=7, help="rounds (default 7)")
    args = p.parse_args(argv)

    modes: dict[str, Callable[..., Any]] = {
        "plain": strings,
        "limited": limited(strings),
        "fuel": limited(strings, allocations="10 MB"),
        "fuel, not deterministic": limited(strings, allocations="10 MB", deterministic=False),
        "timeout": limited(strings, timeout=60),
    }
    rates: dict[str, list[float]] = {m: [] for m in modes}
    ratios: dict[str, list[float]] = {m: [] for m in modes}
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0"
        ) as cluster,
        Client(cluster) as client,
    ):
        client.register_plugin(LimitsPlugin())
        names = list(modes)
        for r in range(args.rounds + 1):  # round 0 warms up
            order = names[r % len(names) :] + names[: r % len(names)]
            seconds: dict[str, float] = {}
            for mode in order:
                t0 = time.perf_counter()
                futures = client.map(modes[mode], [1000] * args.tasks, pure=False)
                client.gather(futures)
                seconds[mode] = time.perf_counter() - t0
                del futures
            if r == 0:
                continue
            for mode in names:
                rates[mode].append(args.tasks / seconds[mode])
                ratios[mode].append(seconds[mode] / seconds["plain"])
        canonical = client.run(canonical_cost_ms, 200)

    print(
        f"- command: `python benchmarks/bench_dask.py --tasks {args.tasks} --rounds {args.rounds}`"
    )
    print(
        f"- LocalCluster of 2 worker processes x 1 thread; batches of {args.tasks} tasks "
        f"(`strings(1000)`), {args.rounds} rounds after a warm-up, modes interleaved\n"
    )
    print("| mode | tasks/s (median) | time / plain (median of per-round ratios) |")
    print("|---|---|---|")
    for mode in names:
        print(
            f"| {mode} | {statistics.median(rates[mode]):.0f} | "
            f"{statistics.median(ratios[mode]):.3f} |"
        )
    per_worker = ", ".join(f"{v:.2f}" for v in sorted(canonical.values()))
    print(f"\n`canonical_collector()` in a worker, median of 200 calls: {per_worker} ms\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
