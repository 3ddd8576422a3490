# mypy: disable-error-code="no-untyped-call"
"""The kernel: each execute request is one cell of a ``memprof_limits.CellRunner``.

The problem
-----------
Stock ipykernel turns both interrupt modes into SIGINT, i.e. a
``KeyboardInterrupt`` raised wherever the main thread happens to be -- in
user code, but also in output flushing, history, the display hook or a ZMQ
send -- and an interrupted cell leaves the namespace half-updated
(nbclient's ``x = 0; while True: pass`` keeps ``x = 0``).  Nothing limits
memory: a runaway cell gets the kernel OOM-killed with all its state.

What does not work, and why
---------------------------
- Keeping SIGINT and catching ``KeyboardInterrupt``: it cannot be masked, so
  it still lands in kernel machinery; ipykernel's ``dispatch_shell`` then
  logs it and sends *no* reply.
- One token for the whole session: an interrupt that arrives between two
  cells (or late, from the Control thread) would cancel the next cell.
- Rolling back everything in the namespace: IPython's own bindings (``_``,
  ``_i3``, ``In``, ``Out``, ``exit``...) would go back too, and history would
  disagree with the execution count.

The solution
------------
- ``do_execute`` runs the request as one cell of a ``CellRunner`` (per-cell
  token and limits, checkpoint of the namespace and of tracked ``Guarded``
  values); the shell (``shell.py``) runs only user code inside the cell's
  tasks.  IPython's names are excluded from the rollback.
- Interrupts set the *running* cell's token and nothing else:
  ``interrupt_request`` (message mode, on the Control thread) calls
  ``CellRunner.interrupt()``; SIGINT (signal mode, or Ctrl+C in a terminal
  client) is mapped to the same token with ``memprof_limits.sigint_sets``
  while a shell message is handled, and ignored otherwise.  A cell blocked in
  ``time.sleep`` or a socket read is woken by the library's signal to the
  main thread; a top-level ``await`` is woken through the event loop.
- An interrupted cell replies ``status: "error"`` with the ``ename`` of the
  cause and a one-line ``evalue`` (figures, what was rolled back, memory
  freed), published as an ``error`` output after the rollback, so "stop on
  error" aborts the queued cells.  The reply metadata carries the cell's
  figures under ``"memprof_limits"``.
- Kernel subshells (JEP 91) are refused: they would run cells concurrently
  on the namespace that a cell's rollback restores.
- The kernel always replies (issue 12).  The cell runner never lets a
  failure of its bookkeeping escape (``CellOutcome.failures``: shown on
  stderr after a completed cell, in the ``evalue`` of an interrupted one);
  here, whatever of our own code around ``IPythonKernel.do_execute`` still
  raises becomes an error reply naming the step (``BookkeepingError:
  report: RuntimeError: ...``) when it happens after the cell, and the
  session goes on; if setting the cell up fails, the cell runs as stock
  IPython runs it (no limits, no rollback) after a line on stderr that says
  so -- refusing it would refuse every later cell too.  Bad default limits
  (``MEMPROF_LIMITS``) are reported on stderr with the first cell; the kernel
  starts with the safe default memory limit.
- Safe by default: the kernel starts with a global memory limit derived from
  the machine (``memprof_limits._defaults``: 80 % of the process's cgroup
  limit, else of the physical memory), shown in the banner and ``%limits``;
  ``MEMPROF_LIMITS`` / ``install --limits`` / ``default_limits`` apply over it
  (``memory=off`` removes it).
- Every ``Session.send`` runs masked: a multipart ZMQ message is never cut.
- ``%%count_allocations [N]`` (the core's ``AllocationCounter``): the cell
  runs N times, each run through IPython's ``do_execute`` as any cell, the
  first storing history and the others named after it (``CellCompiler``);
  the reply is the last run's.  ``%undo`` (``CellRunner.undo``): a cell that
  is ``%undo`` alone is recognised by its text and undone before it runs,
  outside any task; ``%limits`` cells do not count as the last cell.
- GIL switch interval: a busy cell holds the GIL and gives it up every 5 ms
  (Python's interval); the Control thread takes it a dozen times on its way
  to ``interrupt_request``.  Lowering the interval for the whole session
  (0.001, as before) makes every threaded cell switch five times as often;
  instead it is lowered (``interrupt_switch_interval``) from the moment a
  control message arrives during a cell until it is handled, then restored
  (unless the cell changed it meanwhile).  Measured interrupt -> reply for a
  busy loop (message mode, 20 runs): median 9 ms / p90 13 ms, against
  9.5 / 11 ms with 0.001 throughout and 14 / 25 ms with 0.005 throughout
  (CPython 3.11).  Known failure: on 3.13 it gives 16 ms against 10 ms with
  0.001 throughout -- most of the wait is before our first Python code runs
  on the Control thread (the event loop's own GIL acquisitions).

Known failure cases
-------------------
- An interrupt request for cell N that arrives after cell N ended and cell
  N+1 started interrupts cell N+1: the protocol's ``interrupt_request`` does
  not say which execution it means (stock ipykernel behaves the same).
- The debugger (debugpy) is not advertised: a paused cell is still a
  running task, and stepping would be charged to its allocation budget.
- A token set by the Control thread can, in a rare race, leave a stale
  pending interrupt bit on the main thread after the cell's last task ended
  (a core issue); after an interrupt, the kernel clears it before the next
  cell starts, under the same lock the Control thread holds while
  interrupting.  A stray interrupt that still reaches a cell is treated as
  an interrupt of that cell (rolled back, reported), never as a crash.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from functools import partial
from typing import Any

from ipykernel.compiler import XCachingCompiler
from ipykernel.ipkernel import IPythonKernel
from traitlets import Bool, Float, Type, Unicode, default

import memprof_limits as ml
from memprof_limits._defaults import start_limits
from memprof_limits._process import rss_bytes
from memprof_limits._rollback import describe_exception, display_name

from . import __version__
from .magics import FuelMagics, LimitsMagics, SessionSettings, cell_kind, split_cell_headers
from .shell import MemprofLimitsShell

__all__ = ["SUBSHELLS_REFUSED", "MemprofLimitsKernel"]

SUBSHELLS_REFUSED = (
    "the memprof-limits kernel does not support kernel subshells: every cell is a "
    "transaction over the whole user namespace (rolled back if the cell is interrupted), "
    "which needs cells to run one at a time"
)

# Bindings IPython manages in the user namespace: never rolled back.  (The
# input history ``_i``, ``_iN`` is written before the cell runs and stays, as
# ``In`` does; ``_``, ``__``, ``___`` are rolled back: IPython only rebinds
# them when a cell's value is displayed, which an interrupted cell never is,
# and user code may assign them.)
_IPYTHON_NAMES = frozenset(
    {
        "_i", "_ii", "_iii", "In", "Out", "_oh", "_ih", "_dh", "_sh",
        "exit", "quit", "get_ipython", "__builtins__", "__builtin__", "__name__", "__doc__",
        "__package__", "__loader__", "__spec__", "__session__",
    }
)  # fmt: skip
_ROLLED_BACK = frozenset({"_", "__", "___"})
_HISTORY_NAME = re.compile(r"_i?\d+\Z")

_CAUSES = {
    "MemoryLimitExceeded": ml.MemoryLimitExceeded,
    "AllocationLimitExceeded": ml.AllocationLimitExceeded,
}


def _noop() -> None:
    pass


class CellCompiler(XCachingCompiler):
    """ipykernel's compiler, which names a cell after its number (``Cell
    In[5]`` in tracebacks); while :attr:`number` is set, every cell is
    named after it: the runs of a ``%%count_allocations`` cell after the
    first (which alone stores history, so IPython numbers the others one
    more) are ``In[5]`` too."""

    number: int | None = None

    def cache(self, transformed_code: str, number: int = 0, raw_code: str | None = None) -> str:
        if self.number is not None:
            number = self.number
        return super().cache(transformed_code, number, raw_code)  # type: ignore[no-any-return]


def _clear_stale_interrupts() -> None:
    """Drop interrupt reasons left pending on this thread by a task that has
    ended (a token set from another thread just as the task closed).

    Opening and closing a scope with no task running clears every pending
    reason of the thread; masked, so nothing is delivered meanwhile.
    """
    ml.masked(lambda: ml.limit_with_token(_noop, token=ml.Token()))


def _ignore_interrupts(previous: Callable[[Any], object]) -> Callable[[Any], object]:
    """An ``unraisablehook`` that drops interrupts raised in ``__del__`` or a
    weakref callback (they are sticky: the task gets them again)."""

    def hook(unraisable: Any) -> None:
        if isinstance(unraisable.exc_value, ml.Interrupted):
            return
        previous(unraisable)

    return hook


class MemprofLimitsKernel(IPythonKernel):
    """An IPython kernel in which every cell is a limited task.

    Configuration (``--MemprofLimitsKernel.<name>=...`` or a config file):
    ``default_limits``, ``report``, ``rollback``, ``switch_interval``,
    ``interrupt_switch_interval``, ``forward_interrupt_to_children``.
    """

    implementation = "memprof_limits_kernel"
    implementation_version = __version__
    shell_class = Type(MemprofLimitsShell)
    compiler_class = Type(CellCompiler)

    default_limits = Unicode(
        help="Limits of every cell at start, e.g. 'memory=2GiB allocations=500MB', over the "
        "safe default memory limit (80% of the cgroup limit or of the physical memory; "
        "'memory=off' removes it, 'off' removes both).  Default: the environment variable "
        "MEMPROF_LIMITS."
    ).tag(config=True)
    report = Bool(
        help="Print a one-line summary (allocations, peak memory, time) after each cell "
        "(default: the environment variable MEMPROF_LIMITS_REPORT=1)."
    ).tag(config=True)
    rollback = Bool(True, help="Roll the user namespace back when a cell is interrupted.").tag(
        config=True
    )
    switch_interval = Float(
        0.0,
        help="sys.setswitchinterval() at start, in seconds (0: keep Python's 0.005).  User "
        "code runs with it; interrupts do not depend on it (interrupt_switch_interval).",
    ).tag(config=True)
    interrupt_switch_interval = Float(
        0.0001,
        help="sys.setswitchinterval() while the Control thread handles a message during a "
        "cell (an interrupt_request), restored after it; 0: never changed.  A busy cell "
        "holds the GIL: with Python's 5 ms interval an interrupt takes some 15-25 ms to "
        "reach it, with this some 9-13 ms.",
    ).tag(config=True)
    forward_interrupt_to_children = Bool(
        True,
        help="On interrupt_request, also send SIGINT to the kernel's child processes "
        "(as stock ipykernel does).",
    ).tag(config=True)

    @default("default_limits")
    def _default_default_limits(self) -> str:
        return os.environ.get("MEMPROF_LIMITS", "")

    @default("report")
    def _default_report(self) -> bool:
        return os.environ.get("MEMPROF_LIMITS_REPORT", "").lower() in ("1", "true", "yes", "on")

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        ml.start()
        if self.switch_interval > 0:
            sys.setswitchinterval(self.switch_interval)
        #: Said on stderr with the first cell (the kernel has no output before).
        self._startup_warnings: list[str] = []
        source = (
            "MEMPROF_LIMITS"
            if os.environ.get("MEMPROF_LIMITS") == self.default_limits
            else "MemprofLimitsKernel.default_limits"
        )
        # Safe by default: a memory limit derived from the machine, which
        # MEMPROF_LIMITS (install --limits) or the configuration overrides.
        start = start_limits(self.default_limits or None, source=source)
        problems = [f"memprof-limits: default memory limit: {n}" for n in start.default.notes]
        for warning in [*problems, *start.warnings]:
            self.log.error("%s", warning)
            self._startup_warnings.append(warning)
        limits = start.limits
        self.settings = SessionSettings(limits=limits, report=self.report, default=start.default)
        shell = self._shell()
        shell.register_magics(LimitsMagics(shell, self.settings))
        shell.register_magics(FuelMagics(shell, self.settings))
        shell.interrupt_waiter = self._interrupt_waiter
        self._runner: ml.CellRunner | None = None
        self._runner_ns: object = None
        self._hidden: dict[str, Any] = {}
        self._cell: ml.Cell | None = None
        self._reply_metadata: dict[str, Any] | None = None
        self._interrupt_lock = threading.Lock()
        self._interrupted_since_clear = False
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        self._sigint: ml.sigint_sets | None = None
        if self.session is not None:
            send = self.session.send
            # Instance attribute: every user of this Session (streams, display
            # hook, comms, replies) sends a multipart message whole.
            setattr(self.session, "send", lambda *a, **k: ml.masked(lambda: send(*a, **k)))  # noqa: B010
        sys.unraisablehook = _ignore_interrupts(sys.unraisablehook)
        self._load_profiler_extension()
        self._warm_up()

    def _warm_up(self) -> None:
        """Use IPython's display formatters and traceback formatters once,
        before the first cell.  Their first use imports modules (stack_data,
        pygments lexers) and fills caches: half a megabyte that would
        otherwise be charged, unevenly, to the first cell that shows a value,
        and some 70 ms added to the first interrupt's reply."""
        shell = self._shell()
        try:
            formatter = shell.display_formatter
            for value in (0, 0.5, "text", b"b", (1,), [1], {1: 1}, {1}, None, True, object()):
                if formatter is not None:
                    formatter.format(value)
            try:
                raise ml.Cancelled("warm-up")
            except ml.Cancelled as e:
                shell.plain_traceback(type(e), e, e.__traceback__)
                shell.InteractiveTB.structured_traceback(type(e), e, e.__traceback__)
        except Exception as e:  # pragma: no cover - a warm-up only
            self.log.debug("memprof-limits: warm-up failed: %s", e)

    def _shell(self) -> MemprofLimitsShell:
        shell = self.shell
        assert isinstance(shell, MemprofLimitsShell)
        return shell

    def _load_profiler_extension(self) -> None:
        """Load ``%memprof`` (``memprof_limits.memprof``) if the library has it."""
        import importlib.util

        try:
            if importlib.util.find_spec("memprof_limits.memprof") is None:
                return
            manager = self._shell().extension_manager
            if manager is not None:
                manager.load_extension("memprof_limits.memprof")
        except Exception as e:  # the kernel works without it
            self.log.warning("memprof-limits: could not load the %%memprof magics: %s", e)

    @property
    def banner(self) -> str:  # type: ignore[override]
        return (
            f"{super().banner}"
            f"memprof-limits kernel {__version__}: every cell is a limited task; "
            "interrupted cells are rolled back.  %limits? for help.\n"
            f"Limits: {self.settings.describe_limits()}\n"
        )

    @property
    def kernel_info(self) -> dict[str, Any]:
        info: dict[str, Any] = dict(super().kernel_info)
        info["supported_features"] = [
            f
            for f in info.get("supported_features", [])
            if f not in ("kernel subshells", "debugger")
        ]
        return info

    # -- the cell runner ---------------------------------------------------------

    @property
    def runner(self) -> ml.CellRunner:
        """The cell runner over the shell's current user namespace."""
        ns = self._shell().user_ns
        if self._runner is None or self._runner_ns is not ns:
            self._runner = ml.CellRunner(
                ns, limits=self.settings.limits, rollback=self.rollback, exclude=self._excluded
            )
            self._runner_ns = ns
        self._hidden = self._shell().user_ns_hidden
        return self._runner

    def _excluded(self, name: object) -> bool:
        # Called for every name of the namespace on a rollback: keep it cheap.
        if name in self._hidden:
            return name not in _ROLLED_BACK
        if name in _IPYTHON_NAMES:
            return True
        return isinstance(name, str) and name[:1] == "_" and _HISTORY_NAME.match(name) is not None

    def _enter_cell(
        self, code: str, *, undoable: bool = True, counter: ml.AllocationCounter | None = None
    ) -> tuple[ml.Cell, ExitStack]:
        """Open the cell of ``code`` (the next run of ``counter``, if
        given); the stack closes it (rollback, figures)."""
        runner = self.runner
        shell = self._shell()
        stack = ExitStack()
        with self._interrupt_lock:  # no interrupt of the previous cell is in flight
            if self._interrupted_since_clear:
                _clear_stale_interrupts()
                self._interrupted_since_clear = False
            limits = self.settings.cell_limits(code)
            if limits.allocations is not None or counter is not None:
                self._quiet_iopub()
            if counter is not None:
                opening = counter.run()
            elif undoable:
                opening = runner.cell(limits)
            else:
                opening = runner.cell(limits, undoable=False)
            cell = stack.enter_context(opening)
            self._cell = shell.current_cell = cell
        return cell, stack

    def _quiet_iopub(self) -> None:
        """Wait until the I/O thread has sent what was published so far (the
        busy status and the cell's input, sent as the request arrived):
        Python it would run while the cell starts shares CPython's free lists
        with the cell and moves the cell's collections -- its allocation count
        would depend on the scheduling.  At most 1 s."""
        thread = getattr(self, "iopub_thread", None)
        if thread is None or not hasattr(thread, "schedule"):
            return
        done = threading.Event()
        try:
            thread.schedule(done.set)
        except Exception:  # a closed pipe at shutdown: nothing to wait for
            return
        done.wait(1.0)

    async def do_execute(
        self,
        code: str,
        silent: bool,
        store_history: bool = True,
        user_expressions: dict[str, str] | None = None,
        allow_stdin: bool = False,
        *,
        cell_meta: dict[str, Any] | None = None,
        cell_id: str | None = None,
    ) -> dict[str, Any]:
        """Run ``code`` as one cell; an interrupted cell is rolled back and
        replied as an error named after its cause.  Always returns a reply:
        a failure of our own code becomes an error reply that names it.

        A cell that starts with ``%%count_allocations`` runs as the runs of
        an :class:`memprof_limits.AllocationCounter`; a ``%undo`` cell undoes
        before it runs (see ``magics.py``)."""
        self._reply_metadata = None
        warnings, self._startup_warnings = self._startup_warnings, []
        for warning in warnings:
            print(warning, file=sys.stderr, flush=True)
        run = partial(
            self._execute_cell,
            code,
            silent,
            user_expressions=user_expressions,
            allow_stdin=allow_stdin,
            cell_meta=cell_meta,
            cell_id=cell_id,
        )
        counter: ml.AllocationCounter | None = None
        undoable = True
        try:
            counter = self._counter_for(code)
            if counter is None:
                kind = cell_kind(code)
                undoable = kind is None
                if kind == "undo":
                    self.settings.pending_undo = self.runner.undo()  # outside any cell
        except Exception as e:  # a bug of ours: run it as a plain cell, and say so
            self.log.error("memprof-limits: cell plan: %s", describe_exception(e), exc_info=e)
        try:
            if counter is not None:
                return await self._run_counted(counter, run, store_history, silent)
            return await run(store_history=store_history, undoable=undoable)
        finally:
            self.settings.pending_undo = None
            self._shell().usage_error = None

    def _counter_for(self, code: str) -> ml.AllocationCounter | None:
        """The counter of a cell that starts with ``%%count_allocations``
        (with its ``%%limits`` if any), or ``None``: not such a cell, or a
        bad header, which the shell reports as a ``UsageError`` (when the
        counter itself refuses -- several runs with rollback off -- the
        kernel hands its message to the shell)."""
        headers, _body = split_cell_headers(code)
        if "count_allocations" not in headers:
            return None
        try:
            runs = ml.AllocationCounter.parse_runs(headers["count_allocations"])
            limits = self.settings.cell_limits(code)
            if "limits" in headers:
                ml.CellLimits.parse(headers["limits"])
        except Exception:  # reported by the shell's transform_cell
            return None
        try:
            return ml.AllocationCounter(self.runner, runs, limits)
        except Exception as e:
            self._shell().usage_error = f"%%count_allocations: {display_name(e)}"
            return None

    async def _run_counted(
        self,
        counter: ml.AllocationCounter,
        run: Callable[..., Any],
        store_history: bool,
        silent: bool,
    ) -> dict[str, Any]:
        """The runs of a ``%%count_allocations`` cell, each a cell of the
        runner run as the kernel runs a cell; then the report (stdout, or
        stderr if the count stopped) and its figures in the metadata
        (``"count_allocations"``).  Only the first run stores history; the
        reply is the last run's."""
        shell = self._shell()
        compiler = shell.compile if isinstance(shell.compile, CellCompiler) else None
        reply: dict[str, Any] = {}
        try:
            while not counter.finished:
                first = counter.run_number == 1
                before = counter.run_number
                if not first and compiler is not None and store_history:
                    compiler.number = shell.execution_count - 1
                try:
                    reply = await run(store_history=store_history and first, counter=counter)
                finally:
                    if compiler is not None:
                        compiler.number = None
                if counter.run_number == before and not counter.finished:
                    break  # the run could not be made (a bug, said on stderr): stop
        finally:
            counter.close()
        count = counter.report
        try:
            if not silent:
                stream = sys.stdout if count.complete else sys.stderr
                print(count.describe(), file=stream, flush=True)
            if self._reply_metadata is not None:
                self._reply_metadata["count_allocations"] = count.metadata()
        except Exception as e:  # the reply matters more than the report
            self.log.error("memprof-limits: count report: %s", describe_exception(e), exc_info=e)
        return reply

    async def _execute_cell(
        self,
        code: str,
        silent: bool,
        *,
        store_history: bool,
        user_expressions: dict[str, str] | None,
        allow_stdin: bool,
        cell_meta: dict[str, Any] | None,
        cell_id: str | None,
        undoable: bool = True,
        counter: ml.AllocationCounter | None = None,
    ) -> dict[str, Any]:
        """One cell (or one run of ``counter``) through IPython's
        ``do_execute``, and its reply."""
        shell = self._shell()
        try:
            cell, stack = self._enter_cell(code, undoable=undoable, counter=counter)
        except Exception as e:  # a bug: run the cell as stock IPython does, and say so
            if counter is not None:
                counter.close()
            self._cell = shell.current_cell = None
            problem = f"cell setup: {describe_exception(e)}"
            self.log.error("memprof-limits: %s", problem, exc_info=e)
            print(
                f"memprof-limits: {problem}; this cell runs without limits or rollback",
                file=sys.stderr,
                flush=True,
            )
            self._reply_metadata = {"error": problem}
            return await super().do_execute(  # type: ignore[no-any-return]
                code,
                silent,
                store_history,
                user_expressions,
                allow_stdin,
                cell_meta=cell_meta,
                cell_id=cell_id,
            )
        try:
            reply: dict[str, Any] = await super().do_execute(
                code,
                silent,
                store_history,
                user_expressions,
                allow_stdin,
                cell_meta=cell_meta,
                cell_id=cell_id,
            )
            if counter is not None and reply.get("status") != "ok" and not cell.outcome.interrupted:
                counter.raised()  # IPython showed the exception: the count stops here
        finally:
            self._cell = shell.current_cell = None
            closing: Exception | None = None
            try:
                stack.close()
            except Exception as e:  # the runner reports its own failures: a bug
                closing = e
        if closing is not None:
            return self._failure_reply("cell end", closing, cell.outcome)
        try:
            return self._cell_reply(reply, cell, silent)
        except Exception as e:
            return self._failure_reply("report", e, cell.outcome)

    def _cell_reply(self, reply: dict[str, Any], cell: ml.Cell, silent: bool) -> dict[str, Any]:
        shell = self._shell()
        outcome = cell.outcome
        frames, rss_at_interrupt = shell.take_interrupt_report()
        if outcome.interrupted:
            if outcome.reason == "allocations" and cell.limits.allocations is not None:
                # Cell.run's message gives the figures of the statement's own
                # scope (what remained of the budget); say the cell's.
                outcome.message = (
                    f"allocation limit of {cell.limits.allocations} bytes reached "
                    f"({outcome.allocated_bytes} bytes allocated)"
                )
            if outcome.reason == "memory" and rss_at_interrupt is not None:
                # What the rollback itself released counts too (the runner
                # measures only from after the rollback).
                now = rss_bytes()
                if now is not None:
                    outcome.freed_bytes = max(outcome.freed_bytes or 0, rss_at_interrupt - now)
            reply = self._interrupted_reply(reply, outcome, frames)
        elif outcome.failures:
            # A completed cell: its reply stays ok; say what was not protected.
            for failure in outcome.failures:
                print(
                    f"memprof-limits: {failure.describe()} (this value is not rolled back "
                    "if the cell is interrupted)"
                    if failure.stage == "checkpoint"
                    else f"memprof-limits: {failure.describe()}",
                    file=sys.stderr,
                    flush=True,
                )
        self.settings.last = outcome
        self._reply_metadata = self._metadata_of(outcome)
        if self.settings.report and not silent:
            print(f"[memprof-limits] {outcome.summary()}")
        return reply

    def _metadata_of(self, outcome: ml.CellOutcome) -> dict[str, Any]:
        """``outcome.metadata()``, checked JSON-able; a failure is reported
        in place of the figures (the reply must still go out)."""
        try:
            figures = outcome.metadata()
            json.dumps(figures)
            return figures
        except Exception as e:
            return {"error": f"metadata: {describe_exception(e)}"}

    def _failure_reply(
        self, stage: str, exc: BaseException, outcome: ml.CellOutcome | None
    ) -> dict[str, Any]:
        """An error reply (and ``error`` output) for a failure of the kernel's
        own code at ``stage``; an interrupted cell keeps its ``ename``."""
        evalue = f"{stage}: {describe_exception(exc)}"
        self.log.error("memprof-limits: %s", evalue, exc_info=exc)
        ename = "BookkeepingError"
        if outcome is not None:
            if outcome.interrupted:
                ename = outcome.ename
                evalue = f"{evalue} (the cell was interrupted: {outcome.reason})"
            self._reply_metadata = self._metadata_of(outcome)
        content = {"traceback": [f"{ename}: {evalue}"], "ename": ename, "evalue": evalue}
        try:
            self._publish_error(content)
        except Exception as e:  # the reply matters more than the output
            self.log.error("memprof-limits: could not publish an error: %s", e)
        shell = self.shell
        count = shell.execution_count - 1 if shell is not None else self.execution_count
        return {
            **content,
            "status": "error",
            "execution_count": count,
            "user_expressions": {},
            "payload": [],
            "engine_info": {
                "engine_uuid": self.ident,
                "engine_id": self.int_id,
                "method": "execute",
            },
        }

    def _publish_error(self, content: dict[str, Any]) -> None:
        for stream in (sys.stdout, sys.stderr):
            if stream is not None:
                stream.flush()
        self.send_response(self.iopub_socket, "error", content, ident=self._topic("error"))

    def _interrupted_reply(
        self, reply: dict[str, Any], outcome: ml.CellOutcome, frames: list[str]
    ) -> dict[str, Any]:
        shell = self._shell()
        ename = outcome.ename
        evalue = outcome.interrupt_line()
        cls = _CAUSES.get(ename, ml.Interrupted)
        stb = frames + shell.plain_traceback(cls, cls(evalue), None)[-1:]
        content = {"traceback": stb, "ename": ename, "evalue": evalue}
        shell._last_traceback = stb
        self._publish_error(content)
        reply = dict(reply)
        reply.update(content)
        reply["status"] = "error"
        reply["user_expressions"] = {}
        reply.setdefault(
            "engine_info",
            {"engine_uuid": self.ident, "engine_id": self.int_id, "method": "execute"},
        )
        return reply

    def finish_metadata(
        self, parent: dict[str, Any], metadata: dict[str, Any], reply_content: dict[str, Any]
    ) -> dict[str, Any]:
        """Add the cell's figures (``CellOutcome.metadata()``) under
        ``"memprof_limits"``."""
        metadata = super().finish_metadata(parent, metadata, reply_content)
        figures, self._reply_metadata = self._reply_metadata, None
        if figures is not None and reply_content.get("status") != "aborted":
            metadata["memprof_limits"] = figures
        return metadata  # type: ignore[no-any-return]

    # -- interrupts --------------------------------------------------------------

    def interrupt_cell(self) -> bool:
        """Interrupt the running cell, if any (any thread).  Returns whether
        a cell was running.  Never affects a later cell."""
        with self._interrupt_lock:
            self._interrupted_since_clear = True
            running = self._runner.interrupt() if self._runner is not None else False
        self._wake_waiters()
        return running

    def _interrupt_waiter(self) -> asyncio.Future[None]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        entry = (loop, fut)
        self._waiters.append(entry)
        fut.add_done_callback(lambda _f: self._waiters.remove(entry))
        return fut

    def _wake_waiters(self) -> None:
        for loop, fut in list(self._waiters):

            def wake(fut: asyncio.Future[None] = fut) -> None:
                if not fut.done():
                    fut.set_result(None)

            try:
                loop.call_soon_threadsafe(wake)
            except RuntimeError:  # loop closed
                pass

    def _sigint_token(self) -> ml.Token | None:
        """For ``sigint_sets``: the running cell's token (and wake an await)."""
        self._interrupted_since_clear = True  # main thread: no lock needed (or possible)
        runner = self._runner
        if runner is not None:
            runner.interrupt()  # the running cell, or the next run of a count
        cell = self._cell
        if cell is None:
            return None
        self._wake_waiters()
        return cell.token

    def pre_handler_hook(self) -> None:
        """While a shell message is handled: SIGINT sets the running cell's
        token (never ``KeyboardInterrupt``)."""
        sigint = ml.sigint_sets(self._sigint_token)
        sigint.__enter__()
        self._sigint = sigint

    def post_handler_hook(self) -> None:
        """Back to ignoring SIGINT (as ipykernel does when idle)."""
        sigint, self._sigint = self._sigint, None
        if sigint is not None:
            sigint.__exit__(None, None, None)

    @contextmanager
    def _cancel_on_sigint(self, future: Any) -> Iterator[None]:
        # ipykernel maps SIGINT to cancelling a top-level-await cell; here
        # SIGINT sets the cell's token like for any other cell.
        yield

    def start(self) -> None:
        super().start()
        if self.control_stream is not None:
            # As early as our code can be on the Control thread: see _on_control.
            self.control_stream.on_recv(self._on_control, copy=False)

    def _on_control(self, msg: Any) -> Any:
        """A control message arrived (Control thread).  While a cell is
        running it holds the GIL and gives it up only every switch interval
        (5 ms): each of the Control thread's dozen GIL acquisitions on the
        way to ``interrupt_request`` would wait that long.  Switches are made
        fast (:attr:`interrupt_switch_interval`) until the message is
        handled, then Python's interval is restored."""
        interval = self.interrupt_switch_interval if self._cell is not None else 0.0
        previous = sys.getswitchinterval()
        if interval > 0:
            sys.setswitchinterval(interval)
            interval = sys.getswitchinterval()  # as stored (microseconds): compared below
        return self._dispatch_control_then_restore(msg, interval, previous)

    async def _dispatch_control_then_restore(
        self, msg: Any, interval: float, previous: float
    ) -> None:
        try:
            await self.dispatch_control(msg)
        finally:
            if interval > 0 and sys.getswitchinterval() == interval:  # not changed meanwhile
                sys.setswitchinterval(previous)

    async def interrupt_request(self, stream: Any, ident: Any, parent: Any) -> None:
        """Message-mode interrupt (Control thread): set the running cell's
        token -- no SIGINT to the kernel itself."""
        if not self.session:
            return
        self.interrupt_cell()
        if self.forward_interrupt_to_children:
            self._interrupt_children()
        self.session.send(stream, "interrupt_reply", {"status": "ok"}, parent, ident=ident)

    def _interrupt_children(self) -> None:
        try:
            import psutil  # type: ignore[import-untyped,unused-ignore]
        except ImportError:  # pragma: no cover - ipykernel depends on psutil
            return
        try:
            children = psutil.Process().children(recursive=True)
        except psutil.Error:
            return
        for child in children:
            try:
                child.send_signal(signal.SIGINT)
            except psutil.Error:
                pass

    # -- subshells ---------------------------------------------------------------

    async def create_subshell_request(self, socket: Any, ident: Any, parent: Any) -> None:
        """Refuse: see :data:`SUBSHELLS_REFUSED`."""
        if not self.session:
            return
        self.log.warning("memprof-limits: %s", SUBSHELLS_REFUSED)
        content = {
            "status": "error",
            "ename": "SubshellsNotSupported",
            "evalue": SUBSHELLS_REFUSED,
            "traceback": [],
        }
        self.session.send(socket, "create_subshell_reply", content, parent, ident)
