"""Run the benchmarks for the current interpreter, optionally recording them in RESULTS.md.

    python benchmarks/run_all.py                      # every benchmarks/bench_*.py
    python benchmarks/run_all.py --only overhead,delivery --write-results

Each benchmark runs in its own process (``sys.executable``), one after the
other; its Markdown output is printed.  With ``--write-results``, the output of
the benchmarks listed in ``SECTIONS`` replaces the ``### CPython X.Y``
subsection of their ``## ...`` section of ``benchmarks/RESULTS.md`` (created if
missing) and refreshes that section's introduction from ``SECTIONS``; other
``###`` subsections there (a hand-written summary) are kept, and every other
part of the file is left exactly as it was (other sections belong to other
benchmarks).  Run it once per interpreter::

    for v in 3.11 3.12 3.13; do .venvs/$v/bin/python benchmarks/run_all.py --write-results; done
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "RESULTS.md"

# EXTEND HERE: benchmark script -> (RESULTS.md section title, its introduction).  The intro is
# written when the section is created; an existing section keeps its own.
SECTIONS: dict[str, tuple[str, str]] = {
    "bench_memprof.py": ("Profiler", "See benchmarks/bench_memprof.py."),
    "bench_overhead.py": (
        "Engine overhead",
        "What the allocator hooks cost (issue 2). `benchmarks/bench_overhead.py` runs the 13\n"
        "workloads of `benchmarks/workloads.py` (30-150 ms each) in six modes: engine stopped\n"
        "(`nohook`, and again as `nohook_b`: an A/A control whose ratio is the noise floor),\n"
        "started but idle (`idle`), an allocation limit open (`budget`:\n"
        "`limit_allocations(run, limit=10**15)`), every limit kind open (`armed`:\n"
        "`LimitScope(memory=True, token=Token())` around that, global memory limit 2**50, so\n"
        "the RSS is read at samples and the watchdog thread runs; nothing is ever reached) and\n"
        "`tracemalloc.start()`. One process pinned to one CPU, modes toggled at run time and\n"
        "interleaved (order rotated every round), `gc.collect()` before each run, 15 rounds.\n"
        "Times are the process's CPU time (`time.process_time()`): on this shared 2-vCPU VM\n"
        "the wall clock mostly measures the other tenants (the wall-clock geomeans are printed\n"
        "under each table). Ratios: median over rounds of the paired (same round) ratio;\n"
        "geomean over workloads. Then the C micro-benchmark: `mlt_bench_ns` (ns per\n"
        "malloc+free pair, GIL held), min of 15 repetitions, and the same in user-space\n"
        "instructions and cycles from per-thread hardware counters (`perf_event_open`),\n"
        "which other processes do not disturb.\n"
        "Targets: geomean `armed / nohook` <= 1.02; `budget - stopped` <= +2 ns per call.\n\n"
        "Command (per version): `.venvs/3.X/bin/python benchmarks/run_all.py --only overhead "
        "--write-results`",
    ),
    "bench_delivery.py": (
        "Delivery latency and overshoot",
        "Interrupt delivery (issue 3). `benchmarks/bench_delivery.py`: `token.set()` -> the\n"
        "target's `limit_with_token` returns `Error`, measured from just before `set()` in the\n"
        "setter thread to the return in the target thread (`perf_counter_ns`), 300 trials per\n"
        "scenario, with two no-library reference rows (the GIL/OS floor of this machine);\n"
        "then the global-memory-limit overshoot (peak RSS of the task above the limit, VmHWM).\n"
        "Targets: p99 <= 2 ms busy, <= 20 ms blocked; overshoot <= 16 MiB. The cost of an\n"
        'armed limit against the engine idle is the `armed / idle` column of "Engine\n'
        'overhead" above.\n\n'
        "Command (per version): `.venvs/3.X/bin/python benchmarks/run_all.py --only delivery "
        "--write-results`",
    ),
    "bench_dask.py": (
        "Dask",
        "Limited tasks on a Dask cluster (issue 15). `benchmarks/bench_dask.py`: batches of small\n"
        "tasks on a `LocalCluster` of 2 worker processes x 1 thread with `LimitsPlugin`, plain\n"
        "and in each mode of `limited`, interleaved; tasks per second and the ratio of the\n"
        "batch's time to the plain batch's, medians over rounds; then what the canonical\n"
        "collector state costs per task in a worker.\n\n"
        "Command (per version): `.venvs/3.X/bin/python benchmarks/run_all.py --only dask "
        "--write-results`",
    ),
    "bench_startup.py": (
        "Start-up",
        "What `import memprof_limits; start()` adds to a bare interpreter (issue 16: paid by\n"
        "every `memprof-limits run`, protocol server and Dask worker start), and what opening\n"
        "and closing one limit costs. `benchmarks/bench_startup.py`: fresh interpreters,\n"
        "interleaved, compiled modules cached; wall and CPU time medians, instructions from\n"
        "callgrind (one run each: stable under load). Target: <= 10 ms over a bare\n"
        "interpreter. Before (606e12c, everything imported at once): 169.5 M instructions over\n"
        "bare on 3.13 (2.7x a bare interpreter), 66 modules.\n\n"
        "Command (per version): `.venvs/3.X/bin/python benchmarks/run_all.py --only startup "
        "--write-results`",
    ),
}


def discover(only: list[str]) -> list[Path]:
    """bench_*.py, those of SECTIONS first (in its order), then the others by name."""
    order = list(SECTIONS)
    scripts = sorted(
        HERE.glob("bench_*.py"),
        key=lambda s: (order.index(s.name) if s.name in order else len(order), s.name),
    )
    if only:
        scripts = [s for s in scripts if any(o in s.stem for o in only)]
    return scripts


def run(script: Path, extra: list[str]) -> tuple[int, str, float]:
    t0 = time.time()
    proc = subprocess.run(
        [sys.executable, str(script), *extra],
        stdout=subprocess.PIPE,
        text=True,
        cwd=HERE.parent,
        check=False,
    )
    return proc.returncode, proc.stdout, time.time() - t0


def _split_sections(text: str) -> list[str]:
    """Split at lines starting with '## ' (each chunk keeps its heading)."""
    parts = re.split(r"(?m)^(?=## )", text)
    return [p for p in parts if p]


def _version_key(heading: str) -> tuple[int, ...]:
    """Other subsections (a hand-written summary) first, then the versions in order."""
    m = re.match(r"### CPython (\d+)\.(\d+)(?:\.(\d+))?", heading)
    return tuple(int(x) for x in m.groups() if x) if m else (-1,)


def update_results(path: Path, title: str, intro: str, body: str) -> None:
    """Replace (or add) the '### CPython X.Y...' subsection of '## title' with body."""
    version = platform.python_version()
    minor = ".".join(version.split(".")[:2])
    sub = f"### CPython {version}\n\n{body.strip()}\n\n"
    text = path.read_text() if path.exists() else "# Benchmark results\n\n"
    chunks = _split_sections(text)
    idx = next(
        (i for i, c in enumerate(chunks) if c.splitlines()[0].strip() == f"## {title}"), None
    )
    if idx is None:
        # Before the first section that SECTIONS lists after this one; else at the end.
        titles = [t for t, _intro in SECTIONS.values()]
        later = titles[titles.index(title) + 1 :] if title in titles else []
        idx = next(
            (i for i, c in enumerate(chunks) if c.splitlines()[0].strip()[3:] in later),
            len(chunks),
        )
        if idx == len(chunks) and chunks and not chunks[-1].endswith("\n\n"):
            chunks[-1] = chunks[-1].rstrip("\n") + "\n\n"
        chunks.insert(idx, f"## {title}\n\n{intro.strip()}\n\n")
    section = chunks[idx]
    pieces = re.split(r"(?m)^(?=### )", section)
    # The introduction always follows SECTIONS (it describes the current script); the
    # subsections other than "### CPython X.Y" (a hand-written summary) are kept.
    head, subs = f"## {title}\n\n{intro.strip()}\n\n", pieces[1:]
    subs = [s for s in subs if not re.match(rf"### CPython {re.escape(minor)}(\.|\s)", s)]
    subs.append(sub)
    subs.sort(key=_version_key)
    subs = [s.rstrip("\n") + "\n\n" for s in subs]
    chunks[idx] = head.rstrip("\n") + "\n\n" + "".join(subs)
    new = "".join(chunks).rstrip("\n") + "\n"
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".RESULTS.", suffix=".md")
    with os.fdopen(fd, "w") as f:
        f.write(new)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--only", default="", help="comma-separated substrings of script names")
    p.add_argument(
        "--write-results", action="store_true", help="record the outputs in benchmarks/RESULTS.md"
    )
    p.add_argument("--results", type=Path, default=RESULTS, help="the results file")
    p.add_argument(
        "--quick",
        action="store_true",
        help="few rounds/trials (smoke test; implies no --write-results)",
    )
    args = p.parse_args(argv)
    quick_args = {
        "bench_overhead.py": ["--rounds", "2", "--c-reps", "2", "--c-iterations", "200000"],
        "bench_delivery.py": ["--trials", "20", "--mem-trials", "1"],
        "bench_memprof.py": [
            "--rounds",
            "2",
            "--tracemalloc-rounds",
            "1",
            "--seeds",
            "1",
            "--c-reps",
            "1",
            "--c-iterations",
            "100000",
        ],
    }
    status = 0
    for script in discover([o for o in args.only.split(",") if o]):
        extra = quick_args.get(script.name, []) if args.quick else []
        print(
            f"==> {script.name} {' '.join(extra)} (CPython {platform.python_version()})",
            file=sys.stderr,
            flush=True,
        )
        rc, out, secs = run(script, extra)
        print(out, flush=True)
        print(f"==> {script.name}: exit status {rc}, {secs:.0f} s", file=sys.stderr, flush=True)
        if rc:
            status = 1
            continue
        if args.write_results and not args.quick and script.name in SECTIONS:
            title, intro = SECTIONS[script.name]
            body = out.split("\n", 1)[1] if out.startswith("# ") else out  # drop the H1 line
            update_results(args.results, title, intro, body)
    return status


if __name__ == "__main__":
    sys.exit(main())
