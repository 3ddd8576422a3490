"""A tour of memprof-limits in one run: each limit stops a runaway task.

python examples/demo.py
"""

from __future__ import annotations

import threading
import time

import memprof_limits as ml


def runaway() -> None:
    keep = []
    while True:
        keep.append(str(len(keep)) * 20)


def main() -> None:
    print("1. Allocation limit: a deterministic budget of work, exact to the byte")
    print("  ", ml.limit_allocations(lambda: sum(range(1000)), limit="10 MB"))
    print("  ", ml.limit_allocations(runaway, limit="50 MB"))

    print("2. Global memory limit: resident memory of the process")
    from memprof_limits import _sampler

    ml.set_global_memory_limit(_sampler.rss_bytes() + 200 * 2**20)
    print("  ", ml.limit_global_memory(runaway))
    print(f"   released {ml.format_bytes(ml.release_memory())} afterwards")
    ml.set_global_memory_limit(None)

    print("3. Cancellation token: set from another thread, stops a loop that never allocates")
    token = ml.Token()
    threading.Timer(0.3, token.set).start()

    def spin() -> None:
        while True:
            pass

    start = time.monotonic()
    result = ml.limit_with_token(spin, token=token)
    print("  ", result, f"after {time.monotonic() - start:.2f} s")

    print("4. ... and a blocked time.sleep on the main thread")
    token = ml.Token()
    threading.Timer(0.3, token.set).start()
    start = time.monotonic()
    print(
        "  ",
        ml.limit_with_token(lambda: time.sleep(60), token=token),
        f"after {time.monotonic() - start:.2f} s",
    )

    print("5. A cell with rollback, as in the kernel and the REPL")
    namespace: dict[str, object] = {"x": 1}
    runner = ml.CellRunner(namespace, limits=ml.CellLimits(allocations=10**7))
    with runner.cell() as cell:
        cell.run(lambda: exec("x = 2\nlog = [str(i) for i in range(10**7)]", namespace))
    print("  ", cell.outcome.interrupt_line())
    print("   x is", namespace["x"])


if __name__ == "__main__":
    main()
