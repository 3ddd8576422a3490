"""What the canonical collector state costs (docs/design.md, "Deterministic counts").

A cell with an allocation limit starts from empty free lists and zero
generation counts (``memprof_limits._cells.canonical_collector``).  Measured,
median of ``--rounds``, for heaps of N tracked objects (lists of one int):

1. ``canonical_collector()`` itself: the O(1) path (nothing frozen: freeze,
   collect, unfreeze) next to a plain ``gc.collect()`` (the path taken when
   the program froze objects);
2. a limited cell that allocates 100 000 small tuples (and keeps them): its
   wall time with the canonical state and without it (``canonical=False``).
   The O(1) path resets the collector's estimate of the old generation, so
   such a cell pays one full collection of the heap inside it.

    python benchmarks/bench_canonical.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from collections.abc import Callable

import memprof_limits as ml
from memprof_limits._cells import canonical_collector

CELL = "kept = [(i, i) for i in range(100_000)]"


def _median_s(fn: Callable[[], object], rounds: int) -> float:
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _cell(canonical: bool) -> None:
    ns: dict[str, object] = {}
    runner = ml.CellRunner(ns, limits=ml.CellLimits(allocations=10**9), rollback=False)
    with runner.cell(canonical=canonical) as cell:
        cell.run(lambda: exec(CELL, ns))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    frozen = gc.get_freeze_count()
    print(f"CPython {sys.version.split()[0]}; objects frozen at start: {frozen}")
    print("| heap (objects) | canonical_collector() | gc.collect() | cell, canonical | cell, not |")
    print("|---|---|---|---|---|")
    heap: list[list[int]] = []
    for n in (0, 10**5, 10**6, 3 * 10**6):
        heap.extend([i] for i in range(n - len(heap)))
        gc.collect()
        canon = _median_s(canonical_collector, args.rounds)
        full = _median_s(gc.collect, args.rounds)
        with_state = _median_s(lambda: _cell(True), args.rounds)
        without = _median_s(lambda: _cell(False), args.rounds)
        print(
            f"| {n:,} | {canon * 1e3:.2f} ms | {full * 1e3:.2f} ms "
            f"| {with_state * 1e3:.1f} ms | {without * 1e3:.1f} ms |"
        )


if __name__ == "__main__":
    main()
