"""Driver for the start/stop leak check (issue 2): not a pytest module.

Starts and stops the engine ``--cycles`` times while ``--threads`` threads
allocate without pause (lists, dicts, str, bytearrays >512 B that pymalloc
sends to the RAW domain, and NumPy arrays when NumPy is installed and
``--numpy``).  Each cycle also runs a limited task on the main thread (budget
armed and reached, control block, watchdog), and every 10th cycle starts and
joins a short-lived thread that runs its own limited task (a thread that exits
must leave nothing behind).  At the end: the threads are joined and the engine
is stopped; ``tracemalloc.start()/stop()`` checks that the allocator chain is
intact.  Prints one ``ok ...`` line; any crash or failed check exits non-zero.

    python tests/native/startstop_leak.py --cycles 1000
    PYTHONMALLOC=malloc valgrind --leak-check=full --show-leak-kinds=definite \\
        python tests/native/startstop_leak.py --cycles 100      # scripts/valgrind_startstop.sh

``--cycles 0`` runs the same threads without ever starting the engine (the
baseline for valgrind).
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
import tracemalloc
from typing import Any


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--cycles", type=int, default=1000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--numpy", action=argparse.BooleanOptionalAction, default=True)
    args = p.parse_args(argv)

    np: Any = None
    if args.numpy:
        try:
            import numpy as np
        except ImportError:
            np = None

    import memprof_limits as ml

    stop = threading.Event()
    work = [0] * args.threads

    def churn(k: int) -> None:
        while not stop.is_set():
            d = {str(i): [i, i + 1] for i in range(100)}
            b = [bytearray(600 + i) for i in range(8)]
            if np is not None:
                a = np.ones(1000 + k)
                del a
            work[k] += len(d) + len(b)

    threads = [threading.Thread(target=churn, args=(k,)) for k in range(args.threads)]
    for t in threads:
        t.start()

    def short_lived() -> None:
        r = ml.limit_allocations(lambda: [str(i) for i in range(1000)], limit=10**9)
        assert isinstance(r, ml.Ok), r

    t0 = time.perf_counter()
    reached = 0
    for i in range(args.cycles):
        ml.start(seed=i)
        assert ml.is_started()
        r = ml.limit_allocations(lambda: [bytes(100) for _ in range(1000)], limit=10_000)
        reached += isinstance(r, ml.Error)
        if i % 10 == 0:
            t = threading.Thread(target=short_lived)
            t.start()
            t.join()
        ml.stop()
        assert not ml.is_started()
    stop.set()
    for t in threads:
        t.join()
    if ml.is_started():
        ml.stop()
    tracemalloc.start()
    x = [str(i) for i in range(1000)]
    traced = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    if args.cycles and reached != args.cycles:
        print(f"FAILED: the allocation limit was reached in {reached}/{args.cycles} cycles")
        return 1
    if traced <= 0 or len(x) != 1000:
        print("FAILED: tracemalloc traced nothing after stop(): allocator chain broken")
        return 1
    print(
        f"ok: {args.cycles} start/stop cycles in {time.perf_counter() - t0:.1f} s while "
        f"{args.threads} threads allocated ({sum(work)} units of work, NumPy "
        f"{'on' if np is not None else 'off'})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
