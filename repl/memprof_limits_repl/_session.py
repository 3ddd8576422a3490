"""A REPL session: one namespace, the shared cell runner, the ``%`` commands.

The problem
-----------
Each input of the terminal REPL must run exactly as a cell of the Jupyter
kernel does -- under the session's limits, as a task of
:class:`memprof_limits.CellRunner`, with the namespace rolled back when the
cell is interrupted -- and Ctrl+C must interrupt the cell, including a cell
blocked in ``time.sleep``, without a ``KeyboardInterrupt`` landing in the
REPL's own code.

What does not work, and why
---------------------------
- The default SIGINT handler: ``KeyboardInterrupt`` can land anywhere --
  in the middle of the rollback, in the prompt's bookkeeping, in the
  ``finally`` of the user's code -- and is not rolled back.
- Installing ``sigint_sets(cell.token)`` inside ``with runner.cell()``:
  a SIGINT that arrives between the two (after the prompt returned, before
  the handler is installed) raises ``KeyboardInterrupt`` in the REPL.
- Ignoring SIGINT between cells: Enter then Ctrl+C at once (a person in a
  hurry, a program driving the REPL through a pty) loses the Ctrl+C -- it
  comes before the cell starts -- and the cell runs to its end.

The solution
------------
For the whole session (:meth:`Session.sigint_to_cells`), SIGINT calls
:meth:`CellRunner.interrupt` through :class:`memprof_limits.sigint_sets`:
it sets the token of the running cell (the cell is interrupted at once,
also in ``time.sleep``, and rolled back).  With no cell running, it marks
the *next* cell to be interrupted as it starts; the front ends forget that
mark when they wait for input again (:meth:`Session.waiting_for_input`), so
a Ctrl+C after a cell never reaches the cell after the next prompt.
prompt-toolkit replaces the handler while it reads input (the terminal is
in raw mode: Ctrl+C is a key, and discards the input) and restores ours
afterwards; a Ctrl+C *key* typed after Enter, before the terminal left raw
mode, is found in the typeahead and also marks the next cell
(``_prompt._take_ctrl_c``).  Reading cells from a pipe is the one place
where SIGINT raises ``KeyboardInterrupt`` (the default handler is installed
around each ``readline`` only), so that Ctrl+C stops a scripted session
waiting for input.

Known failure cases
-------------------
- A cell inside a long C call that holds the GIL (``sum(range(10**10))``,
  a huge regex) is interrupted only when the call returns; Ctrl+\\ (SIGQUIT)
  kills the process.
- A cell's threads keep running after the cell is interrupted (threads
  started by a task are not limited by it), and their writes to the
  namespace are rolled back only if they happen before the rollback.

Where a cell ends, and bookkeeping failures (issue 12)
-----------------------------------------------------
The cell's task runs its statements and *formats* the value of a final
expression (``repr``: user code, limited); when it returns, the cell is
complete (``Cell.complete()``) and the value is printed outside the task.
A Ctrl+C that arrives while it is printed (or later) rolls nothing back, as
in the kernel.  Failures of the runner's own bookkeeping (a ``Guarded``
whose ``__snapshot__`` or ``__restore__`` raises, an unprintable namespace
key) are printed on stderr after the cell, or in its interrupt line; a bad
``%limits`` size, or any failure of a ``%`` command, is an error message and
the session goes on.

``%%count_allocations`` and ``%undo``
-------------------------------------
Both are the core's (:class:`memprof_limits.AllocationCounter`,
:meth:`memprof_limits.CellRunner.undo`), as in the kernel: a counted cell is
compiled once and run as the runs of a counter, each run exactly as a cell
runs (same Ctrl+C, same report of an interrupt or an exception); ``%undo`` is
a command, and commands are not cells (they do not become "the last cell").
"""

from __future__ import annotations

import builtins
import signal
import sys
import textwrap
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal, TextIO

import memprof_limits as ml
from memprof_limits._cells import split_cell_headers
from memprof_limits._defaults import DefaultMemoryLimit, is_default_memory
from memprof_limits._rollback import describe_exception, display_name

from ._errors import (
    EXIT_EXCEPTION,
    EXIT_OK,
    exit_status_for_reason,
    print_interrupt,
    print_user_exception,
    system_exit_status,
)
from ._source import (
    CellCompiler,
    CompiledCell,
    check_complete,
    execute_compiled,
    iter_cells,
    remember_source,
)

__all__ = ["COMMANDS", "PROMPT", "PROMPT_CONTINUATION", "CellReport", "Session"]

PROMPT = ">>> "
PROMPT_CONTINUATION = "... "

CellStatus = Literal["ok", "error", "interrupted", "command", "empty"]

COMMANDS: dict[str, str] = {
    "%limits": "%limits [memory=SIZE] [allocations=SIZE] | off   show or set the session limits",
    "%%limits": "%%limits SPEC   (first line of a cell) limits for this cell only",
    "%%count_allocations": "%%count_allocations [N]   (first line of a cell) run it N times"
    " (1-100, default 1) from the same state without an allocation limit; show what it"
    " allocated and a limit to paste",
    "%undo": "%undo   put the names and Guarded values back as they were before the last cell"
    " (once)",
    "%rollback": "%rollback [on|off]   show or set rollback of the namespace on interrupt",
    "%last": "%last   allocations, peak memory and time of the last cell",
    "%memprof": "%memprof [-n TOP] [-r RATE] [-f FRAMES] [--track] [--speedscope PATH]"
    " [--collapsed PATH] STATEMENT   run STATEMENT as a cell under the"
    " allocation profiler; show the TOP lines (10) that allocated most",
    "%help": "%help   this list",
}
"""The REPL's commands and their one-line help."""


@dataclass(frozen=True)
class CellReport:
    """What :meth:`Session.run_cell` did.

    ``status`` is ``"ok"``, ``"error"`` (an exception, shown as a
    traceback; also a bad command), ``"interrupted"`` (a limit or Ctrl+C:
    see ``outcome.reason``), ``"command"`` (a ``%`` command ran) or
    ``"empty"``.  ``outcome`` is the cell runner's :class:`CellOutcome`
    for a cell that ran.
    """

    status: CellStatus
    outcome: ml.CellOutcome | None = None
    exception: BaseException | None = None

    @property
    def exit_status(self) -> int:
        """The process exit status this cell stands for (``-c``): 0, 1 for
        an exception, 3 / 4 / 130 for allocations / memory / interrupted."""
        if self.status == "interrupted":
            return exit_status_for_reason(self.outcome.reason if self.outcome else None)
        if self.status == "error":
            return EXIT_EXCEPTION
        return EXIT_OK


class Session:
    """The state of a REPL: a ``__main__`` namespace run by a
    :class:`memprof_limits.CellRunner`.

    Args:
        limits: the session limits (``%limits`` changes them).
        rollback: roll the namespace back when a cell is interrupted.
        namespace: the namespace to use (default: a fresh ``__main__``).
        default: the safe default memory limit the session started with
            (``memprof_limits._defaults``), to say so where limits are shown.

    Output goes to ``sys.stdout`` and ``sys.stderr`` as they are when a cell
    runs.  The front ends (prompt, pipe, ``-c``) call :meth:`run_cell`
    inside :meth:`sigint_to_cells`.

    >>> s = Session(limits=ml.CellLimits(allocations=10**6))
    >>> s.run_cell("x = 1").status
    'ok'
    >>> s.run_cell("x = 2; y = [str(i) for i in range(10**6)]").outcome.reason
    'allocations'
    >>> s.namespace["x"]
    1
    """

    def __init__(
        self,
        *,
        limits: ml.CellLimits | None = None,
        rollback: bool = True,
        namespace: dict[str, Any] | None = None,
        default: DefaultMemoryLimit | None = None,
    ) -> None:
        self.default = default
        self.module: types.ModuleType | None = None
        if namespace is None:
            self.module = types.ModuleType("__main__")
            self.module.__dict__["__builtins__"] = builtins
            namespace = self.module.__dict__
        self.namespace: dict[str, Any] = namespace
        self.runner = ml.CellRunner(namespace, limits=limits, rollback=rollback)
        self.compiler = CellCompiler()
        self.cells_run = 0
        self.last_cell_number: int | None = None
        # A SIGINT that came when no cell was running: it is meant for the
        # cell about to start (Enter, then Ctrl+C at once).  Cleared when
        # the front end waits for input again.
        self._sigint_before_cell = False
        self._commands: dict[str, Callable[[str], CellStatus]] = {
            "limits": self._cmd_limits,
            "rollback": self._cmd_rollback,
            "last": self._cmd_last,
            "memprof": self._cmd_memprof,
            "undo": self._cmd_undo,
            "help": self._cmd_help,
        }

    # -- running cells -------------------------------------------------------

    def run_cell(self, source: str) -> CellReport:
        """Run one cell: Python source, a ``%`` command, or a cell that starts
        with header lines: ``%%limits SPEC`` and ``%%count_allocations [N]``
        (each at most once, in either order).

        An exception is printed as a traceback of the user's frames; an
        interrupted cell prints where it was stopped and the cell runner's
        interrupt line (reason, figures, what was rolled back) on stderr, as
        the kernel does.  ``SystemExit`` propagates.
        """
        text = source.strip("\n")
        stripped = text.strip()
        if not stripped:
            return CellReport("empty")
        limits: ml.CellLimits | None = None
        runs: int | None = None
        headers: list[str] = []
        if stripped.startswith("%%"):
            found, text = split_cell_headers(stripped)  # (read as the kernel reads them)
            if text.lstrip().startswith("%%"):  # a header given twice, or another %% line
                name = text.lstrip()[2:].split(None, 1)[0] if text.lstrip()[2:].strip() else ""
                if name in found:
                    return self._command_error(f"%%{name}: given twice at the top of the cell")
                return self._command_error(f"unknown cell command %%{name}; try %help")
            if "limits" in found:
                try:
                    limits = ml.CellLimits.parse(found["limits"], self.runner.limits)
                except Exception as e:  # ValueError; anything else is reported the same
                    return self._command_error(f"%%limits: {display_name(e)}")
            if "count_allocations" in found:
                try:
                    runs = ml.AllocationCounter.parse_runs(found["count_allocations"])
                except ValueError as e:
                    return self._command_error(f"%%count_allocations: {display_name(e)}")
            headers = stripped[: len(stripped) - len(text)].splitlines()
        elif stripped.startswith("%"):
            return self._run_command(stripped)
        text = textwrap.dedent(text)
        self.cells_run += 1
        filename = f"<cell {self.cells_run}>"
        if headers:
            # Line numbers as the user sees them: the headers are lines 1, 2.
            remember_source(filename, "\n".join([*headers, text]))
            text = "\n" * len(headers) + text
        else:
            remember_source(filename, text)
        try:
            compiled = self.compiler.compile(text, filename)
        except (SyntaxError, ValueError, OverflowError) as e:
            print_user_exception(e, frames=False)
            return CellReport("error", exception=e)
        if runs is not None:
            return self._run_counted(compiled, limits, runs)
        return self._run_compiled(compiled, limits)

    def _run_counted(
        self, compiled: CompiledCell, limits: ml.CellLimits | None, runs: int
    ) -> CellReport:
        """``%%count_allocations``: the runs of a
        :class:`memprof_limits.AllocationCounter`, each run as a cell is;
        then its report (stdout; stderr when a run stopped the count).  The
        report of the last run made is returned."""
        try:
            counter = ml.AllocationCounter(self.runner, runs, limits)
        except ValueError as e:  # several runs with rollback off
            return self._command_error(f"%%count_allocations: {display_name(e)}")
        report = CellReport("empty")
        try:
            while not counter.finished:
                report = self._run_compiled(compiled, limits, counter)
        finally:
            counter.close()
        count = counter.report
        sys.stdout.flush()
        print(count.describe(), file=sys.stdout if count.complete else sys.stderr, flush=True)
        return report

    def _run_compiled(
        self,
        compiled: CompiledCell,
        limits: ml.CellLimits | None,
        counter: ml.AllocationCounter | None = None,
    ) -> CellReport:
        self.last_cell_number = self.cells_run
        opening = counter.run() if counter is not None else self.runner.cell(limits)
        try:
            with opening as cell:
                if self._sigint_before_cell:
                    self._sigint_before_cell = False
                    cell.token.set()
                try:
                    result = cell.run(lambda: self._execute(compiled))
                finally:
                    cell.complete()  # the user's code has ended (no effect if interrupted)
                if isinstance(result, ml.Ok) and result.value is not None:
                    print(result.value)  # outside the task: the cell is complete
        except SystemExit:
            raise
        except BaseException as e:
            sys.stdout.flush()
            print_user_exception(e)
            self._print_failures(self.runner.last)
            return CellReport("error", self.runner.last, e)
        outcome = cell.outcome
        if outcome.interrupted:
            sys.stdout.flush()
            print_interrupt(outcome)
            return CellReport("interrupted", outcome, outcome.exception)
        self._print_failures(outcome)
        return CellReport("ok", outcome)

    @staticmethod
    def _print_failures(outcome: ml.CellOutcome | None) -> None:
        """After a cell that was not interrupted: what the runner's
        bookkeeping could not do (an interrupted cell says it in its line)."""
        if outcome is None or outcome.interrupted:
            return
        sys.stdout.flush()
        for failure in outcome.failures:
            note = (
                " (this value is not rolled back if the cell is interrupted)"
                if failure.stage == "checkpoint"
                else ""
            )
            print(f"memprof-limits: {failure.describe()}{note}", file=sys.stderr, flush=True)

    def _execute(self, compiled: CompiledCell) -> str | None:
        """The cell's task: run the statements, format the final expression
        (its ``repr`` is user code: limited); the caller prints it."""
        value = execute_compiled(compiled, self.namespace)
        return None if value is None else repr(value)

    # -- SIGINT ----------------------------------------------------------------

    def _sigint_target(self) -> None:
        """Called by the SIGINT handler: interrupt the running cell, or the
        cell about to start if none is running."""
        if not self.runner.interrupt():
            self._sigint_before_cell = True

    def interrupt_next_cell(self) -> None:
        """Interrupt the next cell as soon as it starts (Ctrl+C typed before
        it started).  Cancelled by :meth:`waiting_for_input`."""
        self._sigint_before_cell = True

    def waiting_for_input(self) -> None:
        """Tell the session that the front end now waits for input: a SIGINT
        that came since the last cell is not for the next one."""
        self._sigint_before_cell = False

    @contextmanager
    def sigint_to_cells(self) -> Iterator[None]:
        """Within the block, SIGINT (Ctrl+C) interrupts the running cell (its
        token is set); between cells, it interrupts the next cell unless the
        front end calls :meth:`waiting_for_input` first.  Main thread only."""
        with ml.sigint_sets(self._sigint_target):
            yield

    @contextmanager
    def as_main(self) -> Iterator[None]:
        """Make the session's module ``sys.modules["__main__"]`` within the
        block (so that ``pickle``, ``dataclasses`` and ``typing`` find the
        classes defined in cells)."""
        if self.module is None:
            yield
            return
        previous = sys.modules.get("__main__")
        sys.modules["__main__"] = self.module
        try:
            yield
        finally:
            if previous is not None:
                sys.modules["__main__"] = previous

    # -- front ends without prompt-toolkit -------------------------------------

    def run_code(self, code: str) -> int:
        """Run ``code`` as one cell (``-c``); returns the exit status."""
        with self.as_main(), self.sigint_to_cells():
            try:
                return self.run_cell(code).exit_status
            except SystemExit as e:
                return system_exit_status(e)

    def run_stream(self, stream: TextIO) -> int:
        """Run the cells read from ``stream`` (stdin that is not a tty) until
        its end; see :func:`iter_cells` for where a cell ends.  Returns the
        exit status: 0, the code of a ``SystemExit``, or 130 when SIGINT
        arrives while waiting for input."""
        with self.as_main(), self.sigint_to_cells():
            try:
                for source in iter_cells(_read_lines(stream, self)):
                    self.run_cell(source)
            except SystemExit as e:
                return system_exit_status(e)
            except KeyboardInterrupt:
                print("KeyboardInterrupt", file=sys.stderr)
                return exit_status_for_reason("token")
        return EXIT_OK

    def run_simple_prompt(self, banner: str | None = None) -> int:
        """A minimal interactive loop on ``input()`` (no prompt-toolkit):
        ``>>>``/``...`` prompts, the same cells and the same Ctrl+C (discards
        the input at the prompt, interrupts a running cell) and Ctrl+D."""
        with self.as_main(), self.sigint_to_cells():
            if banner:
                print(banner)
            lines: list[str] = []
            while True:
                self.waiting_for_input()
                try:
                    line = _input(PROMPT_CONTINUATION if lines else PROMPT)
                except KeyboardInterrupt:
                    print("\nKeyboardInterrupt (input discarded)")
                    lines = []
                    continue
                except EOFError:
                    print()
                    return EXIT_OK
                lines.append(line)
                if check_complete("\n".join(lines))[0] == "incomplete":
                    continue
                source, lines = "\n".join(lines), []
                try:
                    self.run_cell(source)
                except SystemExit as e:
                    return system_exit_status(e)

    # -- commands ----------------------------------------------------------------

    def _run_command(self, line: str) -> CellReport:
        name, _, arg = line[1:].partition(" ")
        command = self._commands.get(name.strip())
        if command is None:
            return self._command_error(f"unknown command %{name}; try %help")
        try:
            status = command(arg.strip())
        except SystemExit:
            raise
        except Exception as e:  # a command's failure never ends the session
            return self._command_error(f"%{name.strip()}: {describe_exception(e)}")
        return CellReport(status)

    def _command_error(self, message: str) -> CellReport:
        print(message, file=sys.stderr, flush=True)
        return CellReport("error")

    def limits_text(self, *, short: bool = False) -> str:
        """The session's limits as written (``memory=2GiB allocations=100MB``);
        a default memory limit says so: ``(default)``, or with ``short=False``
        where it comes from and how to remove it."""
        limits = self.runner.limits
        text = limits.describe()
        if self.default is not None and is_default_memory(limits, self.default):
            memory = f"memory={ml.format_bytes(limits.memory or 0)}"
            note = (
                " (default)"
                if short
                else f" (the default memory limit: {self.default.describe()}; "
                "%limits memory=off removes it)"
            )
            text = text.replace(memory, memory + note, 1)
        return text

    def describe_limits(self) -> str:
        """``limits: memory=1GiB allocations=200MB; rollback on``."""
        state = "on" if self.runner.rollback else "off"
        return f"limits: {self.limits_text()}; rollback {state}"

    def _cmd_limits(self, arg: str) -> CellStatus:
        if arg:
            try:
                self.runner.limits = ml.CellLimits.parse(arg, self.runner.limits)
            except Exception as e:  # ValueError; anything else is reported the same
                print(f"%limits: {display_name(e)}", file=sys.stderr)
                return "error"
        print(self.describe_limits())
        return "command"

    def _cmd_rollback(self, arg: str) -> CellStatus:
        if arg:
            if arg.lower() not in ("on", "off"):
                print("%rollback: expected 'on' or 'off'", file=sys.stderr)
                return "error"
            self.runner.rollback = arg.lower() == "on"
        print(f"rollback {'on' if self.runner.rollback else 'off'}")
        return "command"

    def _cmd_last(self, arg: str) -> CellStatus:
        last = self.runner.last
        if last is None:
            print("no cell has run yet")
            return "command"
        print(f"last cell: {last.summary()}")
        if last.interrupted:
            print(f"  {last.interrupt_line()}")
        return "command"

    def _cmd_memprof(self, arg: str) -> CellStatus:
        """``%memprof [options] STATEMENT`` (the kernel magic's options): run
        STATEMENT as a cell (same limits, rollback and Ctrl+C) under the
        allocation profiler, then print the lines that allocated most."""
        try:
            from memprof_limits import memprof
            from memprof_limits.memprof._magic import parse_magic_options
        except Exception as e:  # an older memprof_limits, or a build without it
            print(f"%memprof: the profiler is not available ({e})", file=sys.stderr)
            return "error"
        try:
            options = parse_magic_options(arg)
            if not options.statement:
                raise ValueError("no statement to profile")
        except ValueError as e:
            print(f"%memprof: {e}\nusage: {COMMANDS['%memprof']}", file=sys.stderr)
            return "error"
        if memprof.is_tracing():
            print("%memprof: the profiler is already running", file=sys.stderr)
            return "error"
        try:
            profiling = memprof.tracing(options.rate, options.frames, options.track)
            with profiling as session:
                report = self.run_cell(options.statement)
        except ValueError as e:  # a rate below the limits' rate
            print(f"%memprof: {e}", file=sys.stderr)
            return "error"
        snapshot = session.snapshot
        if report.status in ("ok", "error", "interrupted") and snapshot is not None:
            # Only what the cell's code caused (with the functions it called),
            # not the REPL's own work around it (compiling, bookkeeping).
            cell_file = f"<cell {self.last_cell_number}>"
            mine = snapshot.filter(lambda s: any(f.filename == cell_file for f in s.traceback))
            sys.stdout.flush()
            print(mine.format_top(limit=options.top))
            options.write_exports(mine)
        return report.status

    def _cmd_undo(self, arg: str) -> CellStatus:
        """``%undo``: the namespace and the ``Guarded`` values as they were
        before the last cell (``CellRunner.undo``: one level; nothing after an
        interrupted cell, which was rolled back already)."""
        if arg:
            print("%undo: takes no argument (it undoes the last cell, once)", file=sys.stderr)
            return "error"
        print(self.runner.undo().describe())
        return "command"

    def _cmd_help(self, arg: str) -> CellStatus:
        print("Commands:")
        for text in COMMANDS.values():
            print(f"  {text}")
        print(
            "Keys: Enter runs a complete statement (an empty line ends a block),"
            " Ctrl+O inserts a newline, Esc Enter runs the input as it is, Tab completes"
            " or indents, Ctrl+C interrupts the running cell (its changes to the namespace"
            " are rolled back) or discards the input, Ctrl+D on an empty line exits."
        )
        return "command"


def _input(prompt: str) -> str:
    """``input(prompt)``; SIGINT raises ``KeyboardInterrupt`` while waiting."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return input(prompt)
    finally:
        signal.signal(signal.SIGINT, previous)


def _read_lines(stream: TextIO, session: Session) -> Iterator[str]:
    """Lines of ``stream``; SIGINT raises ``KeyboardInterrupt`` only while
    waiting for a line."""
    while True:
        session.waiting_for_input()
        previous = signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            line = stream.readline()
        finally:
            signal.signal(signal.SIGINT, previous)
        if not line:
            return
        yield line
