"""The tutorial notebooks, written as code so that they can be reviewed.

    python notebooks/build.py                 # write them all, executed with our kernel
    python notebooks/build.py 02 05           # only these (prefixes of the names)
    python notebooks/build.py --no-execute    # sources only, no outputs

Every notebook is built here with ``nbformat`` and executed by ``nbclient``
with the memprof-limits kernel, installed into a temporary prefix (so the
committed outputs are real outputs of the kernel of this checkout).

Conventions that ``tests/notebooks`` relies on:

* every cell has a stable id (``01-seed-worker``...); the test finds its key
  outputs by id;
* a cell meant to be interrupted is tagged ``raises-exception`` (so nbclient
  accepts its error) and says which error in ``metadata.memprof_limits.expect``;
* a cell that the reader is meant to stop with the ■ button has
  ``metadata.memprof_limits.interrupt_after`` (seconds): nbclient waits that
  long, then sends the same ``interrupt_request`` as the button
  (``interrupt_on_timeout``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nbformat
from nbformat import NotebookNode

HERE = Path(__file__).resolve().parent
KERNEL_NAME = "memprof-limits"
KERNELSPEC = {
    "name": KERNEL_NAME,
    "display_name": "Python 3 (memprof-limits)",
    "language": "python",
}
CELL_TIMEOUT_S = 120
"""Longest a cell may take before it counts as hung (nbclient then interrupts it and,
unless the cell expects an interrupt, the execution fails)."""


# -- cells --------------------------------------------------------------------------------------


def _clean(text: str) -> str:
    return textwrap.dedent(text).strip("\n")


def md(text: str) -> NotebookNode:
    return nbformat.v4.new_markdown_cell(_clean(text))


def code(
    text: str,
    *,
    name: str | None = None,
    expect: str | None = None,
    interrupt_after: float | None = None,
) -> NotebookNode:
    """A code cell.  ``name``: its id (after the notebook's prefix); ``expect``:
    the ``ename`` of the error it must end with; ``interrupt_after``: seconds
    after which the reader (or nbclient) presses ■."""
    cell = nbformat.v4.new_code_cell(_clean(text))
    meta: dict[str, Any] = {}
    if expect is not None:
        cell.metadata["tags"] = ["raises-exception"]
        meta["expect"] = expect
    if interrupt_after is not None:
        meta["interrupt_after"] = interrupt_after
    if meta:
        cell.metadata["memprof_limits"] = meta
    if name is not None:
        cell.metadata["name"] = name
    return cell


def notebook(prefix: str, cells: list[NotebookNode]) -> NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = dict(KERNELSPEC)
    nb.metadata["language_info"] = {"name": "python"}
    for i, cell in enumerate(cells):
        name = cell.metadata.pop("name", None)
        cell["id"] = f"{prefix}-{name}" if name else f"{prefix}-{i:02d}"
    nb.cells = cells
    nbformat.validate(nb)
    return nb


# -- 01 -----------------------------------------------------------------------------------------


def nb01() -> NotebookNode:
    return notebook("01", [
        md("""
        # 1. Memory limits: a runaway cell is stopped, not killed

        This notebook runs on the **memprof-limits** kernel (*Python 3 (memprof-limits)*):
        an IPython kernel in which every cell is a *task* run under the session's limits.
        When a cell reaches a limit it is interrupted with an exception, its changes to
        the namespace are rolled back, and the kernel goes on.

        Some cells below are *meant* to be interrupted. Run the cells one at a time
        (Shift+Enter): with *Run All*, Jupyter stops at the first of them.
        """),
        md("""
        ## The limit

        The global memory limit watches the resident memory of the kernel process. To keep
        the example the same on any machine we set it 256 MiB above what the kernel uses now.
        """),
        code("""
        import os

        import memprof_limits as ml


        def rss():
            \"\"\"Resident memory of this kernel, in bytes: what the memory limit watches.\"\"\"
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


        start, pid = rss(), os.getpid()
        limit = start + 256 * 2**20
        print(f"resident memory now: {ml.format_bytes(start)}")
        print(f"memory limit:        {ml.format_bytes(limit)}")
        """, name="setup"),
        md("""
        `%limits` sets the limits of every following cell (`%%limits` on the first line of a
        cell sets them for that cell only). IPython expands `{limit}`.
        """),
        code("%limits memory={limit}", name="set-limit"),
        md("""
        ## The seed example: a worker that wants far more than the limit

        The worker below wants 64 GiB — think of a cache that is never bounded, or a join
        whose result explodes. Before running it, some state we care about:
        """),
        code("""
        status = "idle"
        results = "computed before"


        def worker(total=64 * 2**30):
            \"\"\"Allocates `total` bytes, 1 MiB at a time.\"\"\"
            chunks = []
            while len(chunks) * 2**20 < total:
                chunks.append(bytearray(2**20))
            return chunks
        """, name="state"),
        code("""
        status = "running the worker"
        results = worker()
        status = "done"
        """, name="seed-worker", expect="MemoryLimitExceeded"),
        md("""
        The cell was interrupted shortly after the kernel's resident memory crossed the
        limit: the check runs about every 80 kB that the cell allocates, so the overshoot
        is below 1.62 MiB except with probability 10⁻⁹ (notebook 5). The error line says why,
        what was rolled back (the cell had rebound `status`: it has its old value back) and
        how much memory was returned to the system.

        The session goes on, in the same process:
        """),
        code("""
        print("status:", status)
        print("results:", results)
        print("same kernel process:", os.getpid() == pid)
        now = rss()
        print(f"resident memory: {ml.format_bytes(now)} (limit {ml.format_bytes(limit)})")
        print("memory released:", "yes" if now < start + 64 * 2**20 else "no")
        """, name="after"),
        md("""
        ## The same in a program

        The kernel is a thin layer over the library. In a script, run the worker as a task
        under the global memory limit; `Error` says the limit was reached, and the memory the
        task held is freed when nothing refers to its frames any more.
        """),
        code("%limits off", name="limits-off"),
        code("""
        ml.set_global_memory_limit(rss() + 256 * 2**20)
        result = ml.limit_global_memory(worker)
        ml.set_global_memory_limit(None)

        match result:
            case ml.Ok(chunks):
                print(f"the worker finished with {len(chunks)} chunks")
            case ml.Error(exc):
                print(f"interrupted: {type(exc).__name__}: {exc}")

        # The exception's traceback holds the worker's frames, and so its chunks: drop it
        # (the kernel does the same for a cell: it rolls the namespace back).
        result = exc = None
        print(f"returned to the system: {ml.format_bytes(ml.release_memory())}")
        print("memory released:", "yes" if rss() < start + 64 * 2**20 else "no")
        """, name="library"),
        md("""
        ## Without limits (not run here)

        Run `worker()` in a stock Python kernel and nothing stops it:

        * Linux hands out memory until it runs out, then the **OOM killer** sends `SIGKILL`
          to the largest process — the kernel. No exception, no `finally`, nothing is saved.
          JupyterLab says *"The kernel appears to have died. It will restart automatically"*
          and every variable of the session is gone. In a container the same happens at the
          container's memory limit; with swap, the machine may first crawl for minutes.
        * `resource.setrlimit(RLIMIT_AS)` turns the failure into a `MemoryError`, raised in
          whichever thread allocates next — often not the culprit: the kernel's heartbeat, its
          output thread, a library's worker — and it counts address space, not memory.
        * Pressing ■ in time raises `KeyboardInterrupt` wherever the main thread happens to
          be, half-way through the kernel's own code as easily as yours, and the cell's
          partial changes stay.

        Here the limit is an ordinary exception in the cell that allocates, at a point where
        Python can handle it, and the namespace is as it was before the cell.
        """),
    ])  # fmt: skip


# -- 02 -----------------------------------------------------------------------------------------

PROVER = '''
"""A tiny prover for classical propositional logic (Wang's algorithm, the
sequent calculus G3).  Formulas are tuples: ("var", "p"), ("not", A),
("and", A, B), ("or", A, B), ("imp", A, B)."""

import re

TOKENS = re.compile(r"\\s*(->|[()~&|]|\\w+)")


def parse(text):
    """'(p -> q) & ~r' -> tuples.  -> binds weakest (to the right), then |, &, ~."""
    tokens, pos = TOKENS.findall(text), 0

    def peek():
        return tokens[pos] if pos < len(tokens) else None

    def take(expected=None):
        nonlocal pos
        tok = peek()
        if tok is None or expected not in (None, tok):
            raise SyntaxError(f"expected {expected or 'a formula'}, got {tok!r}")
        pos += 1
        return tok

    def implication():
        left = disjunction()
        if peek() == "->":
            take()
            return ("imp", left, implication())
        return left

    def disjunction():
        left = conjunction()
        while peek() == "|":
            take()
            left = ("or", left, conjunction())
        return left

    def conjunction():
        left = negation()
        while peek() == "&":
            take()
            left = ("and", left, negation())
        return left

    def negation():
        tok = take()
        if tok == "~":
            return ("not", negation())
        if tok == "(":
            inner = implication()
            take(")")
            return inner
        return ("var", tok)

    formula = implication()
    if peek() is not None:
        raise SyntaxError(f"unexpected {peek()!r}")
    return formula


def prove(left, right):
    """Size (number of sequents) of a proof of  left |- right,  or 0 if there is none.

    Takes the first compound formula, left side first, and applies its rule; one or
    two premises must then be proved.  All rules are invertible: no backtracking."""
    for i, f in enumerate(left):
        if f[0] == "var":
            continue
        rest = left[:i] + left[i + 1 :]
        if f[0] == "not":
            return premises((rest, right + (f[1],)))
        if f[0] == "and":
            return premises((rest + (f[1], f[2]), right))
        if f[0] == "or":
            return premises((rest + (f[1],), right), (rest + (f[2],), right))
        return premises((rest, right + (f[1],)), (rest + (f[2],), right))  # imp
    for i, f in enumerate(right):
        if f[0] == "var":
            continue
        rest = right[:i] + right[i + 1 :]
        if f[0] == "not":
            return premises((left + (f[1],), rest))
        if f[0] == "and":
            return premises((left, rest + (f[1],)), (left, rest + (f[2],)))
        if f[0] == "or":
            return premises((left, rest + (f[1], f[2])))
        return premises((left + (f[1],), rest + (f[2],)))  # imp
    return 1 if any(a in right for a in left) else 0  # an axiom: p, ... |- p, ...


def premises(*sequents):
    size = 1
    for left, right in sequents:
        n = prove(left, right)
        if n == 0:
            return 0
        size += n
    return size


def prove_formula(text):
    """Size of a proof of the formula, or 0 if it is not a tautology."""
    return prove((), (parse(text),))


def chain(n):
    """(p0 -> p1) -> (p1 -> p2) -> ... -> (p[n-1] -> pn) -> p0 -> pn: true, and its
    proof doubles in size with each link."""
    links = " -> ".join(f"(p{i} -> p{i + 1})" for i in range(n))
    return f"{links} -> p0 -> p{n}"
'''


def nb02() -> NotebookNode:
    return notebook("02", [
        md("""
        # 2. Allocation limits: deterministic step budgets

        A proof assistant gives every proof step a budget, and a step that runs out of it
        fails. If the budget is wall-clock time, a step that passes on your laptop can fail on
        a busy CI machine, and nobody can reproduce it. Lean counts *heartbeats* instead —
        allocations, in thousands — and `maxHeartbeats` fails the same step at the same place
        on every machine.

        An **allocation limit** does that for Python: it counts every byte that a task
        requests from Python's allocators (frees are not subtracted: it is a measure of work)
        and interrupts the task when the count passes the limit. The count is exact — every
        byte is counted, none is estimated — so whether a step fits its budget does not
        depend on the machine, its load, or luck.
        """),
        md("""
        ## A small prover

        A tautology checker for propositional logic by Wang's algorithm: a proof of
        `left ⊢ right` decomposes the first compound formula until only variables are
        left, and then needs a variable on both sides.
        """),
        code(PROVER, name="prover"),
        code("""
        import memprof_limits as ml

        for text in ["((p -> q) -> p) -> p", "(p -> q) -> ~q -> ~p", "(p -> q) -> q -> p"]:
            size = prove_formula(text)
            print(f"{text:24}", f"proved, {size} sequents" if size else "not a tautology")
        """, name="try"),
        md("""
        ## Proof steps under a budget

        `%limits report on` prints, after every cell, the bytes it allocated (exactly) with
        its peak memory and time. Each of the next two cells is a proof step with a budget of
        10 MB of allocations (`%%limits` on its first line).
        """),
        code("%limits report on", name="report-on"),
        code("""
        %%limits allocations=10MB
        size12 = prove_formula(chain(12))
        size12
        """, name="step-12"),
        code("""
        %%limits allocations=10MB
        size14 = prove_formula(chain(14))
        size14
        """, name="step-14", expect="AllocationLimitExceeded"),
        md("""
        The second step needed more than its budget: it was interrupted when its count
        passed 10 000 000 bytes, and `size14` was never bound.

        Restart the kernel and run the notebook again (*Kernel → Restart Kernel and Run All
        Cells*): the first step succeeds and the second fails again, with the same counts —
        the kernel fixes `PYTHONHASHSEED`, and only the cell's own code counts. (Almost always
        to the byte; see below for what can move.) The test suite executes this notebook
        twice and compares them.
        """),
        code("""
        print("size12 =", size12)
        print("size14 bound:", "size14" in globals())
        """, name="after-steps"),
        md("""
        ## Counts against clocks

        The library form is `ml.limit_allocations(task, limit=...)`, which returns
        `Ok((value, allocated_bytes))` or `Error(exc)`. Run the same step five times, then
        five more while another thread keeps a core busy and competes for the interpreter:
        the times move, the counts do not. (One call first: the first call of a function pays
        one-off costs.)
        """),
        code("""
        import threading
        import time

        formula = parse(chain(12))
        stop = threading.Event()


        def step():
            return prove((), (formula,))


        def measure(runs=5):
            counts, times = [], []
            for _ in range(runs):
                t0 = time.perf_counter()
                result = ml.limit_allocations(step, limit="10 MB")
                times.append(time.perf_counter() - t0)
                size, allocated = result.value
                counts.append(allocated)
            return counts, times


        def busy_neighbour():
            while not stop.is_set():
                pass


        step()
        quiet_counts, quiet_times = measure()
        neighbour = threading.Thread(target=busy_neighbour)
        neighbour.start()
        busy_counts, busy_times = measure()
        stop.set()
        neighbour.join()

        for label, counts, times in [("quiet", quiet_counts, quiet_times),
                                     ("busy", busy_counts, busy_times)]:
            for c, t in zip(counts, times):
                print(f"{label:5}  {c:>9,} bytes  {t * 1000:6.1f} ms")


        def spread(values):
            return (max(values) - min(values)) / min(values)


        counts, times = quiet_counts + busy_counts, quiet_times + busy_times
        print(f"counts: {len(set(counts))} distinct, spread {spread(counts):.4%}")
        print(f"times:  spread {spread(times):.0%}")
        """, name="counts-vs-clocks"),
        md("""
        A wall-clock budget set from the quiet runs would have failed the busy ones. A budget
        in bytes fails or passes them all alike.

        Could a count move at all? The count is exact, but what a step *requests* can depend
        a little on the state of the process: CPython keeps free lists of recently freed
        small objects (tuples, floats...), and an object taken from a free list is not an
        allocation. Above, quiet or busy, the counts are identical; across processes and
        after an interrupted step, differences of a few objects are possible — bytes in
        millions — where the clock moves by tens of percent or more.

        ## The same step fails the same way every time

        Run the step that did not fit five times: five identical failures. The decision is
        exact (the step is interrupted if and only if it allocates more than its budget); the
        exception lands at the next point where Python checks for asynchronous exceptions,
        some kilobytes later, so give steps budgets with some margin rather than
        within 0.1 % of what they need.
        """),
        code("""
        formula14 = parse(chain(14))
        outcomes = []
        for _ in range(5):
            result = ml.limit_allocations(lambda: prove((), (formula14,)), limit="10 MB")
            outcomes.append(type(result.exc).__name__ if isinstance(result, ml.Error) else "Ok")
        print(outcomes)
        """, name="fails-alike"),
        md("""
        ## Calibrating a budget

        As with `maxHeartbeats`, measure a step once and give it a margin. Here the count of
        `chain(12)` (above) with 20 % on top is the budget of a new step:
        """),
        code("""
        budget = int(quiet_counts[0] * 1.2)
        print(f"budget: {budget:,} bytes")
        for n in (10, 12, 13):
            f = parse(chain(n))
            match ml.limit_allocations(lambda: prove((), (f,)), limit=budget):
                case ml.Ok((size, allocated)):
                    used = allocated / budget
                    print(f"chain({n}): proved, {size} sequents, {used:.0%} of the budget")
                case ml.Error(exc):
                    print(f"chain({n}): out of budget ({type(exc).__name__})")
        """, name="calibrate"),
        code("%limits report off"),
    ])  # fmt: skip


# -- 03 -----------------------------------------------------------------------------------------

FACTORING = """
import math
import random
import threading
import time

import memprof_limits as ml

N = 1_000_000_007 * 1_000_000_000_039   # two primes


def trial_division_up(n):
    d = 3
    while n % d:
        d += 2
    return d


def trial_division_down(n):
    d = math.isqrt(n) | 1
    while n % d:
        d -= 2
    return d


def fermat(n):
    a = math.isqrt(n) + 1
    while True:
        b = math.isqrt(a * a - n)
        if b * b == a * a - n:
            return a - b
        a += 1


def pollard_rho(n):
    x = y = 2
    d = 1
    while d == 1:
        x = (x * x + 1) % n
        y = (y * y + 1) % n
        y = (y * y + 1) % n
        d = math.gcd(x - y, n)
    return d


def random_probe(n):
    rng = random.Random(0)
    while True:
        d = math.gcd(rng.randrange(2, n), n)
        if d > 1:
            return d


STRATEGIES = [trial_division_up, trial_division_down, fermat, pollard_rho, random_probe]
"""


def nb03() -> NotebookNode:
    return notebook("03", [
        md("""
        # 3. Cancellation tokens

        A `Token` is a flag that can be set once, from anywhere: another thread, a signal
        handler, a user interface. `ml.limit_with_token(task, token=token)` runs `task` and
        interrupts it once the token is set — also when the task never allocates, and, on
        the main thread, when it is blocked in `time.sleep` or a socket read.
        """),
        md("""
        ## Five threads racing

        Five strategies try to factor the same number, each in its own thread; the first
        one to finish sets the token, which stops the four others. Most of them would run
        for hours.
        """),
        code(FACTORING, name="strategies"),
        code("""
        token = ml.Token()
        finished = {}


        def solve(strategy):
            result = ml.limit_with_token(lambda: strategy(N), token=token)
            finished[strategy.__name__] = (result, time.perf_counter())
            if isinstance(result, ml.Ok):
                token.set()              # first past the post: stop the others


        threads = [threading.Thread(target=solve, args=(s,)) for s in STRATEGIES]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()

        for name, (result, end) in sorted(finished.items(), key=lambda item: item[1][1]):
            match result:
                case ml.Ok(factor):
                    print(f"{name:20} found {factor} after {end - start:.2f} s")
                case ml.Error(exc):
                    print(f"{name:20} {type(exc).__name__} after {end - start:.2f} s")
        winners = [n for n, (r, _) in finished.items() if isinstance(r, ml.Ok)]
        print(f"winner: {', '.join(winners)}; cancelled: {len(finished) - len(winners)}")
        """, name="race"),
        md("""
        Each thread runs its own task: a limit never interrupts another thread, and
        threads started by a task are not limited by it. A token that is already set when a
        task starts gives `Error` without running the task.

        ## Loops that never allocate, and blocking calls

        A token set from a timer thread stops a loop that never allocates (a watchdog
        re-delivers the interrupt every 10 ms) and, on the main thread, a blocked
        `time.sleep` (a real signal wakes the system call).
        """),
        code("""
        def spin():
            while True:
                pass


        for task in (spin, lambda: time.sleep(3600)):
            token = ml.Token()
            threading.Timer(0.2, token.set).start()
            t0 = time.perf_counter()
            result = ml.limit_with_token(task, token=token)
            print(f"{result}  after {time.perf_counter() - t0:.2f} s")
        """, name="timer"),
        md("""
        ## The ■ button is a token

        In this kernel, *Kernel → Interrupt* (■) does not raise `KeyboardInterrupt` wherever
        the main thread happens to be: it sets the running cell's token. The cell stops with
        an `Interrupted` error and its changes to the namespace are rolled back.

        Run the next three cells, and press ■ while the second one runs. (When the test
        suite executes this notebook, nbclient presses it after 2 seconds: its
        `interrupt_on_timeout` sends the same `interrupt_request` message as the button.
        Unattended, run it with `jupyter nbconvert --execute
        --ExecutePreprocessor.timeout=10 --ExecutePreprocessor.interrupt_on_timeout=True`.)
        """),
        code("counter = -1", name="counter"),
        code("""
        counter = 0
        while True:          # press ■
            counter += 1
        """, name="busy-loop", expect="Interrupted", interrupt_after=2),
        code("print(counter)", name="counter-after"),
        md("""
        The loop ran millions of times, but `counter` is back to its value from before the
        cell. A cell blocked in a system call is interrupted at once too:
        """),
        code("""
        napping = True
        time.sleep(3600)     # press ■
        """, name="sleep", expect="Interrupted", interrupt_after=2),
        code('print("napping" in globals())', name="sleep-after"),
        md("""
        ## Ctrl+C in a program

        `ml.sigint_sets(token)` makes Ctrl+C (SIGINT) set a token for the duration of a
        `with` block, instead of raising `KeyboardInterrupt` at a random place:

        ```python
        token = ml.Token()
        with ml.sigint_sets(token):
            result = ml.limit_with_token(long_computation, token=token)
        ```

        The terminal REPL (`memprof-limits`) does this for every input.
        """),
    ])  # fmt: skip


# -- 04 -----------------------------------------------------------------------------------------


def nb04() -> NotebookNode:
    return notebook("04", [
        md("""
        # 4. Interrupt safety: resources, masking, poisoning and rollback

        An interrupt is an exception that can arrive between any two steps of a task. The
        library gives the task the means to stay consistent, following the three rules of
        OCaml's memprof-limits: *do not rely on the returned exception; re-raise promptly;
        isolate state* (see `docs/recovering.md`).
        """),
        md("""
        ## `with_resource`: release if and only if acquired

        `ml.with_resource(acquire, arg, scope, release)` runs `acquire(arg)` and
        `release(r)` **masked** — no interrupt is delivered inside them — and runs `release`
        if and only if `acquire` returned, whatever happens in `scope`.
        """),
        code("""
        import threading

        import memprof_limits as ml

        pool = ["conn-1", "conn-2"]   # a tiny connection pool
        log = []


        def acquire(pool):
            conn = pool.pop()
            log.append(f"acquire {conn}")
            return conn


        def release(conn):
            pool.append(conn)
            log.append(f"release {conn}")


        def runaway_query(conn):
            rows = []
            while True:
                rows.append(f"{conn}: row {len(rows)}")


        result = ml.limit_allocations(
            lambda: ml.with_resource(acquire, pool, runaway_query, release), limit="5 MB"
        )
        print(result)
        print("log:", log)
        print("pool:", sorted(pool))
        """, name="with-resource"),
        md("""
        ## `protect`: any context manager, interrupt-safe

        An interrupt lands at the next point where Python checks for one -- which can be the
        first instruction of cleanup code. Below, a journal that writes its entries when its
        `with` block ends; the block's last statement runs past the budget and has no such
        point of its own, so the interrupt lands at the start of `__exit__`: unprotected, the
        cleanup never happens; under `ml.protect` its `__enter__` and `__exit__` run masked,
        and the interrupt is delivered after them. (While a task *handles* its interrupt --
        in an `except` or `finally`, or an `__exit__` the interrupt is leaving -- the same
        cause is not raised again: it comes back once swallowed.)
        """),
        code("""
        class Journal:
            \"\"\"Writes its entries when the block ends: cleanup that takes some work.\"\"\"

            def __init__(self):
                self.entries = []
                self.closed = False

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                for i in range(200_000):
                    self.entries.append(f"entry {i}")
                self.closed = True
                return False


        def task(cm):
            with cm:
                block = "x" * 6_000_000  # past the 5 MB budget, as the block ends


        for label, wrap in [("unprotected", lambda j: j), ("protected", ml.protect)]:
            journal = Journal()
            result = ml.limit_allocations(lambda: task(wrap(journal)), limit="5 MB")
            print(f"{label:11}  {type(result.exc).__name__}, closed={journal.closed}, "
                  f"entries written: {len(journal.entries)} of 200000")
        """, name="protect"),
        md("""
        `ml.protect(lock)` is the way to hold a `threading.Lock` in a task: with a bare
        `with lock:` an interrupt can land between the lock's `__enter__` returning and the
        block starting, and the lock stays held forever.
        """),
        code("""
        lock = threading.Lock()


        def hold_and_work():
            with ml.protect(lock):
                keep = []
                while True:
                    keep.append("x" * 100)


        print(ml.limit_allocations(hold_and_work, limit="1 MB"))
        print("lock held afterwards:", lock.locked())
        """, name="protect-lock"),
        md("""
        ## `SafeMutex` and Sisyphus

        Some state cannot be repaired by releasing a lock: an interrupt in the middle of an
        update leaves it half-made. A `SafeMutex` is **poisoned** when an interrupt arrives
        while it is held; the next `with mutex:` raises `PoisonedError` instead of showing
        the half-made state (as Rust's `Mutex`). Someone repairs the state, then calls
        `clear_poison()`.

        Sisyphus pushes his boulder up the hill. Every push is first written in the log,
        then the boulder moves up one step. Near the top Zeus intervenes — he sets a token —
        and Sisyphus is interrupted between the two halves of a push.
        """),
        code("""
        class Hill:
            \"\"\"The height of the boulder must equal the number of pushes in the log.\"\"\"

            def __init__(self):
                self.height = 0
                self.log = []

            def consistent(self):
                return self.height == len(self.log)


        hill, mutex = Hill(), ml.SafeMutex()


        def move_up(hill):
            hill.height += 1


        def sisyphus(zeus, top=10):
            while True:
                with mutex:
                    hill.log.append(f"push {len(hill.log) + 1}")   # write the push down ...
                    if len(hill.log) == top:
                        zeus.set()                                 # (Zeus intervenes)
                    move_up(hill)                                  # ... then push


        zeus = ml.Token()
        print(ml.limit_with_token(lambda: sisyphus(zeus), token=zeus))
        print(f"height {hill.height}, pushes logged {len(hill.log)}, "
              f"consistent: {hill.consistent()}, mutex poisoned: {mutex.poisoned}")
        """, name="sisyphus"),
        code("""
        try:
            with mutex:
                print("height", hill.height)
        except ml.PoisonedError as e:
            print(f"PoisonedError: {e}")
        """, name="poisoned"),
        md("""
        The boulder rolls back down: repair the state, clear the poison, and Sisyphus starts
        again.
        """),
        code("""
        hill.height = 0
        hill.log.clear()
        mutex.clear_poison()
        zeus = ml.Token()
        print(ml.limit_with_token(lambda: sisyphus(zeus, top=5), token=zeus))
        print(f"height {hill.height}, pushes logged {len(hill.log)}, "
              f"mutex poisoned: {mutex.poisoned}")
        """, name="sisyphus-again"),
        md("""
        ... and near the top, Zeus intervenes again: that is the myth.

        (`ml.is_interrupted()` is what `SafeMutex` uses: it is true from the moment an
        interrupt is raised in a task until the task ends, so a `release` function can tell
        that it runs because of an interrupt, and poison or roll back.)

        ## Rollback of the namespace, and of a `Guarded` value

        When a cell of this kernel is interrupted, the *bindings* of the namespace are
        restored: names the cell added are removed, rebound names get their old value back,
        deleted names come back. Objects changed in place are not copied — that would cost
        a copy of everything before every cell. A value that must come back whole is wrapped
        in `ml.Guarded`: the kernel checkpoints every `Guarded` value before each cell (a
        shallow copy; `snapshot=`/`restore=` for deeper state) and rolls it back too.
        """),
        code("""
        a = "original"
        c = "to be deleted"
        shopping = ["bread"]                      # a plain list
        cart = ml.Guarded(["bread"], name="cart")  # a guarded one
        """, name="rollback-setup"),
        code("""
        %%limits allocations=1MB
        a = "changed"
        b = "added"
        del c
        shopping.append("chocolate")
        cart.value.append("chocolate")
        receipt = [f"line {i}" for i in range(10**6)]   # runs out of budget
        """, name="rollback", expect="AllocationLimitExceeded"),
        code("""
        print("a =", a)
        print("b bound:", "b" in globals())
        print("c =", c)
        print("shopping =", shopping, "(changed in place: not rolled back)")
        print("cart =", cart.value)
        """, name="rollback-after"),
        md("""
        Outside the kernel, `Guarded.transaction()` does the same around any block: on an
        interrupt the value goes back to the checkpoint taken when the block started.
        """),
        code("""
        accounts = ml.Guarded({"alice": 100, "bob": 0}, name="accounts")


        def transfer(amount):
            with accounts.transaction():
                accounts.value["alice"] -= amount
                audit = [f"moved {amount}" for _ in range(10**5)]   # a slow audit ...
                accounts.value["bob"] += amount


        for budget in ("1 MB", "100 MB"):
            result = ml.limit_allocations(lambda: transfer(30), limit=budget)
            print(f"budget {budget:>6}: {type(result).__name__:5} -> {accounts.value}")
        """, name="transaction"),
    ])  # fmt: skip


# -- 05 -----------------------------------------------------------------------------------------


def nb05() -> NotebookNode:
    return notebook("05", [
        md("""
        # 5. The statistics behind the limits

        The native sampler counts every byte a thread allocates, and cuts the stream of bytes
        into gaps of random, geometrically distributed length (mean `1 / rate`, 80 kB by
        default); at the end of each gap it takes a *sample*. Allocation limits do not depend
        on samples (they are exact), but the global memory limit is checked at samples, and
        the profiler of notebook 6 records them. `memprof_limits.stats` has the formulas;
        `docs/statistical.md` derives them.

        The plots need matplotlib (`pip install matplotlib`); without it the notebook prints
        tables instead.
        """),
        code("""
        import math

        import memprof_limits as ml
        from memprof_limits import stats

        try:
            import matplotlib.pyplot as plt
        except ImportError:
            plt = None

        KiB, MiB = 2**10, 2**20
        rate = ml.sampling_rate()
        print(f"sampling rate: 1/{1 / rate:,.0f} per byte, a sample every {1 / rate / 1000:.0f} kB")
        """, name="setup"),
        md("""
        ## How far past the global limit can a task get?

        Once the process is over its limit, the task is interrupted at its next sample.
        Gaps are memoryless, so the probability that it is still running after `n` more bytes
        is `exp(-n · rate)`: the figures of OCaml's memprof-limits, for the same rate.
        """),
        code("""
        for n in (80 * KiB, 1.62 * MiB, 2.5 * MiB, 8.8 * MiB):
            print(f"P[not interrupted after {n / MiB:6.2f} MiB] = "
                  f"{stats.p_not_interrupted(n):.2g}")
        for target in (1e-9, 1e-14, 1e-50):
            n = stats.bytes_until_probability(target)
            print(f"P < {target:.0e} after {n / MiB:.2f} MiB")

        if plt is not None:
            xs = [i * 10 * MiB / 400 for i in range(401)]
            fig, ax = plt.subplots(figsize=(7, 3.5), layout="constrained")
            ax.semilogy([x / MiB for x in xs], stats.p_not_interrupted(xs), label="exp(-n · rate)")
            for n in (1.62 * MiB, 2.5 * MiB, 8.8 * MiB):
                ax.plot([n / MiB], [stats.p_not_interrupted(n)], "o", color="tab:red")
            ax.set_xlabel("bytes allocated after the limit was crossed (MiB)")
            ax.set_ylabel("P[not yet interrupted]")
            ax.set_ylim(1e-60, 2)
            ax.grid(True, alpha=0.4)
            ax.legend()
            plt.show()
        """, name="latency"),
        md("""
        ## Safe allocation: sampled limits against exact ones

        OCaml's memprof-limits counts allocations by samples too: a limit of `l` bytes is
        reached after `k = l · rate` samples, which may come early. The *safe allocation*
        `N` is how much a task can allocate while the probability of being interrupted stays
        below a target `t`. Our allocation limits are exact: `N = l`.
        """),
        code("""
        limits = [k / rate for k in (20, 50, 100, 1000, 10_000)]
        print(f"{'limit l':>10}  {'N (t=1e-9)':>11}  {'N (t=1e-50)':>11}  exact")
        for limit in limits:
            n9 = stats.safe_allocation(limit, 1e-9)
            n50 = stats.safe_allocation(limit, 1e-50)
            print(f"{ml.format_bytes(int(limit)):>10}  {ml.format_bytes(n9):>11}  "
                  f"{ml.format_bytes(n50):>11}  {ml.format_bytes(int(limit))}")

        if plt is not None:
            ks = sorted({max(1, round(10 ** (i / 8))) for i in range(8, 6 * 8 + 1)})
            ls = [k / rate for k in ks]
            fig, ax = plt.subplots(figsize=(7, 3.8), layout="constrained")
            ax.loglog(ls, ls, "k:", label="exact (this library): N = l")
            for t in (1e-9, 1e-50):
                points = [(lim, stats.safe_allocation(lim, t)) for lim in ls]
                points = [(lim, n) for lim, n in points if n > 0]
                ax.loglog(*zip(*points), label=f"sampled, t = {t:g}")
            ax.set_xlabel("limit l (bytes)")
            ax.set_ylabel("safe allocation N (bytes)")
            ax.grid(True, alpha=0.4)
            ax.legend()
            plt.show()
        """, name="safe-allocation"),
        md("""
        ## The real sampler against the model

        `record_samples(n)` (an internal hook of the sampler, used by its tests) records the
        byte positions of this thread's next samples. Allocate 400 MB in small pieces, then
        compare the gaps between samples with the geometric distribution, and the distance
        from arbitrary points to the next sample with `exp(-n · rate)` — the quantity the
        global limit depends on.
        """),
        code("""
        import random

        from memprof_limits import _sampler

        done = _sampler.record_samples(10_000)
        for _ in range(400_000):
            bytes(1000)
        positions = done()
        gaps = [b - a for a, b in zip(positions, positions[1:])]


        def ks_distance(values, survival):
            \"\"\"Kolmogorov-Smirnov distance between a sample and a distribution.\"\"\"
            values = sorted(values)
            return max(max(abs(1 - survival(v) - (i + 1) / len(values)),
                           abs(1 - survival(v) - i / len(values)))
                       for i, v in enumerate(values))


        def geometric_survival(k):       # P[gap > k], gaps of at least 1 byte
            return math.exp(-rate * k)


        rng = random.Random(1)
        starts = sorted(rng.randrange(positions[0], positions[-1]) for _ in range(5000))
        distances, j = [], 0
        for s in starts:
            while positions[j] < s:
                j += 1
            distances.append(positions[j] - s)

        critical = 1.95 / math.sqrt(len(gaps))         # alpha = 0.001
        d_gaps = ks_distance(gaps, geometric_survival)
        d_dist = ks_distance(distances, geometric_survival)
        print(f"{len(gaps)} gaps, mean {sum(gaps) / len(gaps):,.0f} bytes (model: {1 / rate:,.0f})")
        print(f"KS distance of the gaps to the model: {d_gaps:.4f} "
              f"(critical value at alpha = 0.001: {critical:.4f})")
        print(f"KS distance of the distances to the next sample: {d_dist:.4f} "
              f"(critical value: {1.95 / math.sqrt(len(distances)):.4f})")

        if plt is not None:
            fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8), layout="constrained")
            ax1.hist([g / 1000 for g in gaps], bins=60, density=True, alpha=0.6,
                     label="gaps of the real sampler")
            xs = [i * 5 for i in range(121)]
            ax1.plot(xs, [rate * 1000 * math.exp(-rate * 1000 * x) for x in xs], "k-",
                     label="geometric model")
            ax1.set_xlabel("gap between samples (kB)")
            ax1.set_ylabel("density (per kB)")
            ax1.legend()
            dist = sorted(distances)
            ax2.semilogy([d / MiB for d in dist],
                         [1 - i / len(dist) for i in range(len(dist))], label="measured")
            ax2.semilogy([d / MiB for d in dist], stats.p_not_interrupted(dist), "k--",
                         label="exp(-n · rate)")
            ax2.set_xlabel("bytes from an arbitrary point to the next sample (MiB)")
            ax2.set_ylabel("P[no sample yet]")
            ax2.legend()
            for ax in (ax1, ax2):
                ax.grid(True, alpha=0.4)
            plt.show()
        else:
            for lo in range(0, 400_000, 40_000):
                share = sum(lo <= g < lo + 40_000 for g in gaps) / len(gaps)
                model = geometric_survival(lo) - geometric_survival(lo + 40_000)
                print(f"gap {lo:>7,}-{lo + 40_000:>7,} bytes: {share:6.3f}  (model {model:6.3f})")
        """, name="sampler"),
    ])  # fmt: skip


# -- 06 -----------------------------------------------------------------------------------------


def nb06() -> NotebookNode:
    return notebook("06", [
        md("""
        # 6. Profiling allocations with `%%memprof`

        `memprof_limits.memprof` is a statistical allocation profiler on the sampler of the
        limits: at each sample (a byte in every 80 kB on average, or more often while the
        profiler runs) it records the Python traceback of the allocation, and a snapshot
        scales the samples into estimates of the bytes each line or function allocated, with
        confidence intervals. Its interface is `tracemalloc`'s; its cost is a few percent,
        where `tracemalloc` multiplies the run time (`docs/memprof.md`).

        The charts need matplotlib; without it the notebook prints tables.
        """),
        code("""
        import memprof_limits as ml
        from memprof_limits import memprof

        try:
            import matplotlib.pyplot as plt
        except ImportError:
            plt = None
        """, name="setup"),
        md("""
        ## A realistic workload

        Generate a log of web requests as JSON lines, parse it, index it by endpoint and
        compute statistics per endpoint: four stages, each allocating in its own way.
        """),
        code('''
        import collections
        import json
        import random

        ENDPOINTS = ["/", "/login", "/search", "/api/items", "/api/items/{id}", "/static/app.js"]


        def make_log(n, rng):
            """n JSON lines, as a web server would write them."""
            return "\\n".join(
                json.dumps({
                    "ts": 1_700_000_000 + i,
                    "path": rng.choice(ENDPOINTS).replace("{id}", str(rng.randrange(10**4))),
                    "status": rng.choice([200, 200, 200, 200, 304, 404, 500]),
                    "ms": round(rng.lognormvariate(3, 1), 2),
                })
                for i in range(n)
            )


        def parse(text):
            return [json.loads(line) for line in text.splitlines()]


        def index(records):
            by_path = collections.defaultdict(list)
            for r in records:
                key = "/api/items/{id}" if r["path"].startswith("/api/items/") else r["path"]
                by_path[key].append(r)
            return by_path


        def summarize(by_path):
            out = {}
            for path, rs in by_path.items():
                times = sorted(r["ms"] for r in rs)
                out[path] = {
                    "requests": len(rs),
                    "errors": sum(r["status"] >= 500 for r in rs),
                    "p50": times[len(times) // 2],
                    "p99": times[int(len(times) * 0.99)],
                }
            return out


        STAGES = [make_log, parse, index, summarize]


        def workload(n=30_000, seed=42):
            rng = random.Random(seed)
            return summarize(index(parse(make_log(n, rng))))
        ''', name="workload"),
        md("""
        ## `%%memprof`

        `%%memprof` on the first line of a cell runs the cell under the profiler (here at one
        sample per 8 kB, the magic's default) and prints the lines of the cell that allocated
        most — with what the functions they call allocated — then the top allocation sites.
        """),
        code("""
        %%memprof -n 5
        summary = workload()
        """, name="memprof-cell"),
        code("""
        for path, s in sorted(summary.items()):
            print(f"{path:16} {s['requests']:5} requests  {s['errors']:4} errors  "
                  f"p50 {s['p50']:6.2f} ms  p99 {s['p99']:7.2f} ms")
        """, name="summary"),
        md("""
        ## Estimates against the exact count

        The profiler estimates; the allocation counter of the limits is exact. Run the
        workload under both: the profiler's estimate of the total and its 95 % confidence
        interval, against the exact count of `ml.limit_allocations`.
        """),
        code("""
        memprof.start(sampling_rate=1 / 8000)
        result = ml.limit_allocations(workload, limit="10 GB")
        snap = memprof.snapshot()
        memprof.stop()

        summary2, exact = result.value
        n = snap.n_samples
        estimate, low, high = snap.total_size(), *memprof.poisson_interval(n)
        low, high = low / snap.sampling_rate, high / snap.sampling_rate
        print(f"exact count:       {exact:>12,} bytes")
        print(f"profiler estimate: {estimate:>12,} bytes from {n} samples "
              f"(95% interval {low:,.0f} .. {high:,.0f})")
        print(f"relative error:    {abs(estimate - exact) / exact:.2%} "
              f"(expected about {1 / n ** 0.5:.2%})")
        print("same summary:", summary2 == summary)
        """, name="estimate"),
        md("""
        ## Where the bytes go, by stage

        Attribute each sample to the stage of the workload it happened in (the outermost
        frame of its traceback that belongs to one of the four stage functions), and scale:
        """),
        code("""
        stage_names = [f.__name__ for f in STAGES]
        by_stage = dict.fromkeys(stage_names, 0)
        for sample in snap.samples:
            names = [snap.function_name(frame) for frame in sample.traceback]
            stage = next((name for name in names if name in by_stage), None)
            if stage is not None:
                by_stage[stage] += sample.n_samples

        for stage, k in by_stage.items():
            lo, hi = memprof.poisson_interval(k)
            print(f"{stage:10} ~{ml.format_bytes(k / snap.sampling_rate):>10}  "
                  f"(95% {ml.format_bytes(lo / snap.sampling_rate)} .. "
                  f"{ml.format_bytes(hi / snap.sampling_rate)}, {k} samples)")
        biggest = max(by_stage, key=by_stage.get)
        print("biggest stage:", biggest)

        if plt is not None:
            MB = [by_stage[s] / snap.sampling_rate / 1e6 for s in stage_names]
            errors = [[], []]
            for s, mb in zip(stage_names, MB):
                lo, hi = memprof.poisson_interval(by_stage[s])
                errors[0].append(mb - lo / snap.sampling_rate / 1e6)
                errors[1].append(hi / snap.sampling_rate / 1e6 - mb)
            fig, ax = plt.subplots(figsize=(7, 2.8), layout="constrained")
            ax.barh(stage_names[::-1], MB[::-1], xerr=[e[::-1] for e in errors], capsize=3)
            ax.set_xlabel("estimated MB allocated (95 % intervals)")
            ax.grid(True, axis="x", alpha=0.4)
            plt.show()
        """, name="by-stage"),
        md("""
        ## A flame graph

        The same samples as stacks: each bar is a function, as wide as the bytes allocated
        in it and in what it called; the functions it called are stacked above it.
        `snap.to_collapsed(path)` writes the stacks in the format of `flamegraph.pl` and
        `snap.to_speedscope(path)` a profile for https://www.speedscope.app; here a small
        matplotlib drawing of the stacks below `workload`.
        """),
        code("""
        stacks = collections.Counter()
        for sample in snap.samples:
            names = [snap.function_name(frame) for frame in sample.traceback]
            if "workload" in names:
                path = tuple(names[names.index("workload"):])[:7]
                stacks[path] += sample.n_samples / snap.sampling_rate

        tree = collections.Counter()          # every prefix of every stack, with its bytes
        for path, size in stacks.items():
            for depth in range(1, len(path) + 1):
                tree[path[:depth]] += size
        print(f"{len(stacks)} distinct stacks; widest frames:")
        for path, size in sorted(tree.items(), key=lambda item: -item[1])[:6]:
            print(f"  {' > '.join(path):60} {ml.format_bytes(size):>10}")

        if plt is not None:
            fig, ax = plt.subplots(figsize=(11, 3.6), layout="constrained")
            total = tree[("workload",)]
            x_of = {(): 0.0}
            for path in sorted(tree):                      # parents before their children
                parent = path[:-1]
                x = x_of[parent]
                x_of[parent] += tree[path]
                x_of[path] = x
                width = tree[path] / total
                ax.barh(len(path) - 1, width, left=x / total, height=0.95,
                        color=plt.cm.Oranges(0.25 + 0.6 * (hash(path[-1]) % 97) / 97),
                        edgecolor="white")
                if width > 0.06:
                    ax.text(x / total + 0.004, len(path) - 1, path[-1][:int(width * 110)],
                            va="center", fontsize=8)
            ax.set_xlim(0, 1)
            ax.set_yticks([])
            ax.set_xlabel("share of the bytes allocated by workload()")
            plt.show()
        """, name="flame-graph"),
        md("""
        `make_log` and `parse` dominate: building a string per record, then a dict per line.
        A fix would stream the log instead of materializing it — and the profile would
        show it.

        ## Profiling under limits

        The profiler shares the sampler with the limits, so it can run inside a limited cell
        or task (only a sampling rate *lower* than the limits' is refused). A profiled task
        that runs out of budget is interrupted like any other:
        """),
        code("""
        memprof.start(sampling_rate=1 / 8000)
        result = ml.limit_allocations(lambda: workload(100_000), limit="50 MB")
        snap = memprof.snapshot()
        memprof.stop()
        print(type(result.exc).__name__, "after", ml.format_bytes(snap.total_size()),
              "(estimated by the profiler)")
        try:
            memprof.start(sampling_rate=1 / 10**6)
        except ValueError as e:
            print("ValueError:", e)
        """, name="under-limits"),
    ])  # fmt: skip


# -- 07 -----------------------------------------------------------------------------------------


def nb07() -> NotebookNode:
    return notebook("07", [
        md("""
        # 7. A proof farm on Dask

        When a batch of proof steps outgrows one process, run the steps on a
        [Dask](https://distributed.dask.org) cluster -- here a `LocalCluster` of two worker
        processes on this machine; the same code runs on many machines (at the end).

        Plain Dask has two problems for steps that may run away: a step that eats memory gets
        its whole worker process killed by the nanny (with every other task of that worker),
        and a running step cannot be stopped -- `future.cancel()` forgets its result, but the
        worker's thread runs it to the end. `memprof_limits.dask` runs each step as a limited
        task on its worker: a budget of allocations (deterministic fuel, as in notebook 2), the
        worker process's memory limit, a timeout, and cancellation.
        """),
        code(PROVER, name="prover"),
        md("""
        ## The cluster

        `LimitsPlugin()` is registered once: in every worker process (and in workers that join
        later) it starts the engine and sets a global memory limit below the nanny's kill
        threshold -- 90 % of the worker's memory limit. `PYTHONHASHSEED` is fixed in the
        workers so that the same step counts the same bytes in every one of them.
        """),
        code("""
        import logging, os
        from distributed import Client, LocalCluster
        import memprof_limits as ml
        from memprof_limits.dask import LimitsPlugin, limited

        cluster = LocalCluster(n_workers=2, threads_per_worker=1, memory_limit="1GB",
                               dashboard_address=":0", env={"PYTHONHASHSEED": "0"},
                               silence_logs=logging.CRITICAL)
        client = Client(cluster)
        client.register_plugin(LimitsPlugin())
        workers = {address: f"w{i}" for i, address in enumerate(sorted(client.run(os.getpid)))}
        for address, limit in sorted(client.run(ml.get_global_memory_limit).items()):
            print(workers[address], "memory limit", ml.format_bytes(limit))
        """, name="cluster"),
        md("""
        ## A batch of proof steps under a budget

        Each step proves `chain(n)` with a budget of 10 MB of allocations. `limited(...,
        report=True)` returns the value with a report: the exact bytes the step allocated and
        the worker it ran on. A step that runs out of fuel is an ordinary task error, raised
        by `future.result()` with the same report.
        """),
        code("""
        step = limited(prove_formula, allocations="10MB", report=True)
        futures = {n: client.submit(step, chain(n), pure=False) for n in range(8, 15)}
        for n, future in futures.items():
            try:
                size, report = future.result()
                print(f"chain({n}): proved, {size} sequents, "
                      f"{report.allocated_bytes} bytes on {workers[report.worker]}")
            except ml.AllocationLimitExceeded as e:
                print(f"chain({n}): out of fuel after {e.report.allocated_bytes} bytes "
                      f"on {workers[e.report.worker]}")
        """, name="batch"),
        md("""
        The same step counts the same bytes on either worker, to within a few objects: the
        worker's own threads (its event loop handles the scheduler's messages while a step
        runs) take small objects from CPython's free lists and give them back, and this prover
        makes millions of small tuples. Budgets need a margin of a few kilobytes, not of a
        factor (docs/dask.md, "Determinism"):
        """),
        code("""
        for address, name in workers.items():
            _, report = client.submit(step, chain(12), workers=[address], pure=False).result()
            print(name, report.allocated_bytes)
        """, name="same-on-both"),
        md("""
        ## A step that eats memory

        Without the plugin, the nanny would kill the worker process at 95 % of its memory
        limit. With it, the step is interrupted at 90 %, its memory is given back, and the
        worker process -- the same one -- takes the next step.
        """),
        code("""
        def blow_up():
            keep = []
            while True:
                keep.append(bytearray(10**7))

        pids = client.run(os.getpid)
        try:
            client.submit(limited(blow_up), pure=False).result()
        except ml.MemoryLimitExceeded as e:
            print(type(e).__name__, "on", workers[e.report.worker], "after",
                  ml.format_bytes(e.report.allocated_bytes), "of allocations")
        print("same worker processes:", client.run(os.getpid) == pids)
        """, name="hog"),
        md("""
        ## Steps that never end

        A step that loops without allocating is stopped by its `timeout`; a step that is
        cancelled (`future.cancel()`, or `client.cancel`) is interrupted on its worker, and
        the worker's only thread is free for the next step at once.
        """),
        code("""
        import time
        from distributed import Event

        def loop(started=None):
            if started:
                Event(started).set()
            while True:
                pass

        try:
            client.submit(limited(loop, timeout=1), pure=False).result()
        except ml.Cancelled as e:
            print(str(e).split(" (")[0])

        running = client.submit(limited(loop), "loop-started", pure=False)
        Event("loop-started").wait()
        start = time.monotonic()
        running.cancel()
        print("next steps:", client.gather(client.map(prove_formula, [chain(3)] * 4, pure=False)),
              f"{time.monotonic() - start:.1f} s after the cancel")
        """, name="runaway"),
        md("""
        ## On several machines

        Start a scheduler on one machine and workers on the others (one process per core, one
        thread each), then connect to the scheduler instead of making a `LocalCluster`:

        ```sh
        dask scheduler --port 8786
        dask worker tcp://SCHEDULER:8786 --nworkers 2 --nthreads 1 --memory-limit 4GB
        ```

        ```python
        client = Client("tcp://SCHEDULER:8786")
        client.register_plugin(LimitsPlugin())
        ```

        The workers need `memprof-limits[dask]` installed. More in docs/dask.md.
        """),
        code("""
        client.close()
        cluster.close()
        """, name="close"),
    ])  # fmt: skip


NOTEBOOKS: dict[str, Callable[[], NotebookNode]] = {
    "01-memory-limits": nb01,
    "02-allocation-limits": nb02,
    "03-cancellation": nb03,
    "04-interrupt-safety": nb04,
    "05-statistics": nb05,
    "06-profiling": nb06,
    "07-dask-proof-farm": nb07,
}


# -- executing ----------------------------------------------------------------------------------


@contextlib.contextmanager
def kernelspec(prefix: str | Path | None = None) -> Iterator[Path]:
    """Install the memprof-limits kernelspec (this interpreter) into ``prefix``
    (a temporary directory by default) and point ``JUPYTER_PATH`` at it for
    the duration of the block.  Yields the ``share/jupyter`` directory."""
    from memprof_limits_kernel.install import install

    with contextlib.ExitStack() as stack:
        if prefix is None:
            prefix = stack.enter_context(tempfile.TemporaryDirectory(prefix="mlk-nb-"))
        install(prefix=str(prefix), kernel_name=KERNEL_NAME)
        share = Path(prefix) / "share" / "jupyter"
        saved = {k: os.environ.get(k) for k in ("JUPYTER_PATH", "JUPYTER_PLATFORM_DIRS")}
        os.environ["JUPYTER_PATH"] = str(share)
        os.environ["JUPYTER_PLATFORM_DIRS"] = "1"
        try:
            yield share
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


@dataclass
class Execution:
    """An executed notebook, the ``execute_reply`` of each code cell by id,
    and the time it took."""

    nb: NotebookNode
    replies: dict[str, dict[str, Any]] = field(default_factory=dict)
    seconds: float = 0.0

    def cell(self, cell_id: str) -> NotebookNode:
        for cell in self.nb.cells:
            if cell.get("id") == cell_id:
                return cell
        raise KeyError(f"no cell {cell_id!r}")


def cell_timeout(cell: NotebookNode) -> float:
    return float(cell.metadata.get("memprof_limits", {}).get("interrupt_after", CELL_TIMEOUT_S))


def execute(nb: NotebookNode, *, cwd: str | Path = HERE, record_timing: bool = True) -> Execution:
    """Execute ``nb`` (in place) with the memprof-limits kernel, which must be
    installed where ``JUPYTER_PATH`` points (see :func:`kernelspec`).  Raises
    ``nbclient``'s ``CellExecutionError`` if a cell not tagged
    ``raises-exception`` fails, and ``CellTimeoutError``/``DeadKernelError``."""
    from nbclient import NotebookClient

    execution = Execution(nb)

    def on_cell_executed(cell: NotebookNode, cell_index: int, execute_reply: Any) -> None:
        execution.replies[cell["id"]] = execute_reply

    client = NotebookClient(
        nb,
        kernel_name=KERNEL_NAME,
        timeout_func=cell_timeout,
        interrupt_on_timeout=True,
        startup_timeout=60,
        record_timing=record_timing,
        on_cell_executed=on_cell_executed,
        resources={"metadata": {"path": str(cwd)}},
    )
    t0 = time.monotonic()
    client.execute()
    execution.seconds = time.monotonic() - t0
    return execution


def write(nb: NotebookNode, path: Path) -> None:
    nb.metadata.pop("widgets", None)
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
    nbformat.write(nb, str(path))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="notebooks to build (name prefixes; default all)")
    parser.add_argument("--no-execute", action="store_true", help="write the sources only")
    parser.add_argument(
        "--allow-missing-figures",
        action="store_true",
        help="execute without matplotlib (notebooks 05 and 06 then print tables)",
    )
    args = parser.parse_args(argv)
    names = [n for n in NOTEBOOKS if not args.names or any(n.startswith(p) for p in args.names)]
    if not names:
        parser.error(f"no notebook matches {args.names}; known: {', '.join(NOTEBOOKS)}")
    if not args.no_execute and not args.allow_missing_figures:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            parser.error(
                "the figures of notebooks 05 and 06 need matplotlib, which the kernel of this "
                "interpreter cannot import: python3 -m pip install matplotlib (or "
                "--allow-missing-figures to write them with tables instead)"
            )
    with contextlib.ExitStack() as stack:
        if not args.no_execute:
            stack.enter_context(kernelspec())
        for name in names:
            nb = NOTEBOOKS[name]()
            path = HERE / f"{name}.ipynb"
            if not args.no_execute:
                run = execute(nb, record_timing=False)
                print(f"{name}: executed in {run.seconds:.1f} s", file=sys.stderr)
            write(nb, path)
            print(f"wrote {path.relative_to(HERE.parent)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
