"""Engine overhead in instructions (valgrind's callgrind): a figure the shared machine's load
does not move, to compare two builds of the library (before and after a change) or the modes
of one build.

For each mode of ``bench_overhead.py`` (``nohook``: engine stopped, ``idle``, ``budget``: an
allocation limit open, ``armed``: every limit kind open) and each workload, a child process
runs ``bench_overhead.run_in_mode(mode, workload)`` once under
``valgrind --tool=callgrind`` and reports the instructions it executed ("Collected"); a child
that sets the mode up the same way but runs nothing gives the start-up and set-up cost, which
is subtracted.  ``PYTHONHASHSEED=0`` and one warm-up run in the child make a run repeatable to
a few hundred instructions.  Ratios are to ``nohook`` of the same build; with ``--other SRC``
the same table is made for a second build of the library (its ``src`` directory, compiled in
place: ``python setup.py build_ext --inplace`` in a worktree), placed first on ``PYTHONPATH``,
and the ratio of the two builds is printed per mode.

What it does not see: kernel time (the ``armed`` mode reads ``/proc/self/statm`` at every
sample: its system-call cost is in ``bench_overhead.py``'s CPU times, not here) and the
watchdog thread's wake-ups are counted only as often as valgrind's slowed clock lets them
happen.

    python benchmarks/bench_instructions.py [--workloads a,b] [--other /tmp/base/src]
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import callgrind  # noqa: E402 - shared with bench_startup.py

MODES = ["nohook", "idle", "budget", "armed"]
DEFAULT_WORKLOADS = "list_of_tuples,dict_churn,richards_like,pidigits"

CHILD = """
import sys
sys.path.insert(0, {here!r})
from bench_overhead import run_in_mode
from workloads import WORKLOADS
mode, name = sys.argv[1], sys.argv[2]
fn = WORKLOADS[name] if name != "-" else (lambda: None)
run_in_mode(mode, fn)  # warm-up: specialisation, caches, arenas
run_in_mode(mode, fn)
"""


def instructions(src: Path | None, mode: str, workload: str) -> int:
    """Instructions of one child (start-up included), counted by callgrind."""
    env = dict(os.environ, PYTHONHASHSEED="0")
    if src is not None:
        env["PYTHONPATH"] = str(src) + os.pathsep + env.get("PYTHONPATH", "")
    argv = [sys.executable, "-c", CHILD.format(here=str(HERE)), mode, workload]
    return callgrind.instructions(argv, env)


def measure(src: Path | None, names: list[str]) -> dict[str, dict[str, int]]:
    """Per mode and workload: the workload's instructions (two runs, start-up subtracted)."""
    out: dict[str, dict[str, int]] = {}
    for mode in MODES:
        base = instructions(src, mode, "-")
        out[mode] = {w: instructions(src, mode, w) - base for w in names}
        print(f"  {mode}: done", file=sys.stderr, flush=True)
    return out


def geomean(xs: list[float]) -> float:
    return math.exp(sum(math.log(x) for x in xs) / len(xs))


def table(title: str, counts: dict[str, dict[str, int]], names: list[str]) -> None:
    print(f"#### {title}\n")
    print(
        "| workload | "
        + " | ".join(f"{m} Minstr" for m in MODES)
        + " | "
        + " | ".join(f"{m} / nohook" for m in MODES[1:])
        + " |"
    )
    print("|---|" + "---|" * (2 * len(MODES) - 1))
    for w in names:
        row = [f"{counts[m][w] / 1e6:.1f}" for m in MODES]
        row += [f"{counts[m][w] / counts['nohook'][w]:.4f}" for m in MODES[1:]]
        print(f"| {w} | " + " | ".join(row) + " |")
    gm = [
        f"**{geomean([counts[m][w] / counts['nohook'][w] for w in names]):.4f}**" for m in MODES[1:]
    ]
    print("| **geomean** | " + " | ".join([""] * len(MODES) + gm) + " |\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", default=DEFAULT_WORKLOADS)
    parser.add_argument("--other", type=Path, help="src directory of a second build to compare")
    parser.add_argument("--other-label", default="other build")
    args = parser.parse_args()
    names = args.workloads.split(",")
    print(f"### CPython {platform.python_version()}\n")
    print(f"- command: `python benchmarks/bench_instructions.py {' '.join(sys.argv[1:])}`")
    print("- instructions counted by valgrind's callgrind (user space), start-up subtracted\n")
    current = measure(None, names)
    table("This build", current, names)
    if args.other is not None:
        other = measure(args.other, names)
        table(f"{args.other_label} (`{args.other}`)", other, names)
        print(f"#### This build / {args.other_label}, per mode (geomean over workloads)\n")
        print("| mode | instructions ratio |")
        print("|---|---|")
        for m in MODES:
            r = geomean([current[m][w] / other[m][w] for w in names])
            print(f"| {m} | {r:.4f} |")
        print()


if __name__ == "__main__":
    main()
