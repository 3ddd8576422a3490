"""The Jupyter kernel: cell round trip against stock ipykernel, interrupt latency,
rollback cost (issue 6).

Part 1 -- trivial-cell round trip: time from ``kc.execute(code)`` to the
``execute_reply`` on the client (a real kernel process, real ZMQ), ours
(``memprof-limits``, message mode) against stock ipykernel, side by side:
the two kernels run at the same time and the cells alternate between them,
after a warm-up.  Cells: ``pass``, ``x = 1`` and ``x`` (displayed).  Ratio =
median(ours) / median(stock), and the median of the ratios of consecutive
(paired) round trips, which is less sensitive to a load that drifts.
Target: <= 1.10.

Part 2 -- interrupt -> reply latency: a cell is submitted, the client waits
0.2 s, takes ``t0`` and calls ``km.interrupt_kernel()`` (``interrupt_request``
in message mode, SIGINT in signal mode); latency = time until the cell's
``execute_reply`` arrives.  Cells: a busy loop (``while True: pass``, which
holds the GIL) and ``time.sleep(60)``.  Stock ipykernel (KeyboardInterrupt)
for comparison.  Target (ours): median <= 50 ms.

Part 3 -- rollback cost with 10 000 names in the user namespace:
(a) in the kernel: the ``pass`` round trip with 10 000 names bound, ours and
stock (the checkpoint is a copy of the namespace's bindings before each
cell); (c) the interrupt latency with them (it includes the rollback);
(b) in-process, ``memprof_limits.CellRunner`` alone: a cell that
completes (checkpoint + commit) and a cell that is interrupted after
changing 100 names and adding 100 (checkpoint + rollback), namespace of 0 or
10 000 names.

Part 4 -- the fast switch interval during control messages: interrupt ->
reply latency of a busy loop (message mode) with ``interrupt_switch_interval``
0.0001 (the default) and 0 (never changed: Python's 0.005 throughout),
alternating in one kernel.

    python benchmarks/bench_kernel.py [--rounds 300] [--interrupts 20] [--only 1234]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

OURS, OURS_SIGNAL = "bench-memprof-limits", "bench-memprof-limits-signal"
STOCK, STOCK_MESSAGE = "bench-ipykernel", "bench-ipykernel-message"


def install_specs(root: Path) -> None:
    import json

    from ipykernel.kernelspec import install as install_stock
    from memprof_limits_kernel.install import install

    install(prefix=str(root), kernel_name=OURS, interrupt_mode="message")
    install(prefix=str(root), kernel_name=OURS_SIGNAL, interrupt_mode="signal")
    for name, mode in ((STOCK, "signal"), (STOCK_MESSAGE, "message")):
        path = Path(install_stock(prefix=str(root), kernel_name=name, display_name=name))
        spec = json.loads((path / "kernel.json").read_text())
        spec["interrupt_mode"] = mode
        spec["argv"][0] = sys.executable
        (path / "kernel.json").write_text(json.dumps(spec))
    os.environ["JUPYTER_PATH"] = str(root / "share" / "jupyter")


class Kernel:
    def __init__(self, name: str) -> None:
        from jupyter_client.manager import start_new_kernel

        self.name = name
        self.km, self.kc = start_new_kernel(kernel_name=name, startup_timeout=60)

    def close(self) -> None:
        self.kc.stop_channels()
        self.km.shutdown_kernel(now=True)

    def _reply(self, msg_id: str, timeout: float = 60) -> dict[str, Any]:
        while True:
            msg = self.kc.get_shell_msg(timeout=timeout)
            if msg["parent_header"].get("msg_id") == msg_id:
                return msg  # type: ignore[no-any-return]

    def _idle(self, msg_id: str, timeout: float = 60) -> None:
        while True:
            msg = self.kc.get_iopub_msg(timeout=timeout)
            if (
                msg["parent_header"].get("msg_id") == msg_id
                and msg["msg_type"] == "status"
                and msg["content"]["execution_state"] == "idle"
            ):
                return

    def round_trip(self, code: str) -> float:
        """Seconds from execute() to the execute_reply (then waits for idle)."""
        t0 = time.perf_counter()
        msg_id = self.kc.execute(code)
        reply = self._reply(msg_id)
        elapsed = time.perf_counter() - t0
        self._idle(msg_id)
        assert reply["content"]["status"] == "ok", reply["content"]
        return elapsed

    def interrupt_latency(self, code: str, delay: float = 0.2) -> float:
        msg_id = self.kc.execute(code)
        time.sleep(delay)
        t0 = time.perf_counter()
        self.km.interrupt_kernel()
        reply = self._reply(msg_id)
        elapsed = time.perf_counter() - t0
        self._idle(msg_id)
        assert reply["content"]["status"] == "error", reply["content"]
        return elapsed


def ms(values: list[float]) -> tuple[float, float, float, float]:
    v = sorted(values)
    p90 = v[min(len(v) - 1, int(0.9 * len(v)))]
    return (statistics.median(v) * 1e3, statistics.fmean(v) * 1e3, p90 * 1e3, v[-1] * 1e3)


def part1(rounds: int) -> None:
    print("#### Trivial-cell round trip (execute -> execute_reply)\n")
    print(
        f"{rounds} cells of each kind per kernel, alternating ours / stock, "
        "after 50 warm-up cells.\n"
    )
    print(
        "| cell | ours median ms | stock median ms | ratio of medians (target <= 1.10) "
        "| median of paired ratios | ours mean / p90 ms | stock mean / p90 ms |"
    )
    print("|---|---|---|---|---|---|---|")
    ours, stock = Kernel(OURS), Kernel(STOCK)
    try:
        for k in (ours, stock):
            for _ in range(50):
                k.round_trip("x = 1")
            k.round_trip("x")
        for code in ("pass", "x = 1", "x"):
            a: list[float] = []
            b: list[float] = []
            for _ in range(rounds):
                a.append(ours.round_trip(code))
                b.append(stock.round_trip(code))
            ma, mb = ms(a), ms(b)
            ratio = ma[0] / mb[0]
            paired = statistics.median(x / y for x, y in zip(a, b, strict=True))
            print(
                f"| `{code}` | {ma[0]:.2f} | {mb[0]:.2f} | {ratio:.2f}"
                f"{'' if ratio <= 1.10 else ' **(over)**'} | {paired:.2f} "
                f"| {ma[1]:.2f} / {ma[2]:.2f} | {mb[1]:.2f} / {mb[2]:.2f} |"
            )
    finally:
        ours.close()
        stock.close()
    print()


def part2(trials: int) -> None:
    print("#### Interrupt -> reply latency\n")
    print(f"{trials} interrupts per row, 0.2 s into the cell.\n")
    print("| kernel | mode | cell | median ms | p90 ms | max ms |")
    print("|---|---|---|---|---|---|")
    cells = {"busy loop": "while True: pass", "sleep": "import time; time.sleep(60)"}
    for name, label, mode in (
        (OURS, "memprof-limits", "message"),
        (OURS_SIGNAL, "memprof-limits", "signal"),
        (STOCK_MESSAGE, "stock ipykernel", "message"),
        (STOCK, "stock ipykernel", "signal"),
    ):
        k = Kernel(name)
        try:
            k.round_trip("pass")
            for cell, code in cells.items():
                lat = [k.interrupt_latency(code) for _ in range(trials)]
                m = ms(lat)
                print(f"| {label} | {mode} | {cell} | {m[0]:.1f} | {m[2]:.1f} | {m[3]:.1f} |")
        finally:
            k.close()
    print()


def part4(trials: int) -> None:
    print("#### Busy-loop interrupt latency with and without the fast switch interval\n")
    print(f"{trials} interrupts per row, alternating in one kernel (message mode).\n")
    print("| `interrupt_switch_interval` | median ms | p90 ms | max ms |")
    print("|---|---|---|---|")
    k = Kernel(OURS)
    lat: dict[float, list[float]] = {0.0001: [], 0.0: []}
    try:
        k.round_trip("pass")
        for _ in range(trials):
            for interval, values in lat.items():
                k.round_trip(f"get_ipython().kernel.interrupt_switch_interval = {interval}")
                values.append(k.interrupt_latency("while True: pass"))
    finally:
        k.close()
    for interval, values in lat.items():
        m = ms(values)
        print(f"| {interval} | {m[0]:.1f} | {m[2]:.1f} | {m[3]:.1f} |")
    fast, slow = ms(lat[0.0001])[0], ms(lat[0.0])[0]
    print(f"\nratio of medians (fast / unchanged): {fast / slow:.2f}\n")


def part3(rounds: int, names: int) -> None:
    print(f"#### Rollback cost with {names} names in the namespace\n")
    define = f"for _i_ in range({names}):\n    globals()[f'name_{{_i_}}'] = _i_"
    print(
        f"(a) `pass` round trip in the kernel, {rounds} cells per kernel, with and without "
        f"{names} names (four kernels, cells alternating between them):\n"
    )
    print("| kernel | 0 names median ms | with names median ms | difference ms |")
    print("|---|---|---|---|")
    kernels = {
        (label, size): Kernel(name)
        for name, label in ((OURS, "memprof-limits"), (STOCK, "stock ipykernel"))
        for size in (0, names)
    }
    try:
        times: dict[tuple[str, int], list[float]] = {key: [] for key in kernels}
        for (_label, size), k in kernels.items():
            if size:
                k.round_trip(define)
            for _ in range(30):
                k.round_trip("pass")
        for _ in range(rounds):
            for key, k in kernels.items():
                times[key].append(k.round_trip("pass"))
        for label in ("memprof-limits", "stock ipykernel"):
            empty, full = ms(times[label, 0])[0], ms(times[label, names])[0]
            print(f"| {label} | {empty:.2f} | {full:.2f} | {full - empty:+.2f} |")
        print()
        print(f"(c) interrupt -> reply latency (busy loop, message mode), {names} names:\n")
        k = kernels["memprof-limits", names]
        lat = ms([k.interrupt_latency("x = 1\nwhile True: pass") for _ in range(10)])
        print(f"median {lat[0]:.1f} ms, max {lat[3]:.1f} ms (the rollback restores `x`)\n")
    finally:
        for k in kernels.values():
            k.close()
    print("(b) `memprof_limits.CellRunner` in-process (no kernel), median of 200 cells:\n")
    print(
        "| namespace | completed cell (checkpoint + commit) µs "
        "| interrupted cell, 100 changed + 100 added (checkpoint + rollback) µs |"
    )
    print("|---|---|---|")
    import memprof_limits as ml

    for size in (0, names):
        ns: dict[str, Any] = {f"name_{i}": i for i in range(size)}
        runner = ml.CellRunner(ns)
        done = _median_us(partial(_cell, runner, ns, interrupt=False))
        rolled = _median_us(partial(_cell, runner, ns, interrupt=True))
        print(f"| {size} names | {done:.1f} | {rolled:.1f} |")
    print()


def _cell(runner: Any, ns: dict[str, Any], interrupt: bool) -> None:
    with runner.cell() as cell:
        if interrupt:

            def change() -> None:
                for i in range(100):
                    ns[f"name_{i}"] = -i
                    ns[f"new_{i}"] = i
                cell.token.set()
                while True:
                    pass

            cell.run(change)


def _median_us(fn: Callable[[], None], n: int = 200) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=300, help="round trips per cell kind")
    parser.add_argument("--interrupts", type=int, default=20, help="interrupts per scenario")
    parser.add_argument("--names", type=int, default=10_000)
    parser.add_argument("--only", default="1234", help="parts to run, e.g. 13")
    args = parser.parse_args()
    import ipykernel
    import IPython

    load = os.getloadavg()[0]
    print(f"### CPython {platform.python_version()}\n")
    print(f"- command: `python benchmarks/bench_kernel.py {' '.join(sys.argv[1:])}`")
    print(
        f"- ipykernel {ipykernel.__version__}, IPython {IPython.__version__}; load average at "
        f"start: {load:.2f} ({os.cpu_count()} CPUs)\n"
    )
    with tempfile.TemporaryDirectory() as tmp:
        install_specs(Path(tmp))
        if "1" in args.only:
            part1(args.rounds)
        if "2" in args.only:
            part2(args.interrupts)
        if "3" in args.only:
            part3(args.rounds // 3 or 1, args.names)
        if "4" in args.only:
            part4(args.interrupts)


if __name__ == "__main__":
    main()
