"""``%limits`` and ``%%limits``: the session's limits and per-cell overrides;
``%%count_allocations``: how much a cell allocates; ``%undo``: back to the
state before the last cell.

``%%limits`` and ``%%count_allocations`` must act *before* the cell runs
(they decide the cell's task limits, and how many times it runs), so they
are not executed like other cell magics: the kernel reads the cell's first
lines before running it (:func:`split_cell_headers`) and the shell drops
them from the code it compiles.  ``%undo`` must act before the cell's own
checkpoint is taken, so the kernel recognises a cell that is only ``%undo``
(:func:`cell_kind`), undoes, and the magic prints what was undone.  The
registered magics only exist for help (``%%limits?``) and to refuse being
called in any other way.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell
from IPython.core.magic import Magics, cell_magic, line_cell_magic, line_magic, magics_class

import memprof_limits as ml
from memprof_limits._cells import split_cell_headers
from memprof_limits._defaults import DefaultMemoryLimit, is_default_memory
from memprof_limits._rollback import display_name

__all__ = [
    "LimitsMagics",
    "SessionSettings",
    "cell_kind",
    "misplaced_undo",
    "split_cell_headers",
    "split_cell_limits",
]

_LIMITS_LINE = re.compile(r"%limits(?:\s|\Z)")
_UNDO_LINE = re.compile(r"%undo(?:\s|\Z)")


def split_cell_limits(code: str) -> tuple[str | None, str]:
    """``("allocations=10MB", body)`` for a cell whose header lines
    (:func:`split_cell_headers`) include ``%%limits allocations=10MB``;
    ``(None, code)`` otherwise.

    >>> split_cell_limits("%%limits allocations=10MB\\nx = 1")
    ('allocations=10MB', 'x = 1')
    >>> split_cell_limits("x = 1")
    (None, 'x = 1')
    """
    headers, body = split_cell_headers(code)
    if "limits" not in headers:
        return None, code
    return headers["limits"], body


def cell_kind(code: str) -> Literal["undo", "settings"] | None:
    """``"undo"`` for a cell that is ``%undo`` alone, ``"settings"`` for one
    made of ``%limits`` lines only (blank and comment lines aside): cells
    that :meth:`memprof_limits.CellRunner.undo` does not count as "the last
    cell".  ``None`` for any other cell.

    >>> cell_kind("# back\\n%undo\\n"), cell_kind("%limits report"), cell_kind("%undo\\nx")
    ('undo', 'settings', None)
    """
    lines = _code_lines(code)
    if lines == ["%undo"]:
        return "undo"
    if lines and all(_LIMITS_LINE.match(line) for line in lines):
        return "settings"
    return None


def misplaced_undo(code: str) -> bool:
    """Whether ``code`` has a ``%undo`` line among other code (refused before
    anything of the cell runs).

    >>> misplaced_undo("x = 1\\n%undo"), misplaced_undo("%undo"), misplaced_undo("%undo 2")
    (True, False, False)
    """
    lines = _code_lines(code)
    return len(lines) > 1 and any(_UNDO_LINE.match(line) for line in lines)


def _code_lines(code: str) -> list[str]:
    """The lines of ``code`` that are not blank or comments, stripped."""
    lines = [line.strip() for line in code.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


@dataclass
class SessionSettings:
    """What ``%limits`` changes: the session's default cell limits and
    whether a one-line report follows each cell."""

    limits: ml.CellLimits = field(default_factory=ml.CellLimits)
    report: bool = False
    last: ml.CellOutcome | None = None
    #: The safe default memory limit the kernel started with (if it did).
    default: DefaultMemoryLimit | None = None
    #: What the kernel undid before a ``%undo`` cell, for the magic to show.
    pending_undo: ml.UndoReport | None = None

    def cell_limits(self, code: str) -> ml.CellLimits:
        """The limits of a cell: the session's, overridden by a leading
        ``%%limits`` line (a bad one is reported when the cell runs)."""
        spec, _body = split_cell_limits(code)
        if spec is None or not spec:
            return self.limits
        try:
            return ml.CellLimits.parse(spec, self.limits)
        except Exception:  # ValueError (or anything): the shell reports it
            return self.limits

    def describe_limits(self) -> str:
        """``memory=18.8 GiB (the default: 80% of ...)``: the limits, and
        where the memory limit comes from when it is the default."""
        text = self.limits.describe()
        if self.default is not None and is_default_memory(self.limits, self.default):
            text += (
                f" (the default memory limit: {self.default.describe()}; "
                "%limits memory=off removes it)"
            )
        return text

    def describe(self) -> str:
        lines = [
            f"session limits: {self.describe_limits()}",
            f"report after each cell: {'on' if self.report else 'off'}",
        ]
        if self.last is not None:
            lines.append(f"last cell: {self.last.summary()}")
        return "\n".join(lines)


_USAGE = """\
%limits                                   show the session's limits
%limits memory=2GiB allocations=500MB     set them (either or both; 'off' for one)
%limits off                               remove both
%limits report [on|off]                   a one-line summary after each cell
%%limits allocations=10MB                 (first line of a cell) limits for that cell only"""

UNDO_ALONE = "%undo must be alone in its cell (the kernel undoes before the cell runs)"

_COUNT_USAGE = """\
%%count_allocations        (first line of a cell) run it without an allocation limit and report
                           what it allocated, against the current limit, and a limit to paste
%%count_allocations 5      run it 5 times (1 to 100) from the same state: min, max, spread"""


@magics_class
class FuelMagics(Magics):
    """``%%count_allocations`` and ``%undo``: handled by the kernel before
    the cell runs (see the module's docstring); these refuse any other use
    and carry the help."""

    def __init__(self, shell: InteractiveShell, settings: SessionSettings) -> None:
        super().__init__(shell)
        self.settings = settings

    @cell_magic
    def count_allocations(self, line: str, cell: str) -> None:
        """How much a cell allocates (Lean's ``#count_heartbeats in``).

        Usage, as the first line of a cell (after ``%%limits``, or before)::

          %%count_allocations        run the cell once without an allocation limit
          %%count_allocations 5      run it 5 times (1 to 100) from the same state

        Prints the bytes allocated (each run's; with several runs, the
        smallest, the largest and their spread: 0 when the count is
        deterministic), the allocation limit in force, and a suggested limit
        as a line to paste at the top of the cell: ``%%limits
        allocations=50MB`` -- 2 x the largest count, rounded up to 1, 2 or 5
        x 10^k bytes.  The memory limit still applies.  Runs but the last are
        rolled back (names and ``Guarded`` values), so the state afterwards
        is that after one run; the cell's output appears once per run.  A
        run that is interrupted or raises stops the count and is reported as
        a cell is.
        """
        raise UsageError(
            "%%count_allocations must be the first line of a cell run by the memprof-limits "
            f"kernel (it runs that cell before the cell's code does)\n{_COUNT_USAGE}"
        )

    @line_magic
    def undo(self, line: str) -> None:
        """Restore the state before the last cell: the names it added,
        rebound or deleted, and the ``Guarded`` values it changed.

        Usage: ``%undo``, alone in its cell.

        One level: a second ``%undo`` has nothing to undo.  After an
        interrupted cell there is nothing to undo either (it was rolled back
        already).  Objects changed in place (``data.append(x)`` on a list
        that is not ``Guarded``) stay changed, as with any rollback.
        ``%limits`` cells do not count as "the last cell".
        """
        report, self.settings.pending_undo = self.settings.pending_undo, None
        if line.strip():
            raise UsageError("%undo takes no argument: it undoes the last cell, once")
        if report is None:
            raise UsageError(UNDO_ALONE)
        print(report.describe())


@magics_class
class LimitsMagics(Magics):
    """``%limits`` / ``%%limits`` (see :data:`_USAGE`)."""

    def __init__(self, shell: InteractiveShell, settings: SessionSettings) -> None:
        super().__init__(shell)
        self.settings = settings

    @line_cell_magic
    def limits(self, line: str, cell: str | None = None) -> None:
        """Limits of the cells of this kernel.

        Usage::

          %limits                                   show the session's limits
          %limits memory=2GiB allocations=500MB     set them ('off' for one of them)
          %limits off                               remove both
          %limits report [on|off]                   one-line summary after each cell
          %%limits allocations=10MB                 first line of a cell: that cell only

        ``memory`` is the process's resident memory (the global memory
        limit); ``allocations`` counts every byte the cell allocates (a
        deterministic measure of work).  Sizes as humans write them: 2GiB,
        500MB, 10_000_000.  A cell that reaches a limit is interrupted and
        its changes to the namespace are rolled back.
        """
        if cell is not None:
            raise UsageError(
                "%%limits must be the first line of a cell run by the memprof-limits kernel "
                "(it sets that cell's limits before the cell runs)"
            )
        words = line.split()
        settings = self.settings
        if not words:
            print(settings.describe())
            return
        if words[0] == "report":
            if len(words) > 2 or (len(words) == 2 and words[1] not in ("on", "off")):
                raise UsageError(f"%limits report: expected 'on' or 'off'\n{_USAGE}")
            settings.report = len(words) == 1 or words[1] == "on"
            print(f"report after each cell: {'on' if settings.report else 'off'}")
            return
        try:
            settings.limits = ml.CellLimits.parse(line, settings.limits)
        except Exception as e:  # ValueError; anything else is reported the same
            raise UsageError(f"%limits: {display_name(e)}\n{_USAGE}") from None
        print(f"session limits: {settings.describe_limits()}")
