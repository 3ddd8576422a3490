"""``memprof-limits serve`` (issue 14): what a step, an env and a branch cost.

Every figure is measured from the client (``memprof_limits_repl.ServeClient``:
request written -> reply read), median of ``--rounds`` requests, on one server:

1. a trivial step (``1``) from the empty state (a fork of the root process),
   and from an env with a small state;
2. the memory of an env: the *private* memory (``Private_Clean +
   Private_Dirty`` of ``/proc/PID/smaps_rollup``: what the env alone holds,
   the rest is shared copy-on-write) of an env after a trivial step;
3. branching from an env with a 1 GiB state -- (a) 1 GiB of bytes, (b) about
   1 GiB of Python objects (8 million small lists, tracked by the collector):
   the step's time (the fork copies the page tables) and the new env's
   private memory;
4. ``discard`` of the 1 GiB env: the time, and the memory (PSS) of all the
   server's processes before the env was built, with it, and after the
   discard (the memory really goes back to the system);
5. what the farms do instead on a timeout (kill and respawn): a new
   ``python -c "import memprof_limits"`` process, start to exit.

No published per-command figures of the Lean REPL were found (its users
report kill-and-respawn on timeouts, whose cost is dominated by re-importing
Mathlib): row 5 is the Python analogue.

    python benchmarks/bench_serve.py [--rounds 50]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

from memprof_limits_repl import ServeClient


def median_ms(fn: Callable[[], object], rounds: int) -> float:
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def step_ms(server: ServeClient, env: int | None, rounds: int) -> float:
    """Median time of a trivial step on ``env``; each env it makes is
    discarded after the timing (it would keep the state's pages)."""
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        reply = server.run("1", env=env)
        times.append(time.perf_counter() - t0)
        assert reply.env is not None and reply.env != env, reply
        server.discard(reply.env)
    return statistics.median(times) * 1000


def private_mib(pid: int) -> float:
    total = 0
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith(("Private_Clean:", "Private_Dirty:")):
                total += int(line.split()[1])
    return total / 1024


def tree_pss_mib(root: int) -> float:
    """The proportional set size of ``root`` and every process under it
    (the server is a subreaper: every env is under it)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(") ", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    total = 0
    for pid in parents:
        p = pid
        while p not in (0, 1, root) and p in parents:
            p = parents[p]
        if p == root:
            try:
                with open(f"/proc/{pid}/smaps_rollup") as f:
                    total += sum(int(line.split()[1]) for line in f if line.startswith("Pss:"))
            except OSError:
                pass
    return total / 1024


def env_pid(server: ServeClient, env: int) -> int:
    """The pid of ``env``'s process, from a step that fails (and so leaves
    no env behind to share its pages)."""
    reply = server.run("import os as _o; print(_o.getppid()); raise SystemExit", env=env)
    assert reply.status == "error", reply
    return int(reply.stdout)


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def run_ok(server: ServeClient, code: str, env: int | None = None) -> int:
    reply = server.run(code, env=env)
    assert reply.ok, reply
    assert reply.env is not None
    return reply.env


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=50)
    rounds = p.parse_args().rounds
    rows: list[tuple[str, str]] = []
    with ServeClient(timeout_s=600, memory="off") as server:
        small = run_ok(server, "xs = list(range(1000))\nd = {i: str(i) for i in range(1000)}")
        step_ms(server, None, 5)  # warm-up
        rows.append(
            ("trivial step from the empty state", f"{step_ms(server, None, rounds):.2f} ms")
        )
        rows.append(("trivial step from a small env", f"{step_ms(server, small, rounds):.2f} ms"))
        fresh = run_ok(server, "1", env=small)
        rows.append(
            (
                "private memory of a new env (small state)",
                f"{private_mib(env_pid(server, fresh)):.2f} MiB",
            )
        )
        for label, build in (
            ("1 GiB of bytes", "blob = bytearray(b'x' * 2**30)"),
            ("~1 GiB of objects (8M lists)", "objs = [[i] for i in range(8 * 10**6)]"),
        ):
            before = tree_pss_mib(server.process.pid)
            t0 = time.perf_counter()
            big = run_ok(server, build)
            build_s = time.perf_counter() - t0
            big_pid = env_pid(server, big)
            big_rss, big_private = rss_mib(big_pid), private_mib(big_pid)
            branch_ms = step_ms(server, big, max(5, rounds // 5))
            child = run_ok(server, "y = 1", env=big)
            child_pid = env_pid(server, child)
            child_rss, child_private = rss_mib(child_pid), private_mib(child_pid)
            rows.append(
                (
                    f"{label}: building the env (one step)",
                    f"{build_s:.2f} s; RSS {big_rss:.0f} MiB, private {big_private:.0f} MiB",
                )
            )
            rows.append((f"{label}: trivial step branching from it", f"{branch_ms:.2f} ms"))
            rows.append(
                (
                    f"{label}: memory of the branch",
                    f"RSS {child_rss:.0f} MiB, private {child_private:.2f} MiB",
                )
            )
            server.discard(child)
            after_build = tree_pss_mib(server.process.pid)
            t0 = time.perf_counter()
            server.discard(big)
            discard_ms = (time.perf_counter() - t0) * 1000
            after = tree_pss_mib(server.process.pid)
            rows.append(
                (
                    f"{label}: discard",
                    f"{discard_ms:.1f} ms; memory of the server's processes (PSS) {before:.0f} "
                    f"-> {after_build:.0f} -> {after:.0f} MiB",
                )
            )
    respawn = median_ms(
        lambda: subprocess.run([sys.executable, "-c", "import memprof_limits"], check=True),
        max(5, rounds // 5),
    )
    rows.append(
        ("kill and respawn instead: new `python -c 'import memprof_limits'`", f"{respawn:.1f} ms")
    )
    print(f"CPython {platform.python_version()}, {rounds} rounds (medians)\n")
    print("| what | figure |\n|---|---|")
    for what, figure in rows:
        print(f"| {what} | {figure} |")


if __name__ == "__main__":
    main()
