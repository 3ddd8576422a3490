# mypy: disable-error-code="no-untyped-call"
"""The IPython shell of the kernel: what runs inside a cell's limited region.

The problem
-----------
Every cell must run as a limited task (``memprof_limits.Cell.run``) so that
allocation limits, the global memory limit and interrupts apply to it -- but
only the *user's* code may run there.  IPython's ``run_cell`` interleaves user
code with its own machinery: history, the display hook that publishes
``execute_result`` over ZMQ, output streams, traceback display.  An
interrupt that lands in that machinery corrupts it (a multipart ZMQ message
cut in half, a history entry half-written) or shows a traceback from kernel
internals.

What does not work, and why
---------------------------
- Wrapping ``run_cell`` (or ``do_execute``) in one task: the whole of IPython
  runs limited and interruptible, which is exactly the hazard above, and the
  allocation count of a cell would include IPython's bookkeeping (history
  writes, message serialisation with timestamps), which is not reproducible.
- Masking the whole display hook: it calls the user's ``__repr__`` /
  ``_repr_html_``, which can loop or allocate without bound -- masked, it
  could not be interrupted.
- Letting IPython's ``run_code`` catch the interrupt: its bare ``except:``
  shows a traceback that starts in the kernel, and the error is reported
  before the namespace is rolled back, so it cannot say what was undone.

The solution
------------
- ``run_code`` (called by IPython once per top-level statement) executes the
  statement's code object with ``cell.run(...)``: the statements of a cell
  share its budget and token; everything around them stays outside.
- The last expression of a cell is compiled in ``single`` mode, so CPython
  calls the display hook *inside* ``exec``.  ``LimitedDisplayHook`` splits it:
  the user's formatters run inside the task; the publication (``Out``/``_``
  history, the ZMQ message) is deferred and done by ``run_code`` after the
  task returns -- outside the limited region, and only if the statement was
  not interrupted.
- What kernel machinery can still be reached from inside the task runs
  masked (interrupts deferred to its end): ``display()`` publication,
  ``sys.stdout``/``sys.stderr`` writes and flushes (see ``iostream.py``),
  IPython's output tee, ``_showtraceback`` and, set up by the kernel, every
  ``Session.send``.
- An interrupted statement shows nothing here: the shell records a short
  traceback of the *user* frames (from the cell's own code object down), and
  the kernel publishes the error after the rollback, when it can say what
  was rolled back.
- Top-level ``await`` cells: the coroutine is stepped with ``cell.run`` (each
  step is limited); what it awaits is awaited outside the task, raced against
  an interrupt so that an interrupted ``await asyncio.sleep(60)`` ends at once.
  Only asyncio: ``%autoawait trio`` / ``curio`` (their runners drive the
  coroutine with their own protocol, which a step cannot hand on) is refused
  with a ``UsageError`` (:data:`OTHER_LOOPS_REFUSED`).
- What IPython runs *around* the user's code for a cell -- input
  transformers, AST transformers, ``pre_execute``/``pre_run_cell``/
  ``post_execute``/``post_run_cell`` callbacks -- runs as tasks of the cell
  too (``cell.run(..., charge=False)``: the cell's token and memory limit,
  not its allocation budget, so that IPython's own transformation work is not
  counted), so a looping hook is interrupted like the cell.  Callbacks that
  IPython and ipykernel register themselves run as before (unlimited,
  finite).  An interrupt before the user's code (a ``pre_*`` callback, a
  transformer) interrupts the cell: nothing of it runs.
- **Where a cell ends**: when ``run_cell_async`` returns, i.e. when the last
  user statement's task has returned and its value was published (nothing
  of the user's runs in between): ``Cell.complete()``.  From then on, the
  cell is no longer interrupted by anything: an interrupt of a
  ``post_run_cell`` callback or of ``user_expressions`` stops *them*, is
  reported on stderr (or in the expression's result), and the cell replies
  ``ok`` without rollback.

Known failure cases
-------------------
- Magics and other IPython code called *from* user code (``%run``,
  ``%timeit``, ``get_ipython().run_line_magic``) run inside the task and can
  be interrupted half-way, like any library the user calls.
- While a top-level ``await`` waits, the event loop runs other tasks the user
  created (``asyncio.create_task``) outside any limit.
- Allocations made by masked machinery (stdout buffering, ``display()``
  messages) still count against the cell's allocation budget: printing is
  work the cell asked for.
- The ``post_execute``/``post_run_cell`` callbacks of an *interrupted* cell
  are not run (the cell's token is set: they would be interrupted at once).
"""

from __future__ import annotations

import ast
import asyncio
import os
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from types import CodeType, TracebackType
from typing import Any, Literal

from ipykernel.displayhook import ZMQShellDisplayHook
from ipykernel.zmqshell import ZMQDisplayPublisher, ZMQInteractiveShell
from IPython.core.async_helpers import _asyncio_runner, _pseudo_sync_runner
from IPython.core.error import UsageError
from IPython.core.events import EventManager, available_events
from IPython.core.interactiveshell import InteractiveShell
from traitlets import Type, validate

import memprof_limits as ml
from memprof_limits._frames import user_traceback
from memprof_limits._process import rss_bytes
from memprof_limits._rollback import describe_exception, display_name

from .magics import UNDO_ALONE, misplaced_undo, split_cell_headers

__all__ = [
    "OTHER_LOOPS_REFUSED",
    "LimitedDisplayHook",
    "LimitedDisplayPublisher",
    "LimitedEventManager",
    "MemprofLimitsShell",
]

OTHER_LOOPS_REFUSED = (
    "the memprof-limits kernel runs top-level await on asyncio only: each step of the "
    "cell's coroutine is a limited task and what it awaits is awaited outside the task, "
    "interruptibly, which needs asyncio futures; {runner!r} is refused "
    "(%autoawait asyncio, or %autoawait off)"
)

# Events that IPython triggers for a cell (around the user's code).
_CELL_EVENTS = frozenset({"pre_execute", "pre_run_cell", "post_execute", "post_run_cell"})
# Callbacks registered by these packages are IPython's own machinery: finite,
# and run as stock IPython runs them.
_MACHINERY_MODULES = ("IPython.", "ipykernel.", "memprof_limits_kernel.")


class LimitedDisplayHook(ZMQShellDisplayHook):
    """The display hook of the last expression of a cell, split in two.

    While ``defer`` is true (the shell sets it around a task), a call only
    formats the value -- the user's code, in the task -- and keeps the
    result; :meth:`publish_deferred` then updates ``Out``/``_`` and sends the
    ``execute_result`` message, outside the task.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.defer = False
        self.formatting = False
        self._deferred: tuple[Any, dict[str, Any], dict[str, Any]] | None = None

    def __call__(self, result: Any = None) -> None:
        if not self.defer:
            super().__call__(result)
            return
        if result is None or ml.masked(self._silenced):
            return
        self.formatting = True  # a formatter's error fails the request, as in ipykernel
        try:
            format_dict, md_dict = self.compute_format_data(result)  # user code: limited
        finally:
            self.formatting = False
        self._deferred = (result, format_dict, md_dict)

    def _silenced(self) -> bool:
        self.check_for_underscore()
        return bool(self.quiet())

    def discard_deferred(self) -> None:
        """Forget a value formatted by an interrupted statement."""
        self._deferred = None

    def publish_deferred(self) -> None:
        """Publish the value kept by the last call (outside any task)."""
        deferred, self._deferred = self._deferred, None
        if deferred is None:
            return
        result, format_dict, md_dict = deferred
        self.start_displayhook()
        self.write_output_prompt()
        self.update_user_ns(result)
        self.fill_exec_result(result)
        if format_dict:
            self.write_format_data(format_dict, md_dict)
            self.log_output(format_dict)
        self.finish_displayhook()


class LimitedDisplayPublisher(ZMQDisplayPublisher):
    """``display()`` publication runs masked: the user's formatters run before
    it (limited), the message is sent whole or not at all."""

    def publish(self, *args: Any, **kwargs: Any) -> None:
        ml.masked(lambda: super(LimitedDisplayPublisher, self).publish(*args, **kwargs))

    def clear_output(self, *args: Any, **kwargs: Any) -> None:
        ml.masked(lambda: super(LimitedDisplayPublisher, self).clear_output(*args, **kwargs))


class LimitedEventManager(EventManager):
    """IPython's events; during a cell, the callbacks of ``pre_execute``,
    ``pre_run_cell``, ``post_execute`` and ``post_run_cell`` that are not
    IPython's own run as tasks of the cell (its token and memory limit), so
    an interrupt stops a looping one.

    Before the cell's user code, an interrupted callback interrupts the cell
    (its code does not run, the kernel reports it); after it (the cell
    completed), it stops that callback and the ones after it, is reported on
    stderr, and the cell stays completed.  Exceptions are handled as stock
    IPython does (printed, the next callback runs)."""

    shell: MemprofLimitsShell

    def trigger(self, event: str, *args: Any, **kwargs: Any) -> None:
        shell = self.shell
        cell = getattr(shell, "current_cell", None)
        if cell is None or shell._depth > 0 or event not in _CELL_EVENTS:
            super().trigger(event, *args, **kwargs)
            return
        for func in self.callbacks[event][:]:
            if str(getattr(func, "__module__", "") or "").startswith(_MACHINERY_MODULES):
                self._call_stock(event, func, args, kwargs)
                continue
            if cell.outcome.interrupted or cell.outcome.interrupted_after_completion:
                return  # the cell's token is set (or its limits reached): nothing more runs
            shell._depth += 1
            try:
                result = cell.run(partial(func, *args, **kwargs), charge=False)
            except (Exception, KeyboardInterrupt):
                self._print_error(event, func, args, kwargs)
                continue
            finally:
                shell._depth -= 1
            if isinstance(result, ml.Error):
                name = _callable_name(func)
                if cell.completed:
                    print(
                        f"memprof-limits: the {event} callback {name} was interrupted after "
                        f"the cell completed ({cell.outcome.late_message}); the cell is not "
                        "rolled back",
                        file=sys.stderr,
                        flush=True,
                    )
                else:
                    shell._interrupt_frames = [f"Interrupted in the {event} callback {name}\n"]
                return

    def _call_stock(
        self, event: str, func: Callable[..., Any], args: Any, kwargs: dict[str, Any]
    ) -> None:
        try:
            func(*args, **kwargs)
        except (Exception, KeyboardInterrupt):
            self._print_error(event, func, args, kwargs)

    def _print_error(
        self, event: str, func: Callable[..., Any], args: Any, kwargs: dict[str, Any]
    ) -> None:
        if self.print_on_error:
            print(f"Error in callback {_callable_name(func)} (for {event}):")
        self.shell.showtraceback()


def _callable_name(func: object) -> str:
    name = getattr(func, "__qualname__", None)
    return name if isinstance(name, str) else display_name(func)


def _masked_call(fn: Callable[..., Any]) -> Callable[..., Any]:
    def call(*args: Any, **kwargs: Any) -> Any:
        return ml.masked(lambda: fn(*args, **kwargs))

    return call


class MemprofLimitsShell(ZMQInteractiveShell):
    """``ZMQInteractiveShell`` whose user code runs in the kernel's current
    cell (:attr:`current_cell`, set by the kernel for each execute request).

    With no current cell (code run by IPython outside an execute request),
    it behaves as the stock shell.
    """

    displayhook_class = Type(LimitedDisplayHook)
    display_pub_class = Type(LimitedDisplayPublisher)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: The cell being run (set by the kernel), or None.
        self.current_cell: ml.Cell | None = None
        #: Called with no argument when a top-level ``await`` starts waiting:
        #: returns a future that an interrupt completes (set by the kernel).
        self.interrupt_waiter: Callable[[], asyncio.Future[None]] | None = None
        self._depth = 0  # > 0 while a task of the current cell runs
        #: Set by the kernel for the duration of a cell: the cell fails with
        #: this ``UsageError`` before it runs (a ``%%count_allocations`` the
        #: kernel refused).  Not cleared here: IPython transforms a cell twice.
        self.usage_error: str | None = None
        self._interrupt_frames: list[str] = []
        self._interrupt_rss: int | None = None

    def _hook(self) -> LimitedDisplayHook:
        hook = self.displayhook
        assert isinstance(hook, LimitedDisplayHook)
        return hook

    def init_events(self) -> None:
        """IPython's event manager, with cell callbacks run as tasks
        (:class:`LimitedEventManager`); keeps what IPython registered."""
        super().init_events()
        events = LimitedEventManager(self, available_events)
        events.callbacks = self.events.callbacks
        self.events = events

    @validate("loop_runner")
    def _import_runner(self, proposal: Any) -> Any:
        """Refuse event loops other than asyncio for top-level ``await``
        (``%autoawait trio``): see :data:`OTHER_LOOPS_REFUSED`."""
        runner = InteractiveShell.__dict__["_import_runner"].func(self, proposal)
        if runner is not _asyncio_runner and runner is not _pseudo_sync_runner:
            value = proposal.value
            name = value if isinstance(value, str) else _callable_name(runner)
            message = OTHER_LOOPS_REFUSED.format(runner=name)
            if "current_cell" not in self.__dict__:  # configuration, at start: keep starting
                print(f"memprof-limits: {message}; using asyncio", file=sys.stderr)
                self.autoawait = True
                return _asyncio_runner
            raise UsageError(message)
        return runner

    # -- %%limits, %%count_allocations, transformers -----------------------------

    def transform_cell(self, raw_cell: str) -> str:
        """Drop the leading ``%%limits`` and ``%%count_allocations`` lines
        (the kernel reads them before the cell runs); a bad specification is
        a ``UsageError`` before execution, and so are the kernel's
        :attr:`usage_error` and a ``%undo`` line among other code (a
        ``%undo`` cell is undone by the kernel before it runs: see
        ``magics.py``).  ``%%count_allocations`` is read only in a cell
        of the kernel (not in ``run_cell`` called by user code, where its
        magic refuses to run).  In a cell, the input transformers run as a
        task of the cell: an interrupt stops them and nothing of the cell
        runs."""
        top = self.current_cell is not None and self._depth == 0
        headers, body = (
            split_cell_headers(raw_cell) if top else split_cell_headers(raw_cell, ("limits",))
        )
        if top and self.usage_error is not None:
            raise UsageError(self.usage_error)
        if top and misplaced_undo(raw_cell):
            raise UsageError(UNDO_ALONE)
        for name, spec in headers.items():
            try:
                if name == "limits":
                    ml.CellLimits.parse(spec)
                else:
                    ml.AllocationCounter.parse_runs(spec)
            except Exception as e:  # ValueError; anything else is reported the same
                raise UsageError(f"%%{name}: {display_name(e)}") from None
        if headers and not body.lstrip().startswith("%%"):
            # Keep line numbers: comment the lines out instead of removing them.
            lines = [f"# %%{name} {spec}".rstrip() + "\n" for name, spec in headers.items()]
            body = "".join(lines) + body
        transform = partial(ZMQInteractiveShell.transform_cell, self, body)
        result = self._around_cell("input transformers", transform)
        return "" if result is None else result  # type: ignore[no-any-return]

    def transform_ast(self, node: Any) -> Any:
        """IPython's AST transformers, as a task of the cell (see
        :meth:`transform_cell`); interrupted: an empty module runs."""
        result = self._around_cell(
            "AST transformers", partial(ZMQInteractiveShell.transform_ast, self, node)
        )
        return ast.Module(body=[], type_ignores=[]) if result is None else result

    def _around_cell(self, what: str, fn: Callable[[], Any]) -> Any:
        """``fn()`` -- IPython's machinery around the user's code -- as an
        uncharged task of the current cell (see the module's docstring);
        ``None`` if it was interrupted (the cell is then interrupted)."""
        cell = self.current_cell
        if cell is None or self._depth > 0:
            return fn()
        if cell.outcome.interrupted:
            return None
        self._depth += 1
        try:
            result = cell.run(fn, charge=False)
        finally:
            self._depth -= 1
        if isinstance(result, ml.Error):
            if not self._interrupt_frames:
                self._interrupt_frames = [f"Interrupted in IPython's {what}\n"]
            return None
        return result.value

    async def run_cell_async(self, *args: Any, **kwargs: Any) -> Any:
        """IPython's cell, then the end of the kernel's cell: the user's code
        has ended (``Cell.complete()``; see the module's docstring)."""
        cell = self.current_cell
        top = cell is not None and self._depth == 0
        result = await super().run_cell_async(*args, **kwargs)
        if top and cell is not None:
            cell.complete()
        return result

    # -- running user code -----------------------------------------------------

    async def run_code(
        self, code_obj: CodeType, result: Any = None, *, async_: bool = False
    ) -> bool:
        """Run one top-level statement; ``True`` if it failed (IPython's contract).

        In a cell, the statement runs as a task of the cell; an interrupt
        stops the cell (no traceback is shown here: the kernel reports it).
        """
        __tracebackhide__ = "__ipython_bottom__"
        cell = self.current_cell
        old_excepthook, sys.excepthook = sys.excepthook, self.excepthook
        self.sys_excepthook = old_excepthook
        try:
            try:
                if cell is not None and self._depth == 0:
                    if async_:
                        return await self._run_async_in_cell(cell, code_obj, result)
                    return self._run_in_cell(cell, code_obj, result)
                # Outside a cell, or nested (run_cell called from user code):
                # the enclosing task, if any, limits it.
                if async_:
                    await self._await_plain(code_obj)
                else:
                    self._run_plain(code_obj)
            finally:
                sys.excepthook = old_excepthook
        except BaseException as e:
            if isinstance(e, ml.Interrupted) and cell is not None and self._depth == 0:
                # An interrupt that no limit of this cell absorbed (a stray
                # delivery): the statement stopped half-way, so treat the cell
                # as interrupted -- it is rolled back and reported as such.
                cell.token.set()
                self._record_interrupt(cell, code_obj, e, result)
                return True
            return self._handle_exception(e, code_obj, result)
        return False

    def _run_plain(self, code_obj: CodeType) -> None:
        hook = self._hook()
        defer, hook.defer = hook.defer, False
        try:
            exec(code_obj, self.user_global_ns, self.user_ns)
        finally:
            hook.defer = defer

    async def _await_plain(self, code_obj: CodeType) -> None:
        hook = self._hook()
        defer, hook.defer = hook.defer, False
        try:
            await eval(code_obj, self.user_global_ns, self.user_ns)
        finally:
            hook.defer = defer

    def _run_in_cell(self, cell: ml.Cell, code_obj: CodeType, result: Any) -> bool:
        hook = self._hook()
        task = partial(exec, code_obj, self.user_global_ns, self.user_ns)
        self._depth += 1
        hook.defer = True
        try:
            outcome = cell.run(task)
        except BaseException:
            hook.discard_deferred()
            raise
        finally:
            self._depth -= 1
            hook.defer = hook.formatting = False  # (an interrupt may skip the hook's own reset)
        if isinstance(outcome, ml.Error):
            hook.discard_deferred()
            self._record_interrupt(cell, code_obj, outcome.exc, result)
            return True
        hook.publish_deferred()
        return False

    async def _run_async_in_cell(self, cell: ml.Cell, code_obj: CodeType, result: Any) -> bool:
        coro = eval(code_obj, self.user_global_ns, self.user_ns)  # creates it; runs nothing
        hook = self._hook()
        send: tuple[str, Any] = ("send", None)

        def step() -> tuple[str, Any]:
            try:
                if send[0] == "throw":
                    return ("yield", coro.throw(send[1]))
                return ("yield", coro.send(None))
            except StopIteration as stop:
                return ("done", stop.value)

        waited: Any = None
        try:
            while True:
                self._depth += 1
                hook.defer = True
                try:
                    outcome = cell.run(step)
                except BaseException:
                    hook.discard_deferred()
                    raise
                finally:
                    self._depth -= 1
                    hook.defer = hook.formatting = False
                if isinstance(outcome, ml.Error):
                    hook.discard_deferred()
                    self._record_interrupt(cell, code_obj, outcome.exc, result)
                    return True
                kind, waited = outcome.value
                if kind == "done":
                    hook.publish_deferred()
                    return False
                send = await self._wait_outside(cell, waited)
        finally:
            if waited is not None and hasattr(waited, "cancel") and not waited.done():
                waited.cancel()
            try:
                coro.close()  # runs the coroutine's cleanup; no-op if it finished
            except RuntimeError:  # it ignored GeneratorExit: nothing more to do
                pass

    async def _wait_outside(self, cell: ml.Cell, waited: Any) -> tuple[str, Any]:
        """Wait, outside the task, for what a coroutine step yielded (asyncio's
        Task protocol); an interrupt ends the wait early."""
        if waited is None:  # bare yield: give the loop one turn
            await asyncio.sleep(0)
            return ("send", None)
        if getattr(waited, "_asyncio_future_blocking", None) is None:
            return ("throw", RuntimeError(f"a top-level await yielded {waited!r}, not a future"))
        waited._asyncio_future_blocking = False
        waiter = self.interrupt_waiter() if self.interrupt_waiter else None
        try:
            pending: set[asyncio.Future[Any]] = {asyncio.ensure_future(waited)}
            if waiter is not None:
                pending.add(waiter)
            if not cell.token.is_set():  # else: interrupted before the waiter existed
                await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if waiter is not None and not waiter.done():
                waiter.cancel()
        # Either the future is done (the step reads its result), or the cell
        # was interrupted: the next step is refused by cell.run.
        return ("send", None)

    def _record_interrupt(
        self, cell: ml.Cell, code_obj: CodeType, exc: BaseException, result: Any
    ) -> None:
        """Keep what the kernel needs to report an interrupted statement: a
        short traceback of the user's frames (IPython's plain format: the
        verbose one costs tens of milliseconds per frame) and the resident
        memory now."""
        self._interrupt_rss = rss_bytes()
        tb = _user_traceback(exc.__traceback__, code_obj, interrupt=True)
        self._interrupt_frames = self.plain_traceback(type(exc), exc, tb)[:-1] if tb else []
        if cell.outcome.reason == "memory":
            # The frames' locals may hold what exhausted memory: let it go.
            seen: BaseException | None = exc
            while seen is not None:
                if seen.__traceback__ is not None:
                    traceback.clear_frames(seen.__traceback__)
                seen = seen.__context__
        # Shown by the kernel; IPython would format it again (verbosely) for
        # its history.
        exc.__traceback__ = None
        if result is not None:
            result.error_in_exec = exc

    def plain_traceback(
        self, etype: type[BaseException], evalue: BaseException, tb: TracebackType | None
    ) -> list[str]:
        """IPython's structured traceback in its short ("Plain") mode."""
        formatter = self.InteractiveTB
        mode = formatter.mode
        try:
            formatter.set_mode("Plain")
            return list(formatter.structured_traceback(etype, evalue, tb, tb_offset=0))
        except Exception:
            return [*traceback.format_tb(tb), f"{etype.__name__}: {evalue}"]
        finally:
            formatter.set_mode(mode)

    def take_interrupt_report(self) -> tuple[list[str], int | None]:
        """The user frames of the last interrupt (formatted) and the resident
        memory when it happened; clears them."""
        report = (self._interrupt_frames, self._interrupt_rss)
        self._interrupt_frames, self._interrupt_rss = [], None
        return report

    def _handle_exception(self, e: BaseException, code_obj: CodeType, result: Any) -> bool:
        """IPython's handling of an exception from user code (``run_code``),
        with the traceback cut to the user's frames."""
        import bdb

        if isinstance(e, ml.Interrupted) and self._depth > 0:
            raise e  # nested run_cell: the interrupt belongs to the enclosing task
        if result is not None:
            result.error_in_exec = e
        if isinstance(e, SystemExit):
            self.showtraceback(exception_only=True)
            import warnings

            warnings.warn("To exit: use 'exit', 'quit', or Ctrl-D.", stacklevel=1)
        elif isinstance(e, bdb.BdbQuit):
            pass
        elif self.custom_exceptions and isinstance(e, self.custom_exceptions):
            self.CustomTB(type(e), e, e.__traceback__)
        else:
            tb = _user_traceback(e.__traceback__, code_obj) or e.__traceback__
            self.showtraceback((type(e), e, tb), tb_offset=0, running_compiled_code=True)
        return True

    # -- user_expressions ------------------------------------------------------

    def user_expressions(self, expressions: dict[str, str]) -> dict[str, Any]:
        """Evaluate ``user_expressions`` as tasks of the current cell (same
        budget, same token); an interrupt stops the remaining ones."""
        cell = self.current_cell
        if cell is None:
            return super().user_expressions(expressions)  # type: ignore[no-any-return]
        out: dict[str, Any] = {}
        for key, expr in expressions.items():
            self._depth += 1
            try:
                outcome = cell.run(partial(self._user_expression, expr))
            except BaseException:
                out[key] = self._user_obj_error()
                continue
            finally:
                self._depth -= 1
            if isinstance(outcome, ml.Error):
                # After the cell completed: this expression (and the ones
                # after it, refused) is an error; the cell is not rolled back.
                exc = outcome.exc
                out[key] = {
                    "status": "error",
                    "ename": type(exc).__name__,
                    "evalue": cell.outcome.late_message or describe_exception(exc),
                    "traceback": [],
                }
                continue
            out[key] = outcome.value
        return out

    def _user_expression(self, expr: str) -> Any:
        return self._format_user_obj(eval(expr, self.user_global_ns, self.user_ns))

    # -- machinery reachable from user code: masked ----------------------------

    def _showtraceback(self, etype: Any, evalue: Any, stb: Any) -> None:
        ml.masked(lambda: super(MemprofLimitsShell, self)._showtraceback(etype, evalue, stb))
        if self._hook().formatting:  # ipykernel checks the display hook's message instead
            self._last_traceback_during_displayhook = True

    @contextmanager
    def _tee(self, channel: Literal["stdout", "stderr"]) -> Iterator[None]:
        with super()._tee(channel=channel):
            stream = getattr(sys, channel)
            teed = getattr(stream, "__dict__", {}).get("write")
            if teed is not None:
                stream.write = _masked_call(teed)
            try:
                yield
            finally:
                if teed is not None:
                    stream.write = teed


# Where an interrupt is delivered in code of ours (the library's signal
# handler, the kernel's masked output streams when they return): frames cut
# from the end of an interrupt's traceback.
_OUR_DIRS = (os.path.dirname(ml.__file__) + os.sep, os.path.dirname(__file__) + os.sep)


def _user_traceback(
    tb: TracebackType | None, code_obj: CodeType, *, interrupt: bool = False
) -> TracebackType | None:
    """The part of ``tb`` from the statement's own frame down: without the
    kernel's and the library's frames above the user's code, nor, for an
    interrupt, the library's and the kernel's frames below it (where it was
    delivered: the library's signal handler, a masked ``print`` returning)."""
    return user_traceback(tb, _is_ours, start=code_obj, trim_end=interrupt)


def _is_ours(filename: str) -> bool:
    return filename.startswith(_OUR_DIRS)
