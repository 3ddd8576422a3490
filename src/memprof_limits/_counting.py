"""How much a cell allocates: the core of ``%%count_allocations`` (Lean's
``#count_heartbeats in``), shared by the Jupyter kernel and the REPL.

An :class:`AllocationCounter` runs one cell body ``runs`` times, each run a
cell of the :class:`CellRunner` (its checkpoint, its rollback, its token),
from the same state:

- **without an allocation limit** -- the cell's memory limit stays, so a
  counted cell still cannot take the process down;
- **every run but the last is discarded** (:meth:`Cell.discard`: rolled back
  to its checkpoint, as an interrupted cell is), so each run starts from the
  state the cell started from and, whatever happens, the state afterwards is
  the state after *one* run: the last one made.  (Rolling everything back and
  running once more would give the same state for one more run.)  As for any
  rollback, only bindings and :class:`Guarded` values are restored: an object
  changed in place that is not ``Guarded`` is changed by every run;
- **a full garbage collection before each run** (outside any task, after the
  output of the last run is flushed, so that the streams' buffers start empty
  too): it empties
  CPython's free lists, which otherwise serve small objects without calling
  the allocator, and resets the collector's counters, so every run starts
  from the same allocator state -- without it the first run, which finds the
  free lists as earlier cells left them, often differs from the others;
- a run that is interrupted (a memory limit, Ctrl+C, the kernel's ■) or that
  raises stops the count; the front end reports it like a normal cell (an
  interrupted run is rolled back, a run that raised keeps what it did).  An
  interrupt that arrives *between* two runs interrupts the next one
  (:meth:`CellRunner.interrupt`).

The :class:`AllocationCount` it returns gives the count of each run, their
spread (0 when the count is deterministic), the allocation limit in force and
a suggested one, as a line to paste: ``%%limits allocations=50MB``.

**The suggested limit** is the smallest 1, 2 or 5 x 10^k bytes (k >= 3: 1kB,
2kB, 5kB, 10kB, ... 50MB, 100MB, 200MB, ...) that is at least twice the
largest count.  Twice, because a budget set at the measured count breaks at
the first unrelated change (another Python version, a library that allocates
a little more, slightly different input: Lean's documentation asks the same,
"resist the temptation to set the limit as low as possible"); rounded to
1-2-5, because it is written by hand and read by people.  The suggestion is
between 2 and 5 times the count.  (Lean doubles its default, 200000
heartbeats, until the count fits: a margin of 0 to 2 times, and numbers such
as 6400000 that are not easy to read.)
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from ._cells import Cell, CellLimits, CellOutcome, CellRunner
from ._exceptions import Reason
from ._units import MAX_BYTES

__all__ = ["MAX_RUNS", "AllocationCount", "AllocationCounter"]

#: The most runs a count may make (``%%count_allocations 100``): each run
#: takes as long as the cell, and a hundred show any spread there is.
MAX_RUNS = 100

_RUNS_HELP = f"expected a number of runs from 1 to {MAX_RUNS} (no number: 1)"
_DECIMAL_UNITS = ((10**12, "TB"), (10**9, "GB"), (10**6, "MB"), (10**3, "kB"))
_RULE = "2 x the largest count, rounded up to 1, 2 or 5 x 10^k bytes"
_RULE_ONE = "2 x the count, rounded up to 1, 2 or 5 x 10^k bytes"


def _flush_output() -> None:
    """Flush ``sys.stdout`` and ``sys.stderr`` (a failure is the stream's
    business: the run will meet it again)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except Exception:
            pass


def _decimal(n: int) -> str:
    """``12.3 MB``: a size in the decimal units of the suggestion."""
    for unit, name in _DECIMAL_UNITS:
        if n >= unit:
            value = n / unit
            digits = 2 if value < 9.995 else 1 if value < 99.95 else 0
            return f"{value:.{digits}f} {name}"
    return f"{n} B"


def _limit_text(n: int) -> str:
    """``50MB`` for 50_000_000: a 1-2-5 size as users type it (``5000TB``
    above a TB; digits when nothing shorter is exact)."""
    for unit, name in _DECIMAL_UNITS:
        if n >= unit and n % unit == 0:
            return f"{n // unit}{name}"
    return str(n)


@dataclass(frozen=True)
class AllocationCount:
    """What :class:`AllocationCounter` measured.

    ``allocated_bytes`` holds the count of each run that ended normally, in
    order; ``limits`` are the cell's limits (their ``allocations`` is the
    limit the cell would run with, removed for the count).  A count that
    stopped early says how in ``stopped`` (``"error"``: a run raised;
    ``"interrupted"``: a run was interrupted, for ``reason``) and suggests
    nothing.

    >>> count = AllocationCount(runs=3, allocated_bytes=(12_345_678,) * 3)
    >>> count.spread, count.suggested, count.line
    (0, 50000000, '%%limits allocations=50MB')
    >>> print(count.describe())
    allocated 12345678 bytes (12.3 MB) in each of 3 runs from the same state (spread 0)
    no allocation limit is set
    suggested limit (2 x the largest count, rounded up to 1, 2 or 5 x 10^k bytes):
    %%limits allocations=50MB
    """

    runs: int
    allocated_bytes: tuple[int, ...]
    limits: CellLimits = field(default_factory=CellLimits)
    stopped: Literal["error", "interrupted"] | None = None
    reason: Reason | None = None

    @property
    def complete(self) -> bool:
        """Whether every run was made and ended normally."""
        return self.stopped is None and len(self.allocated_bytes) == self.runs

    @property
    def minimum(self) -> int:
        """The smallest count (0 if no run ended normally)."""
        return min(self.allocated_bytes, default=0)

    @property
    def maximum(self) -> int:
        """The largest count (0 if no run ended normally)."""
        return max(self.allocated_bytes, default=0)

    @property
    def spread(self) -> int:
        """``maximum - minimum``: 0 when every run allocated the same."""
        return self.maximum - self.minimum

    @property
    def limit(self) -> int | None:
        """The allocation limit the cell would run with (``None``: none)."""
        return self.limits.allocations

    @staticmethod
    def suggest(allocated: int) -> int:
        """The limit suggested for a cell that allocates ``allocated``
        bytes: the smallest 1, 2 or 5 x 10^k bytes (k >= 3) that is at least
        twice it -- a margin for what changes the count without changing the
        cell (another Python version, a library, the data), in a number easy
        to read and to type; between 2 and 5 times the count.

        >>> AllocationCount.suggest(12_345_678), AllocationCount.suggest(25_000_000)
        (50000000, 50000000)
        >>> AllocationCount.suggest(25_000_001), AllocationCount.suggest(0)
        (100000000, 1000)
        """
        target = max(2 * allocated, 1000)
        scale = 1000
        while True:
            for step in (1, 2, 5):
                if step * scale >= target:
                    return min(step * scale, MAX_BYTES)
            if scale > MAX_BYTES:
                return MAX_BYTES
            scale *= 10

    @property
    def suggested(self) -> int | None:
        """:meth:`suggest` of the largest count, for a complete count."""
        return self.suggest(self.maximum) if self.complete else None

    @property
    def line(self) -> str | None:
        """The line to paste at the top of the cell: ``%%limits
        allocations=50MB`` (for a complete count)."""
        suggested = self.suggested
        return None if suggested is None else f"%%limits allocations={_limit_text(suggested)}"

    def describe(self) -> str:
        """A few lines: the counts and their spread, the limit in force and
        the suggested one (the last line, to paste), or why the count
        stopped."""
        counts = self.allocated_bytes
        if not self.complete:
            made = len(counts) + 1
            how = (
                f"was interrupted ({self.reason or 'token'})"
                if self.stopped == "interrupted"
                else "raised an exception"
            )
            line = f"count stopped: run {made} of {self.runs} {how}; no suggested limit"
            if counts:
                line += f" (before it: {self._range()})"
            return line
        lines = [self._counts_line(), self._limit_line()]
        lines.append(f"suggested limit ({_RULE if len(counts) > 1 else _RULE_ONE}):")
        lines.append(self.line or "")
        return "\n".join(lines)

    def _range(self) -> str:
        if self.spread == 0:
            n = len(self.allocated_bytes)
            each = " each" if n > 1 else ""
            return f"{self.minimum} bytes ({_decimal(self.minimum)}){each}"
        return f"{self.minimum} to {self.maximum} bytes ({_decimal(self.maximum)})"

    def _counts_line(self) -> str:
        n = len(self.allocated_bytes)
        if n == 1:
            return f"allocated {self._range()}"
        if self.spread == 0:
            return (
                f"allocated {self.minimum} bytes ({_decimal(self.minimum)}) in each of {n} runs "
                "from the same state (spread 0)"
            )
        share = 100 * self.spread / self.maximum if self.maximum else 0.0
        return (
            f"allocated {self._range()} in {n} runs from the same state "
            f"(spread {self.spread} bytes, {share:.2g}%)"
        )

    def _limit_line(self) -> str:
        limit = self.limit
        if limit is None:
            return "no allocation limit is set"
        text = self.limits.allocations_text or f"{limit} bytes"
        if self.maximum > limit:
            return (
                f"the allocation limit is {text}: the count is over it "
                "(the cell is interrupted at that limit)"
            )
        share = 100 * self.maximum / limit if limit else 0.0
        return f"the allocation limit is {text}: the count is {share:.2g}% of it"

    def metadata(self) -> dict[str, Any]:
        """JSON-able figures (the kernel's reply metadata)."""
        return {
            "runs": self.runs,
            "allocated_bytes": list(self.allocated_bytes),
            "min": self.minimum,
            "max": self.maximum,
            "spread": self.spread,
            "limit": self.limit,
            "suggested": self.suggested,
            "line": self.line,
            "stopped": self.stopped,
            "reason": self.reason,
        }


class AllocationCounter:
    """Runs one cell body ``runs`` times from the same state, without an
    allocation limit, and reports what each run allocated
    (:class:`AllocationCount`): ``%%count_allocations`` of the kernel and the
    REPL (``docs/kernel.md``).

    A front end makes the runs, each as a cell of ``runner``, until
    :attr:`finished`; a front end that handles the user's exceptions itself
    (IPython) calls :meth:`raised` in a run that raised.  Each run is a cell
    of the runner with the allocation limit removed (the memory limit stays),
    started after a full garbage collection (the same allocator state for
    every run); every run but the last is discarded (:meth:`Cell.discard`),
    so the state afterwards is that after one run -- for names and
    ``Guarded`` values: an object changed in place is changed by every run.
    A run that is interrupted or raises stops the count; it is kept or rolled
    back as any cell is.  An interrupt between two runs interrupts the next
    (:meth:`CellRunner.interrupt`).

    Args:
        runner: the cell runner (its namespace and tracked ``Guarded``
            values are rolled back between runs).
        runs: how many runs, 1 to :data:`MAX_RUNS`; more than one needs
            ``runner.rollback``.
        limits: the cell's limits (default: the runner's); the memory limit
            applies to every run, the allocation limit to none (it is the
            "current limit" of the report).
        collect: run a full garbage collection before each run.

    >>> import memprof_limits as ml
    >>> ns = {"x": 0}
    >>> runner = ml.CellRunner(ns, limits=ml.CellLimits(allocations="100kB"))
    >>> code = compile("x = x + 1; y = [str(i) for i in range(5000)]", "<cell>", "exec")
    >>> counter = ml.AllocationCounter(runner, runs=5)
    >>> while not counter.finished:
    ...     with counter.run() as cell:
    ...         _ = cell.run(lambda: exec(code, ns))
    >>> count = counter.report
    >>> ns["x"], len(count.allocated_bytes)  # the state after one run
    (1, 5)
    >>> count.maximum > count.limit  # the cell would be interrupted at 100kB
    True
    >>> count.line
    '%%limits allocations=2MB'
    """

    def __init__(
        self,
        runner: CellRunner,
        runs: int = 1,
        limits: CellLimits | None = None,
        *,
        collect: bool = True,
    ) -> None:
        if isinstance(runs, bool) or not isinstance(runs, int):
            raise TypeError(f"AllocationCounter: runs: {_RUNS_HELP}, got {type(runs).__name__}")
        if not 1 <= runs <= MAX_RUNS:
            raise ValueError(f"AllocationCounter: runs: {_RUNS_HELP}, got {runs}")
        if runs > 1 and not runner.rollback:
            raise ValueError(
                f"cannot make {runs} runs from the same state with rollback off (the runs are "
                "rolled back between them): turn rollback on, or count one run"
            )
        self.runner = runner
        self.runs = runs
        self.limits = limits or runner.limits
        self.collect = collect
        self._run_limits = replace(self.limits, allocations=None, allocations_text=None)
        self._allocated: list[int] = []
        self._stopped: Literal["error", "interrupted"] | None = None
        self._reason: Reason | None = None
        self._raised = False
        #: Set by CellRunner.interrupt() (any thread): the next run is interrupted.
        self._interrupt_requested = False

    @staticmethod
    def parse_runs(text: str) -> int:
        """The number of runs of a ``%%count_allocations [N]`` line: ``""``
        is 1; anything but 1 to :data:`MAX_RUNS` is a ``ValueError`` that
        says what is expected.

        >>> AllocationCounter.parse_runs(" 5 "), AllocationCounter.parse_runs("")
        (5, 1)
        >>> AllocationCounter.parse_runs("0")
        Traceback (most recent call last):
        ValueError: expected a number of runs from 1 to 100 (no number: 1), got '0'
        """
        text = text.strip()
        if not text:
            return 1
        shown = text if len(text) <= 40 else text[:37] + "..."
        if re.fullmatch(r"[0-9]{1,9}", text) is None or not 1 <= int(text) <= MAX_RUNS:
            raise ValueError(f"{_RUNS_HELP}, got {shown!r}")
        return int(text)

    @property
    def finished(self) -> bool:
        """Every run was made, or one stopped the count."""
        return self._stopped is not None or len(self._allocated) >= self.runs

    @property
    def last_run(self) -> bool:
        """Whether the next run (or the one being made) is the last one."""
        return len(self._allocated) + 1 >= self.runs

    @property
    def run_number(self) -> int:
        """The number of the next run (or of the one being made), from 1."""
        return len(self._allocated) + 1

    def raised(self) -> None:
        """The run being made raised an exception that the front end handled
        (IPython shows it): the count stops after this run, which is kept,
        as a cell that raises is.  (An exception that propagates out of
        :meth:`run` is noticed without this.)"""
        self._raised = True

    @contextmanager
    def run(self) -> Iterator[Cell]:
        """Make the next run: ``with counter.run() as cell:`` run the body in
        ``cell`` as the front end runs a cell.  Every run but the last is
        discarded when it ends normally."""
        if self.finished:
            raise RuntimeError("AllocationCounter: every run was made already (see .report)")
        runner = self.runner
        runner._counter = self
        self._raised = False
        cell: Cell | None = None
        try:
            # Outside any task, before each run: what the last run printed is
            # written out (the streams' buffers start empty), and a full
            # collection -- the same allocator state for every run.
            _flush_output()
            with runner.cell(self._run_limits, collect=self.collect) as cell:
                if self._interrupt_requested:
                    cell.token.set()  # interrupted between two runs: this run is
                try:
                    yield cell
                except BaseException:
                    self._raised = True
                    raise
                finally:
                    if not (self.last_run or self._raised or cell.outcome.interrupted):
                        cell.discard()  # the next run starts from the same state
        finally:
            self._record(cell)
            if self.finished and runner._counter is self:
                runner._counter = None

    def close(self) -> None:
        """Stop counting (a front end that gives up before :attr:`finished`):
        an interrupt no longer waits for a next run.  Idempotent."""
        if self._stopped is None and len(self._allocated) < self.runs:
            self._stopped = "error"
        if self.runner._counter is self:
            self.runner._counter = None

    def _record(self, cell: Cell | None) -> None:
        outcome: CellOutcome | None = None if cell is None else cell.outcome
        if outcome is None:
            self._stopped = "error"  # the cell could not start
        elif outcome.interrupted:
            self._stopped, self._reason = "interrupted", outcome.reason
        elif self._raised:
            self._stopped = "error"
        else:
            self._allocated.append(outcome.allocated_bytes)

    @property
    def report(self) -> AllocationCount:
        """What was measured so far (complete once :attr:`finished`)."""
        return AllocationCount(
            runs=self.runs,
            allocated_bytes=tuple(self._allocated),
            limits=self.limits,
            stopped=self._stopped,
            reason=self._reason,
        )
