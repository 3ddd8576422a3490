"""The statistical profiler (memprof_limits.memprof): overhead and accuracy.

Part 1 -- overhead on the workloads of ``benchmarks/workloads.py``, each run in
these modes, toggled at run time in one process and interleaved (order rotated
every round), ``gc.collect()`` before each run:

  nohook         the engine stopped: CPython's own allocators (no profiling)
  nohook_b       the same again: an A/A control that shows the noise floor
  engine         the engine started, idle (what the limits cost anyway)
  memprof        ``memprof.start()``: the default rate, 1/80 000 per byte, 64 frames
  memprof_10x    ``memprof.start(sampling_rate=1/8000)``
  memprof_track  ``memprof.start(track_frees=True)`` (default rate)
  tracemalloc1   engine stopped, ``tracemalloc.start(1)``
  tracemalloc25  engine stopped, ``tracemalloc.start(25)``

Times are CPU seconds of the process (``time.process_time``: robust to the
other processes of a shared machine); the ratio of a mode to ``nohook`` is the
median over rounds of the paired (same round) ratios, summarised by the
geomean over workloads.  Starting the profiler and taking the snapshot are not
timed; the cost of ``snapshot()`` + ``statistics("lineno")`` is reported on
its own.  Target: ``memprof / nohook`` <= 1.05 (geomean).

Then, in C, the cost per allocation (``mlt_bench_ns`` of ``native/testing.c``:
ns per malloc+free pair with the GIL held, minimum over repetitions) with the
engine idle and with the profiler in each mode.

Part 2 -- accuracy against tracemalloc's exact figures.  ``retained_workload``
builds and keeps structures like those of the overhead workloads, one per
line.  It runs once under ``tracemalloc.start(1)`` (engine stopped; the exact
live bytes per line) and then under ``memprof.start(track_frees=True)`` with
``SEEDS`` engine seeds (``Snapshot.alive().statistics("lineno")``: estimated
live bytes per line).  Both measured runs follow a warm-up run, so that they
see the same interpreter state.  For the 10 biggest lines (by tracemalloc) the
table gives the relative error of the estimate and the standard deviation the
sampling model predicts, ``1 / sqrt(bytes * rate)`` (``docs/statistical.md``).

    python benchmarks/bench_memprof.py [--rounds 15] [--seeds 5] [--write-results]

``--write-results`` records the output in the "## Profiler" section of
``benchmarks/RESULTS.md`` (its ``### CPython X.Y`` subsection), with
``run_all.update_results``.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from workloads import WORKLOADS, _Node  # noqa: E402 - shared with the engine benchmarks

import memprof_limits as ml  # noqa: E402
from memprof_limits import memprof  # noqa: E402

MODES = [
    "nohook",
    "nohook_b",
    "engine",
    "memprof",
    "memprof_10x",
    "memprof_track",
    "tracemalloc1",
    "tracemalloc25",
]
DEFAULT_RATE = 1 / 80_000
TITLE = "Profiler"
INTRO = (
    "The statistical profiler (issue 5). `benchmarks/bench_memprof.py`: overhead of\n"
    "`memprof.start()` at the default rate (1/80 000 per byte, 64 frames), at 10x the rate,\n"
    "and with `track_frees=True`, against no profiling (`nohook`: engine stopped; `nohook_b`\n"
    "is an A/A control), the idle engine, and `tracemalloc.start(1)` / `tracemalloc.start(25)`,\n"
    "on the workloads of `benchmarks/workloads.py` (one process, modes interleaved, CPU time,\n"
    "median of paired ratios, geomean over workloads). Target: `memprof / nohook` <= 1.05.\n"
    "Then the accuracy of the estimated live bytes per line against tracemalloc's exact\n"
    "figures on a workload that keeps what it builds (top 10 lines; model sd =\n"
    "1/sqrt(bytes x rate)).\n\n"
    "Command (per version): `.venvs/3.X/bin/python benchmarks/bench_memprof.py --write-results`"
)


# ---------------------------------------------------------------------------
# Part 1: overhead.


def set_mode(mode: str) -> None:
    if memprof.is_tracing():
        memprof.stop()
        memprof.clear()
    if tracemalloc.is_tracing():
        tracemalloc.stop()
    if mode in ("nohook", "nohook_b") or mode.startswith("tracemalloc"):
        if ml.is_started():
            ml.stop()
        if mode == "tracemalloc1":
            tracemalloc.start(1)
        elif mode == "tracemalloc25":
            tracemalloc.start(25)
        return
    ml.start()
    if mode == "memprof":
        memprof.start()
    elif mode == "memprof_10x":
        memprof.start(sampling_rate=10 * DEFAULT_RATE)
    elif mode == "memprof_track":
        memprof.start(track_frees=True)


def run_in_mode(mode: str, fn: Callable[[], object]) -> float:
    set_mode(mode)
    gc.collect()
    c0 = time.process_time()
    fn()
    elapsed = time.process_time() - c0
    set_mode("nohook")  # stop and clear outside the timed part
    return elapsed


def geomean(xs: list[float]) -> float:
    return math.exp(sum(math.log(x) for x in xs) / len(xs))


def paired_median_ratio(a: list[float], b: list[float]) -> float:
    """Median of a[i] / b[i] over the rounds both have (a may have fewer)."""
    return statistics.median(x / y for x, y in zip(a, b[: len(a)], strict=True))


def bench_overhead(
    rounds: int,
    names: list[str],
    modes: list[str],
    tracemalloc_rounds: int,
    log: Callable[[str], None],
) -> dict[str, dict[str, list[float]]]:
    """CPU seconds per workload and mode.  The (slow) tracemalloc modes run
    in the first ``tracemalloc_rounds`` rounds only: their ratios pair them
    with the ``nohook`` runs of those rounds."""
    times: dict[str, dict[str, list[float]]] = {w: {m: [] for m in modes} for w in names}
    for w in names:  # warm-up
        for m in modes:
            run_in_mode(m, WORKLOADS[w])
    t0 = time.time()
    for r in range(rounds):
        order = modes[r % len(modes) :] + modes[: r % len(modes)]
        if r >= tracemalloc_rounds:
            order = [m for m in order if not m.startswith("tracemalloc")]
        for w in names:
            for m in order:
                times[w][m].append(run_in_mode(m, WORKLOADS[w]))
        log(f"  round {r + 1}/{rounds} ({time.time() - t0:.0f} s)")
    return times


def overhead_table(times: dict[str, dict[str, list[float]]], modes: list[str]) -> str:
    others = [m for m in modes if m != "nohook"]
    head = ["workload", "nohook ms"] + [f"{m} / nohook" for m in others]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    ratios: dict[str, list[float]] = {m: [] for m in others}
    for w, per in times.items():
        row = [w, f"{statistics.median(per['nohook']) * 1e3:.1f}"]
        for m in others:
            q = paired_median_ratio(per[m], per["nohook"])
            ratios[m].append(q)
            row.append(f"{q:.3f}" if q < 2 else f"{q:.2f}")
        lines.append("| " + " | ".join(row) + " |")
    row = ["**geomean**", ""] + [f"**{geomean(ratios[m]):.3f}**" for m in others]
    lines.append("| " + " | ".join(row) + " |")
    if "engine" in modes and "memprof" in modes:
        vs_engine = geomean(
            [paired_median_ratio(per["memprof"], per["engine"]) for per in times.values()]
        )
        lines.append("")
        lines.append(
            f"memprof / engine (the profiler's own cost over the idle engine), geomean: "
            f"**{vs_engine:.3f}**"
        )
    return "\n".join(lines)


def snapshot_costs(names: list[str]) -> str:
    """Milliseconds of snapshot() + statistics("lineno") after each workload."""
    lines = [
        "| workload | samples (default rate) | snapshot + statistics ms |",
        "|---|---|---|",
    ]
    for w in names:
        set_mode("memprof")
        WORKLOADS[w]()
        t0 = time.perf_counter()
        snap = memprof.snapshot()
        snap.statistics("lineno")
        ms = (time.perf_counter() - t0) * 1e3
        lines.append(f"| {w} | {len(snap.samples)} | {ms:.1f} |")
    set_mode("nohook")
    return "\n".join(lines)


def c_micro(reps: int, iterations: int) -> str:
    """ns per malloc+free pair in C (``mlt_bench_ns``, GIL held), min over reps."""
    from memprof_limits import _native_testing  # type: ignore[attr-defined]

    calls = {"OBJ 32 B": (2, 32), "OBJ 1 KiB": (2, 1024), "RAW 1 KiB": (0, 1024)}
    modes = ["engine", "memprof", "memprof_10x", "memprof_track"]
    best = {c: dict.fromkeys(modes, math.inf) for c in calls}
    for r in range(reps):
        for m in modes[r % len(modes) :] + modes[: r % len(modes)]:
            set_mode(m)
            for c, (domain, size) in calls.items():
                ns = float(_native_testing.lib.mlt_bench_ns(domain, size, iterations))
                best[c][m] = min(best[c][m], ns)
    set_mode("nohook")
    head = ["call (malloc+free)"] + [f"{m} ns" for m in modes]
    head += [f"{m} - engine" for m in modes[1:]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c, per in best.items():
        row = [c] + [f"{per[m]:.1f}" for m in modes]
        row += [f"{per[m] - per['engine']:+.1f}" for m in modes[1:]]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# Part 2: accuracy.


class _Point:
    def __init__(self, i: float) -> None:
        self.x = math.sin(i)
        self.y = math.cos(i) * 3
        self.z = self.x * self.x / 2


def _tree(depth: int) -> _Node:
    if depth == 0:
        return _Node(None, None, 0)
    return _Node(_tree(depth - 1), _tree(depth - 1), depth)  # LINE: tree nodes


def retained_workload() -> list[object]:
    """Structures like those of the overhead workloads, built and kept, each
    built on one line (12 lines, from ~0.2 MB to ~30 MB)."""
    keep: list[object] = []
    keep.append([(i, i * 2, str(i)) for i in range(150_000)])  # tuples + str
    keep.append({"k%d" % i: [i] for i in range(60_000)})  # noqa: UP031 - dict of lists
    keep.append(_tree(15))  # __slots__ tree
    doc = [{"id": i, "name": f"user{i}", "tags": ["a", str(i % 7)]} for i in range(20_000)]
    keep.append(doc)
    keep.append(json.loads(json.dumps(doc)))  # decoded JSON
    keep.append([f"item-{i}:{i * 3}".upper() for i in range(100_000)])  # f-strings
    keep.append([_Point(i) for i in range(40_000)])  # objects with __dict__
    keep.append([bytearray(4096) for _ in range(2_000)])  # 8 MB of buffers
    keep.append([bytes(100) for _ in range(20_000)])  # small bytes
    keep.append({i: str(i) * 3 for i in range(30_000)})  # int -> str
    keep.append([[i] * 10 for i in range(20_000)])  # small lists
    keep.append(list(range(50_000)))  # ints
    return keep


def top_lines_tracemalloc(fn: Callable[[], object], n: int) -> list[tuple[str, int, int]]:
    """[(filename, lineno, exact live bytes)] of the n biggest lines."""
    set_mode("tracemalloc1")
    kept = fn()
    snap = tracemalloc.take_snapshot()
    set_mode("nohook")
    del kept
    stats = snap.statistics("lineno")
    return [(s.traceback[0].filename, s.traceback[0].lineno, s.size) for s in stats[:n]]


def estimates_memprof(
    fn: Callable[[], object], seed: int, rate: float
) -> dict[tuple[str, int], int]:
    set_mode("nohook")
    ml.start(rate, seed=seed)
    memprof.start(track_frees=True)
    kept = fn()
    snap = memprof.snapshot()
    memprof.stop()
    memprof.clear()
    del kept
    ml.stop()
    return {
        (s.traceback[-1].filename, s.traceback[-1].lineno): s.size
        for s in snap.alive().statistics("lineno")
    }


def bench_accuracy(seeds: int, rate: float, top: int) -> tuple[str, dict[str, float]]:
    retained_workload()  # warm-up: interned strings, type caches, arenas
    exact = top_lines_tracemalloc(retained_workload, top)
    runs = [estimates_memprof(retained_workload, 1000 + s, rate) for s in range(seeds)]
    lines = [
        f"| line ({Path(__file__).name}) | exact KiB (tracemalloc) | estimate KiB (seed 0) | "
        f"rel. error (seed 0) | mean abs rel. error ({seeds} seeds) | model sd |",
        "|---|---|---|---|---|---|",
    ]
    all_errors: list[float] = []
    z_scores: list[float] = []
    for filename, lineno, size in exact:
        sd = 1 / math.sqrt(size * rate)
        errors = [run.get((filename, lineno), 0) / size - 1 for run in runs]
        all_errors += [abs(e) for e in errors]
        z_scores += [abs(e) / sd for e in errors]
        if filename == __file__:
            code = Path(filename).read_text().splitlines()[lineno - 1].split("#")[0].strip()
            where = f"{lineno}: `{code[:60]}`"
        else:
            where = f"{Path(filename).name}:{lineno}"
        lines.append(
            f"| {where} | {size / 1024:,.0f} | {runs[0].get((filename, lineno), 0) / 1024:,.0f} | "
            f"{errors[0]:+.1%} | {statistics.fmean(abs(e) for e in errors):.1%} | {sd:.1%} |"
        )
    summary = {
        "median_abs_error": statistics.median(all_errors),
        "max_abs_error": max(all_errors),
        "within_2sd": sum(z <= 2 for z in z_scores) / len(z_scores),
    }
    lines.append("")
    lines.append(
        f"Over the {len(exact)} lines x {seeds} seeds: median |relative error| "
        f"**{summary['median_abs_error']:.1%}**, max {summary['max_abs_error']:.1%}; "
        f"{summary['within_2sd']:.0%} of the errors within 2 model sd (~95 % expected)."
    )
    return "\n".join(lines), summary


# ---------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rounds", type=int, default=15, help="rounds of the workloads (default 15)")
    p.add_argument("--workloads", default="", help="comma-separated subset of the workloads")
    p.add_argument(
        "--tracemalloc-rounds", type=int, default=3, help="rounds with tracemalloc (default 3)"
    )
    p.add_argument("--seeds", type=int, default=5, help="seeds for the accuracy part")
    p.add_argument("--skip-overhead", action="store_true")
    p.add_argument("--skip-accuracy", action="store_true")
    p.add_argument("--skip-c", action="store_true", help="skip the C micro-benchmark")
    p.add_argument("--c-reps", type=int, default=7)
    p.add_argument("--c-iterations", type=int, default=1_000_000)
    p.add_argument("--cpu", type=int, default=None, help="CPU to pin to (-1: none)")
    p.add_argument("--write-results", action="store_true", help="record in RESULTS.md")
    p.add_argument("--json", type=Path, default=None, help="also write the raw data here")
    args = p.parse_args(argv)

    cpus = sorted(os.sched_getaffinity(0))
    cpu = cpus[-1] if args.cpu is None else args.cpu
    if cpu >= 0:
        os.sched_setaffinity(0, {cpu})

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    names = [w for w in args.workloads.split(",") if w] or list(WORKLOADS)
    command = " ".join(["python benchmarks/bench_memprof.py", *(argv or sys.argv[1:])])
    out = [
        f"# memprof benchmarks (CPython {platform.python_version()})",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, pinned to CPU {cpu}; "
        f"{args.rounds} rounds ({args.tracemalloc_rounds} with tracemalloc); "
        f"command: `{command}`",
        "",
    ]
    raw: dict[str, Any] = {}
    if not args.skip_overhead:
        log(f"overhead: {len(names)} workloads x {len(MODES)} modes x {args.rounds} rounds")
        times = bench_overhead(args.rounds, names, MODES, args.tracemalloc_rounds, log)
        raw["times"] = times
        out += ["#### Overhead (CPU time ratios)", "", overhead_table(times, MODES), ""]
        out += ["#### Cost of a snapshot", "", snapshot_costs(names), ""]
    if not args.skip_c:
        log("C micro-benchmark")
        out += [
            "#### Per allocation, in C (ns per malloc+free pair, min of "
            f"{args.c_reps}; a sample every 80 000 B, or 8 000 B at 10x)",
            "",
            c_micro(args.c_reps, args.c_iterations),
            "",
        ]
    if not args.skip_accuracy:
        for label, rate in (("default rate, 1/80 000", DEFAULT_RATE), ("10x, 1/8 000", 1 / 8000)):
            log(f"accuracy at {label}")
            table, summary = bench_accuracy(args.seeds, rate, 10)
            raw[f"accuracy {label}"] = summary
            out += [f"#### Accuracy of live bytes per line ({label})", "", table, ""]
    set_mode("nohook")
    text = "\n".join(out).rstrip() + "\n"
    print(text)
    if args.json:
        args.json.write_text(json.dumps(raw, indent=1))
    if args.write_results:
        from run_all import RESULTS, update_results

        update_results(RESULTS, TITLE, INTRO, text.split("\n", 1)[1])
        log(f"written to {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
