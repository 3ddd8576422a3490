"""Engine overhead: the allocator hooks on allocation-heavy Python, and per allocation in C.

Part 1 -- workloads (``benchmarks/workloads.py``), each run in these modes:

  nohook       the engine stopped (``ml.stop()``: CPython's own allocators)
  nohook_b     the same again: an A/A control that shows the noise floor
  idle         ``ml.start()``, no limit open (the hooks count, nothing is armed)
  budget       an allocation limit only: ``ml.limit_allocations(run, limit=10**15)``
  armed        every limit kind open around the run:
               ``with ml.LimitScope(memory=True, token=Token()):``
               ``    ml.limit_allocations(run, limit=10**15)``
               with ``ml.set_global_memory_limit(2**50)`` (so the resident memory is
               read at every sample, as a real global limit does, and the watchdog
               thread is running); nothing is ever reached
  tracemalloc  engine stopped, ``tracemalloc.start()`` (1 frame)

Method (cpython-internals notes, section 4, "method A"): one process; modes
toggled at run time and interleaved -- for each round, for each workload, the
modes in an order rotated every round; ``gc.collect()`` before each run; the
time is taken inside the limited task (scope set-up is not timed).  Reported:
the median time per mode, and the ratio to ``nohook`` as the median over rounds
of the paired (same round) ratios; the geomean of those ratios over workloads.
Times are the process's CPU time (``time.process_time()``), which on a shared
machine is far less noisy than wall-clock time (it does not count the time
other processes hold the CPU); the wall-clock geomeans are printed too.

Part 2 -- C micro-benchmark: ``mlt_bench_ns`` (``native/testing.c``), mean ns per
malloc+free pair with the GIL held, for OBJ/MEM/RAW x 32 B/1 KiB, engine stopped
/ started idle / allocation budget armed / all limits armed / tracemalloc;
minimum over repetitions (modes interleaved).  Targets: geomean of ``armed``
<= 1.02x; ``budget`` <= +2 ns per call over ``stopped``.

    python benchmarks/bench_overhead.py [--rounds 15] [--cpu N|-1] [--json FILE]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import os
import platform
import statistics
import struct
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from workloads import WORKLOADS

import memprof_limits as ml
from memprof_limits import _native_testing  # type: ignore[attr-defined]

MODES = ["nohook", "nohook_b", "idle", "budget", "armed", "tracemalloc"]
HUGE_LIMIT = 10**15
GLOBAL_LIMIT = 2**50


def set_mode(mode: str) -> None:
    """Put the process in ``mode`` (see the module docstring)."""
    if tracemalloc.is_tracing():
        tracemalloc.stop()
    if mode in ("nohook", "nohook_b", "tracemalloc"):
        if ml.is_started():
            ml.stop()
        if mode == "tracemalloc":
            tracemalloc.start()
    else:
        ml.start()


def run_in_mode(mode: str, fn: Callable[[], object]) -> tuple[float, float, int | None]:
    """Run ``fn`` once in ``mode``; returns (CPU seconds of the process, wall-clock
    seconds, bytes counted or None)."""
    set_mode(mode)
    gc.collect()
    cpu = wall = 0.0

    def timed() -> object:
        nonlocal cpu, wall
        c0, t0 = time.process_time(), time.perf_counter()
        r = fn()
        wall = time.perf_counter() - t0
        cpu = time.process_time() - c0
        return r

    if mode == "budget":
        res = ml.limit_allocations(timed, limit=HUGE_LIMIT)
        if not isinstance(res, ml.Ok):
            raise RuntimeError(f"the budget was reached: {res!r}")
        return cpu, wall, res.value[1]
    if mode != "armed":
        timed()
        return cpu, wall, None
    with ml.LimitScope(memory=True, token=ml.Token()) as scope:
        result = ml.limit_allocations(timed, limit=HUGE_LIMIT)
    if not isinstance(result, ml.Ok) or scope.interrupted:
        raise RuntimeError(f"the armed limit was reached: {result!r} {scope!r}")
    return cpu, wall, result.value[1]


def geomean(xs: list[float]) -> float:
    return math.exp(sum(math.log(x) for x in xs) / len(xs))


def bench_workloads(
    rounds: int, names: list[str], modes: list[str], log: Callable[[str], None]
) -> dict[str, Any]:
    times: dict[str, dict[str, list[float]]] = {w: {m: [] for m in modes} for w in names}
    walls: dict[str, dict[str, list[float]]] = {w: {m: [] for m in modes} for w in names}
    counted: dict[str, int] = {}
    # Warm-up: one untimed run per workload and mode (specialisation, caches, arenas).
    for w in names:
        for m in modes:
            run_in_mode(m, WORKLOADS[w])
    t_start = time.time()
    for r in range(rounds):
        order = modes[r % len(modes) :] + modes[: r % len(modes)]
        for w in names:
            for m in order:
                cpu, wall, nbytes = run_in_mode(m, WORKLOADS[w])
                times[w][m].append(cpu)
                walls[w][m].append(wall)
                if nbytes is not None:
                    counted[w] = nbytes
        log(f"  round {r + 1}/{rounds} done ({time.time() - t_start:.0f} s)")
    set_mode("nohook")
    return {"times": times, "walls": walls, "counted": counted}


def paired_median_ratio(a: list[float], b: list[float]) -> float:
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


def wall_summary(data: dict[str, Any], modes: list[str]) -> str:
    """Geomeans of the same ratios computed on wall-clock times."""
    walls = data["walls"]
    others = [m for m in modes if m != "nohook"]
    cols = [(m, "nohook") for m in others]
    cols += [(a, b) for a, b in EXTRA_RATIOS if a in modes and b in modes]
    head = ["wall clock"] + [f"{a} / {b}" for a, b in cols]
    vals = [
        geomean([paired_median_ratio(walls[w][a], walls[w][b]) for w in walls]) for a, b in cols
    ]
    return "\n".join(
        [
            "| " + " | ".join(head) + " |",
            "|" + "---|" * len(head),
            "| geomean | " + " | ".join(f"{v:.3f}" for v in vals) + " |",
        ]
    )


EXTRA_RATIOS = [("budget", "idle"), ("armed", "idle"), ("armed", "budget")]


def workloads_table(data: dict[str, Any], modes: list[str]) -> str:
    times, counted = data["times"], data["counted"]
    others = [m for m in modes if m != "nohook"]
    extra = [(a, b) for a, b in EXTRA_RATIOS if a in modes and b in modes]
    head = ["workload", "nohook ms", "MB counted"]
    head += [f"{m} ms" for m in others] + [f"{m} / nohook" for m in others]
    head += [f"{a} / {b}" for a, b in extra]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    ratios: dict[str, list[float]] = {m: [] for m in others}
    extra_ratios: dict[tuple[str, str], list[float]] = {e: [] for e in extra}
    for w, per_mode in times.items():
        base = per_mode["nohook"]
        row = [w, f"{statistics.median(base) * 1e3:.1f}"]
        row.append(f"{counted[w] / 1e6:.0f}" if w in counted else "-")
        row += [f"{statistics.median(per_mode[m]) * 1e3:.1f}" for m in others]
        for m in others:
            q = paired_median_ratio(per_mode[m], base)
            ratios[m].append(q)
            row.append(f"{q:.3f}" if m != "tracemalloc" else f"{q:.2f}")
        for a, b in extra:
            q = paired_median_ratio(per_mode[a], per_mode[b])
            extra_ratios[(a, b)].append(q)
            row.append(f"{q:.3f}")
        lines.append("| " + " | ".join(row) + " |")
    row = ["**geomean**", "", ""] + [""] * len(others)
    row += [f"**{geomean(ratios[m]):.3f}**" for m in others]
    row += [f"**{geomean(extra_ratios[e]):.3f}**" for e in extra]
    lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# C micro-benchmark.

DOMAINS = {"OBJ": 2, "MEM": 1, "RAW": 0}
SIZES = {"32 B": 32, "1 KiB": 1024}
C_MODES = ["stopped", "idle", "budget", "all_armed", "tracemalloc"]


class HwCounter:
    """A per-thread hardware counter (``perf_event_open``, user space only).

    Per-thread counters stop while the thread is descheduled, so instructions
    and cycles per call are immune to the other processes of a shared machine
    (not to their cache and SMT pressure on cycles).  ``None`` where
    unavailable (not Linux x86-64, perf_event_paranoid, no PMU in the VM)."""

    INSTRUCTIONS, CYCLES = 1, 0  # PERF_COUNT_HW_*

    def __init__(self, config: int) -> None:
        attr = ctypes.create_string_buffer(128)
        struct.pack_into("IIQ", attr, 0, 0, 128, config)  # PERF_TYPE_HARDWARE, size, config
        struct.pack_into("Q", attr, 40, (1 << 5) | (1 << 6))  # exclude_kernel, exclude_hv
        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall.restype = ctypes.c_long
        fd = libc.syscall(
            ctypes.c_long(298),  # __NR_perf_event_open (x86-64)
            attr,
            ctypes.c_int(0),  # this thread
            ctypes.c_int(-1),  # any CPU
            ctypes.c_int(-1),  # no group
            ctypes.c_ulong(8),  # PERF_FLAG_FD_CLOEXEC
        )
        if fd < 0:
            raise OSError(ctypes.get_errno(), "perf_event_open")
        self.fd = int(fd)

    def read(self) -> int:
        return int.from_bytes(os.read(self.fd, 8), "little")

    @classmethod
    def open(cls, config: int) -> HwCounter | None:
        if platform.machine() != "x86_64" or sys.platform != "linux":
            return None
        try:
            return cls(config)
        except OSError:
            return None


def c_bench_once(
    mode: str, domain: int, size: int, iterations: int, counters: list[HwCounter | None]
) -> list[float]:
    """[ns, instructions, cycles] per malloc+free pair (nan where no counter)."""
    lib = _native_testing.lib
    if mode == "stopped":
        set_mode("nohook")
    elif mode == "tracemalloc":
        set_mode("tracemalloc")
    else:
        set_mode("idle")
    out: list[float] = []

    def run() -> None:
        c0 = [c.read() if c else 0 for c in counters]
        ns = float(lib.mlt_bench_ns(domain, size, iterations))
        c1 = [c.read() if c else 0 for c in counters]
        out[:] = [ns] + [
            (b - a) / iterations if c else math.nan
            for a, b, c in zip(c0, c1, counters, strict=True)
        ]

    if mode == "budget":
        ml.limit_allocations(run, limit=HUGE_LIMIT)
    elif mode == "all_armed":
        with ml.LimitScope(memory=True, token=ml.Token()):
            ml.limit_allocations(run, limit=HUGE_LIMIT)
    else:
        run()
    return out


def bench_c(reps: int, iterations: int) -> dict[str, dict[str, list[float]]]:
    """Per "DOMAIN size" and mode: [ns, instructions, cycles], each the min over reps."""
    counters = [HwCounter.open(HwCounter.INSTRUCTIONS), HwCounter.open(HwCounter.CYCLES)]
    best: dict[str, dict[str, list[float]]] = {}
    for dname, d in DOMAINS.items():
        for sname, s in SIZES.items():
            key = f"{dname} {sname}"
            best[key] = {m: [math.inf] * 3 for m in C_MODES}
            for r in range(reps):
                order = C_MODES[r % len(C_MODES) :] + C_MODES[: r % len(C_MODES)]
                for m in order:
                    its = iterations if m != "tracemalloc" else max(iterations // 10, 10_000)
                    got = c_bench_once(m, d, s, its, counters)
                    best[key][m] = [min(a, b) for a, b in zip(best[key][m], got, strict=True)]
    set_mode("nohook")
    return best


def c_table(best: dict[str, dict[str, list[float]]], what: int, unit: str, fmt: str) -> str:
    head = ["call (malloc+free)"] + [f"{m} {unit}" for m in C_MODES]
    head += ["idle - stopped", "budget - stopped", "all_armed - stopped"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, per in best.items():
        row = [key] + [format(per[m][what], fmt) for m in C_MODES]
        row += [
            format(per[m][what] - per["stopped"][what], "+" + fmt)
            for m in ("idle", "budget", "all_armed")
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rounds", type=int, default=15, help="rounds of the workloads (default 15)")
    p.add_argument("--workloads", default="", help="comma-separated subset of the workloads")
    p.add_argument("--no-tracemalloc", action="store_true", help="skip the tracemalloc mode")
    p.add_argument("--c-reps", type=int, default=15, help="repetitions of the C benchmark")
    p.add_argument("--c-iterations", type=int, default=500_000, help="pairs per C measurement")
    p.add_argument("--skip-c", action="store_true", help="skip the C micro-benchmark")
    p.add_argument("--skip-workloads", action="store_true", help="skip the workloads")
    p.add_argument(
        "--cpu",
        type=int,
        default=None,
        help="CPU to pin to (default: the last allowed one; -1: no pinning)",
    )
    p.add_argument("--json", type=Path, default=None, help="also write the raw data here")
    args = p.parse_args(argv)

    cpus = sorted(os.sched_getaffinity(0))
    cpu = cpus[-1] if args.cpu is None else args.cpu
    if cpu >= 0:
        os.sched_setaffinity(0, {cpu})  # before any thread starts: the watchdog inherits it
    names = [w for w in args.workloads.split(",") if w] or list(WORKLOADS)
    modes = [m for m in MODES if not (args.no_tracemalloc and m == "tracemalloc")]
    ml.set_global_memory_limit(GLOBAL_LIMIT)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    print(f"# Engine overhead -- CPython {platform.python_version()}")
    print()
    cmd = " ".join(["python", "benchmarks/bench_overhead.py", *(argv or sys.argv[1:])])
    print(f"- command: `{cmd}`")
    print(f"- pinned to CPU {cpu}" if cpu >= 0 else "- not pinned")
    print(f"- load average at start: {os.getloadavg()[0]:.2f} ({os.cpu_count()} CPUs)")
    print(
        f"- sampling rate 1/{round(1 / ml.sampling_rate())} per byte; armed = LimitScope("
        "memory=True, token=Token()) around limit_allocations(limit=10**15), global limit 2**50"
    )
    raw: dict[str, Any] = {"python": platform.python_version()}
    if not args.skip_workloads:
        log(f"workloads: {len(names)} x {len(modes)} modes x {args.rounds} rounds")
        t0 = time.time()
        data = bench_workloads(args.rounds, names, modes, log)
        raw["workloads"] = data
        print(
            f"- workloads: {args.rounds} rounds, {time.time() - t0:.0f} s; ratios are medians"
            " of paired per-round ratios, geomean over workloads. Times are the process's CPU"
            " time (`time.process_time()` around the run: it excludes the time other processes"
            " on the shared machine take from us, and includes our watchdog thread); the same"
            " geomeans on wall-clock times follow the table"
        )
        print()
        print(workloads_table(data, modes))
        print()
        print(wall_summary(data, modes))
    if not args.skip_c:
        log("C micro-benchmark")
        best = bench_c(args.c_reps, args.c_iterations)
        raw["c"] = best
        print()
        print(
            f"C micro-benchmark: mlt_bench_ns, {args.c_iterations} malloc+free pairs per "
            f"measurement (tracemalloc: 1/10 of that), GIL held, min of {args.c_reps} "
            "repetitions (modes interleaved); budget = inside limit_allocations(limit=10**15); "
            "all_armed = that inside LimitScope(memory=True, token=...). Nanoseconds per pair "
            "(wall clock):"
        )
        print()
        print(c_table(best, 0, "ns", ".1f"))
        if not any(math.isnan(v[1]) for per in best.values() for v in per.values()):
            print()
            print(
                "The same, in user-space instructions and cycles per pair (per-thread hardware "
                "counters: not disturbed by other processes taking the CPU):"
            )
            print()
            print(c_table(best, 1, "instr", ".1f"))
            print()
            print(c_table(best, 2, "cycles", ".1f"))
    if args.json:
        args.json.write_text(json.dumps(raw, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
