"""Start-up and fixed costs: what ``import memprof_limits; start()`` adds to a bare interpreter
(paid by every ``memprof-limits run``, protocol server and Dask worker start), and what one
tiny limited task costs (opening and closing a limit).

Side by side, in one run:

- wall and CPU time: medians of interleaved runs of fresh interpreters (``python -c pass``,
  the import, the import and ``start()``, and that plus one limited task), and over the bare
  interpreter (CPU time moves less with the machine's load);
- instructions (valgrind's callgrind, stable under load) of the same commands, one run each;
- the modules the import loads that a bare interpreter does not (``python -X importtime``),
  the heaviest first;
- one ``limit_allocations(lambda: None, limit=...)``: microseconds (median of rounds of
  ``timeit``) and instructions (callgrind: 2,000 calls minus 0 calls, divided).

    python benchmarks/bench_startup.py [--runs 21]
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import callgrind

COMMANDS = {
    "bare": "pass",
    "import": "import memprof_limits",
    "import + start()": "import memprof_limits as ml; ml.start()",
    "+ one limited task": (
        "import memprof_limits as ml; ml.start(); ml.limit_allocations(lambda: None, limit=10**6)"
    ),
}
# Compiled modules are cached, as on a user's machine (this shell may say otherwise).
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
ENV["PYTHONHASHSEED"] = "0"
CALLS = """
import memprof_limits as ml
ml.start()
f = lambda: None
for _ in range({n}):
    ml.limit_allocations(f, limit=10**6)
"""


def run_ms(code: str) -> tuple[float, float]:
    """(wall, CPU) milliseconds of one fresh interpreter running ``code``."""
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-c", code], env=ENV)
    _, status, usage = os.wait4(child.pid, 0)
    wall = (time.perf_counter() - start) * 1e3
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        raise RuntimeError(f"{code!r}: exit status {child.returncode}")
    return wall, (usage.ru_utime + usage.ru_stime) * 1e3


def timings(runs: int) -> dict[str, tuple[list[float], list[float]]]:
    """Per command: wall and CPU milliseconds of ``runs`` runs, interleaved (the
    machine's load moves them alike)."""
    times: dict[str, tuple[list[float], list[float]]] = {n: ([], []) for n in COMMANDS}
    for code in COMMANDS.values():  # warm-up: writes the .pyc files
        run_ms(code)
    for _ in range(runs):
        for name, code in COMMANDS.items():
            wall, cpu = run_ms(code)
            times[name][0].append(wall)
            times[name][1].append(cpu)
    return times


def instructions(code: str) -> int | None:
    if shutil.which("valgrind") is None:
        return None
    return callgrind.instructions([sys.executable, "-c", code], ENV)


def imported_modules(code: str) -> dict[str, int]:
    """Module -> self import time (us) of what ``code`` imports (-X importtime)."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code],
        env=ENV,
        capture_output=True,
        text=True,
        check=True,
    )
    found: dict[str, int] = {}
    for line in proc.stderr.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+\d+ \|(\s+)(\S+)", line)
        if m:
            found[m.group(3)] = int(m.group(1))
    return found


def per_limit_us(rounds: int = 7) -> float:
    import memprof_limits as ml

    ml.start()
    f = lambda: None  # noqa: E731
    timer = timeit.Timer(lambda: ml.limit_allocations(f, limit=10**6))
    n, _ = timer.autorange()
    return statistics.median(timer.repeat(rounds, n)) / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=21)
    args = parser.parse_args()
    v = sys.version_info
    print(f"### CPython {v.major}.{v.minor}\n")
    print(f"- `python benchmarks/bench_startup.py --runs {args.runs}`")
    print(f"- CPython {platform.python_version()}, {os.cpu_count()} CPUs")
    print(
        f"- wall and CPU (user + system) time: medians of {args.runs} interleaved runs "
        "(shared, noisy machine); instructions: one run each\n"
    )

    times = timings(args.runs)
    counts = {name: instructions(code) for name, code in COMMANDS.items()}
    bare_wall, bare_cpu = (statistics.median(t) for t in times["bare"])
    bare_ins = counts["bare"]
    print("| command | wall ms | over bare | CPU ms | over bare | instructions | over bare |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name in COMMANDS:
        wall, cpu = (statistics.median(t) for t in times[name])
        ins = counts[name]
        ins_text = "-" if ins is None else f"{ins / 1e6:.1f} M"
        over = "-" if ins is None or bare_ins is None else f"{(ins - bare_ins) / 1e6:+.1f} M"
        print(
            f"| `{name}` | {wall:.1f} | {wall - bare_wall:+.1f} | {cpu:.1f} | "
            f"{cpu - bare_cpu:+.1f} | {ins_text} | {over} |"
        )

    bare_mods = imported_modules("pass")
    ours = imported_modules(COMMANDS["import + start()"])
    extra = {m: t for m, t in ours.items() if m not in bare_mods}
    heaviest = sorted(extra.items(), key=lambda kv: -kv[1])[:12]
    print(f"\nModules loaded by `import + start()` beyond a bare interpreter: {len(extra)};")
    print(
        "the heaviest (self import time, one run): "
        + ", ".join(f"`{m}` {t / 1e3:.1f} ms" for m, t in heaviest)
    )

    us = per_limit_us()
    many = instructions(CALLS.format(n=2000))
    none = instructions(CALLS.format(n=0))
    per = "-" if many is None or none is None else f"{(many - none) / 2000 / 1e3:.1f} k"
    print(
        f"\nOne `limit_allocations(lambda: None, limit=10**6)`: {us:.1f} us (median of 7 "
        f"rounds), {per} instructions (callgrind, 2,000 calls minus none)."
    )


if __name__ == "__main__":
    main()
