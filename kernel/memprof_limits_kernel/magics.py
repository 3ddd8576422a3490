"""``%limits`` and ``%%limits``: the session's limits and per-cell overrides.

``%%limits`` must act *before* the cell runs (its limits are the cell's
task limits), so it is not executed like other cell magics: the kernel reads
the first line of the cell before running it (:func:`split_cell_limits`) and
the shell drops that line from the code it compiles.  The registered cell
magic only exists for help (``%%limits?``) and to refuse being called in
any other way.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell
from IPython.core.magic import Magics, line_cell_magic, magics_class

import memprof_limits as ml
from memprof_limits._defaults import DefaultMemoryLimit, is_default_memory
from memprof_limits._rollback import display_name

__all__ = ["LimitsMagics", "SessionSettings", "split_cell_limits"]

_CELL_LIMITS = re.compile(r"\A(?:[ \t]*\n)*[ \t]*%%limits(?:[ \t]+([^\n]*))?[ \t]*(?:\n|\Z)")


def split_cell_limits(code: str) -> tuple[str | None, str]:
    """``("allocations=10MB", body)`` for a cell starting with
    ``%%limits allocations=10MB``; ``(None, code)`` otherwise.

    >>> split_cell_limits("%%limits allocations=10MB\\nx = 1")
    ('allocations=10MB', 'x = 1')
    >>> split_cell_limits("x = 1")
    (None, 'x = 1')
    """
    m = _CELL_LIMITS.match(code)
    if m is None:
        return None, code
    return (m.group(1) or "").strip(), code[m.end() :]


@dataclass
class SessionSettings:
    """What ``%limits`` changes: the session's default cell limits and
    whether a one-line report follows each cell."""

    limits: ml.CellLimits = field(default_factory=ml.CellLimits)
    report: bool = False
    last: ml.CellOutcome | None = None
    #: The safe default memory limit the kernel started with (if it did).
    default: DefaultMemoryLimit | None = None

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
