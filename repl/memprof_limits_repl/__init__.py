"""memprof_limits_repl: a terminal Python REPL in which every input is a
limited task (``memprof-limits``, or ``python -m memprof_limits_repl``).

Each cell runs under the session's memory and allocation limits with the
same :class:`memprof_limits.CellRunner` as the Jupyter kernel: a cell that
reaches a limit, or that Ctrl+C interrupts (also in ``time.sleep``), is
stopped and its changes to the namespace are rolled back.
``memprof-limits run SCRIPT`` runs a script as one limited task, with an
exit status that names the limit.  See ``docs/repl.md``.

>>> from memprof_limits_repl import Session
>>> import memprof_limits as ml
>>> session = Session(limits=ml.CellLimits(allocations=10**7))
>>> session.run_cell("x = 6 * 7; x")
42
CellReport(status='ok', ...)
"""

from __future__ import annotations

from ._cli import default_history_file as default_history_file
from ._cli import main as main
from ._client import ServeClient as ServeClient
from ._client import ServeError as ServeError
from ._client import StepReply as StepReply
from ._errors import EXIT_ALLOCATIONS as EXIT_ALLOCATIONS
from ._errors import EXIT_EXCEPTION as EXIT_EXCEPTION
from ._errors import EXIT_INTERRUPTED as EXIT_INTERRUPTED
from ._errors import EXIT_MEMORY as EXIT_MEMORY
from ._errors import EXIT_OK as EXIT_OK
from ._errors import EXIT_USAGE as EXIT_USAGE
from ._run import RunOptions as RunOptions
from ._run import parse_run_args as parse_run_args
from ._run import run as run
from ._session import COMMANDS as COMMANDS
from ._session import CellReport as CellReport
from ._session import Session as Session
from ._source import check_complete as check_complete
from ._source import iter_cells as iter_cells

__all__ = [
    "COMMANDS",
    "EXIT_ALLOCATIONS",
    "EXIT_EXCEPTION",
    "EXIT_INTERRUPTED",
    "EXIT_MEMORY",
    "EXIT_OK",
    "EXIT_USAGE",
    "CellReport",
    "RunOptions",
    "ServeClient",
    "ServeError",
    "Session",
    "StepReply",
    "check_complete",
    "default_history_file",
    "iter_cells",
    "main",
    "parse_run_args",
    "run",
]
