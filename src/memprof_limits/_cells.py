"""The cell runner shared by the Jupyter kernel and the REPL.

A *cell* is one unit of user input.  It runs as one or more limited tasks
(:meth:`Cell.run`; IPython runs each top-level statement separately) that
share the cell's allocation budget, its token and the global memory limit.
Before the cell, the namespace and every tracked :class:`Guarded` value are
checkpointed; if the cell is interrupted they are rolled back, and if the
interrupt was for memory, memory is released.  The front ends only format
what :class:`CellOutcome` says.

Two rules the front ends rely on (issue 12):

- **A failure of the runner's own bookkeeping never escapes.**  Taking a
  checkpoint or rolling back calls user code (``__snapshot__``,
  ``__restore__``, a key's ``__eq__``), and formatting a report formats user
  objects.  Each such step is guarded on its own: a failure is recorded in
  :attr:`CellOutcome.failures` as a :class:`BookkeepingFailure` that names
  its culprit (``rollback: Guarded 'x': __restore__ raised ValueError:
  ...``), the other steps still run, and the cell's block exits normally.
  A value whose checkpoint failed is not protected in that cell (the cell
  still runs, so that the user can ``del`` or fix it).  Limit parsing
  raises only ``ValueError``, whatever the size parser raised.
- **A cell ends when its user code ends** (:meth:`Cell.complete`): a cell
  is interrupted iff one of its tasks was interrupted before that moment.
  A token set later (while a front end publishes the value or runs hooks)
  rolls nothing back; tasks run after completion (hooks) are still limited
  and interruptible, and their interruption is only noted
  (:attr:`CellOutcome.interrupted_after_completion`).

The checkpoint of a cell serves twice more: :meth:`CellRunner.undo` rolls
back to the checkpoint of the last cell that ended (``%undo``: kept until the
next cell starts), and :meth:`Cell.discard` rolls a cell that ended back to
its own (the runs of ``%%count_allocations`` but the last, see
``_counting.py``).

>>> import memprof_limits as ml
>>> ns = {"x": 1}
>>> runner = ml.CellRunner(ns, limits=ml.CellLimits(allocations=10**6))
>>> with runner.cell() as cell:
...     result = cell.run(lambda: exec("x = 2; y = [str(i) for i in range(10**6)]", ns))
>>> cell.outcome.reason, ns["x"], "y" in ns
('allocations', 1, False)
"""

from __future__ import annotations

import builtins
import gc
import re
import sys
import time
import weakref
from collections.abc import Callable, Iterator, MutableMapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, TypeVar

from . import _FREEZE_COUNT_AT_IMPORT, _sampler
from ._exceptions import Interrupted, Reason
from ._result import Error, Ok
from ._rollback import Guarded, RollbackReport, describe_exception, display_name, tracked_guards
from ._scope import (
    LimitScope,
    _describe_scope,
    _run,
    get_global_memory_limit,
    release_memory,
    set_global_memory_limit,
)
from ._token import Token
from ._units import format_bytes, parse_bytes

if TYPE_CHECKING:
    from ._counting import AllocationCounter

__all__ = [
    "BookkeepingFailure",
    "Cell",
    "CellLimits",
    "CellOutcome",
    "CellRunner",
    "UndoReport",
    "parse_size",
]

T = TypeVar("T")

_LIMITS_HELP = (
    "expected 'memory=SIZE allocations=SIZE' (either or both; SIZE like 2GiB, 500MB or "
    "'off'), or 'off' to remove both limits"
)


def parse_size(value: object, what: str) -> int:
    """``parse_bytes``, whose every failure on a string is a ``ValueError``
    (it may raise ``OverflowError`` or another type for an absurd size:
    callers catch ``ValueError`` at their boundary and must not depend on
    which).  The front ends' command lines use it too.

    >>> parse_size("1e308TB", "--allocations")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ValueError: ...
    """
    try:
        return parse_bytes(value, what=what)  # type: ignore[arg-type]
    except ValueError:
        raise
    except TypeError:
        if not isinstance(value, str):
            raise  # a wrong type of argument: parse_bytes says what it expects
        raise ValueError(_bad_size(value, what, "TypeError")) from None
    except Exception as e:
        raise ValueError(_bad_size(value, what, describe_exception(e))) from None


def _bad_size(value: object, what: str, error: str) -> str:
    return (
        f"{what}: cannot read {_clip(display_name(value))!r} as a size ({error}); "
        "expected a size like 2GiB, 500MB or 10_000_000"
    )


def _clip(text: str, width: int = 60) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


@dataclass(frozen=True)
class BookkeepingFailure:
    """A step of the cell runner's own bookkeeping that failed.

    ``stage`` is ``"checkpoint"``, ``"rollback"``, ``"release"`` or
    ``"figures"``; ``culprit`` names what failed (``Guarded 'x'``);
    ``error`` says how (``__restore__ raised ValueError: ...``).

    >>> BookkeepingFailure("rollback", "Guarded 'x'", "__restore__ raised OSError").describe()
    "rollback: Guarded 'x': __restore__ raised OSError"
    """

    stage: str
    culprit: str
    error: str

    def describe(self) -> str:
        return f"{self.stage}: {self.culprit}: {self.error}"


@dataclass(frozen=True)
class CellLimits:
    """Limits of a cell: the global memory limit and the allocation budget,
    in bytes (``None``: no limit).

    A limit given as text keeps the text (``memory_text``,
    ``allocations_text``): :meth:`describe` shows a limit as the user wrote
    it (``10MB``, not ``9.5 MiB``).

    >>> CellLimits.parse("memory=2GiB allocations=500MB")
    CellLimits(memory=2147483648, allocations=500000000)
    >>> CellLimits.parse("allocations=10MB").describe()
    'allocations=10MB'
    """

    memory: int | None = None
    allocations: int | None = None
    memory_text: str | None = field(default=None, repr=False, compare=False)
    allocations_text: str | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("memory", "allocations"):
            value = getattr(self, name)
            if value is not None:
                if isinstance(value, str) and getattr(self, f"{name}_text") is None:
                    object.__setattr__(self, f"{name}_text", value.strip())
                object.__setattr__(self, name, parse_size(value, f"{name} limit"))

    @classmethod
    def parse(cls, spec: str, base: CellLimits | None = None) -> CellLimits:
        """Parse ``memory=2GiB allocations=500MB`` / ``off`` over ``base``.

        Raises ``ValueError`` saying what is expected (the caller names the
        context: ``%limits: ...``).
        """
        limits = base or cls()
        spec = spec.strip()
        if spec.lower() in ("off", "none"):
            return cls()
        for item in re.split(r"[\s,]+", spec):
            if not item:
                continue
            key, sep, value = item.partition("=")
            key = key.strip().lower()
            if not sep or key not in ("memory", "allocations", "mem", "alloc"):
                raise ValueError(f"cannot read {_clip(item)!r}: {_LIMITS_HELP}")
            field_name = "memory" if key.startswith("mem") else "allocations"
            text = value.strip()
            off = text.lower() in ("off", "none")
            try:
                amount = None if off else parse_size(text, field_name)
            except ValueError as e:
                raise ValueError(_clip(str(e), 300)) from None
            changes: dict[str, Any] = {field_name: amount, f"{field_name}_text": None}
            if not off:
                changes[f"{field_name}_text"] = text
            limits = replace(limits, **changes)
        return limits

    def describe(self) -> str:
        """``memory=2GiB allocations=500MB`` as written (or ``memory=2.0 GiB``
        for a limit given in bytes by a program), or ``no limits``."""
        parts = []
        for name in ("memory", "allocations"):
            value = getattr(self, name)
            if value is not None:
                text = getattr(self, f"{name}_text")
                parts.append(f"{name}={text if text else format_bytes(value)}")
        return " ".join(parts) or "no limits"


@dataclass
class CellOutcome:
    """What happened in a cell.  All sizes in bytes, times in seconds."""

    limits: CellLimits
    interrupted: bool = False
    reason: Reason | None = None
    message: str | None = None
    allocated_bytes: int = 0
    peak_rss_bytes: int = 0
    wall_time_s: float = 0.0
    rollback: RollbackReport | None = None
    freed_bytes: int | None = None
    exception: BaseException | None = field(default=None, repr=False)
    #: Failures of the runner's own bookkeeping (see :class:`BookkeepingFailure`).
    failures: list[BookkeepingFailure] = field(default_factory=list)
    #: A task run after the cell completed (a hook) was interrupted: the
    #: cell itself was not (nothing was rolled back).
    interrupted_after_completion: bool = False
    #: The interrupt message of that task.
    late_message: str | None = None

    @property
    def ename(self) -> str:
        """Exception name for an interrupted cell, naming the cause."""
        return {
            "memory": "MemoryLimitExceeded",
            "allocations": "AllocationLimitExceeded",
            "token": "Interrupted",
        }.get(self.reason or "", "Interrupted")

    def summary(self) -> str:
        """One line: allocations, peak memory, time."""
        return (
            f"allocated {format_bytes(self.allocated_bytes)} ({self.allocated_bytes} bytes), "
            f"peak RSS {format_bytes(self.peak_rss_bytes)}, {self.wall_time_s:.3f} s"
        )

    def interrupt_line(self) -> str:
        """The line shown to the user for an interrupted cell, e.g.
        ``allocation limit of 10000000 bytes reached (10001350 bytes
        allocated); rolled back: x (changed)``."""
        parts = [self.message or "cancelled: the token was set"]
        if self.rollback is not None:
            parts.append(self.rollback.describe())
        parts += [f.describe() for f in self.failures]
        if self.freed_bytes is not None:
            parts.append(f"freed {format_bytes(self.freed_bytes)}")
        return "; ".join(parts)

    def metadata(self) -> dict[str, Any]:
        """JSON-able figures for a Jupyter ``execute_reply``."""
        return {
            "allocated_bytes": self.allocated_bytes,
            "peak_rss_bytes": self.peak_rss_bytes,
            "wall_time_s": round(self.wall_time_s, 6),
            "interrupted": self.interrupted,
            "reason": self.reason,
            "limits": {"memory": self.limits.memory, "allocations": self.limits.allocations},
            "rolled_back": (
                None
                if self.rollback is None
                else {
                    "added": list(self.rollback.added),
                    "changed": list(self.rollback.changed),
                    "deleted": list(self.rollback.removed),
                    "restored": list(self.rollback.restored),
                    "failed": list(self.rollback.failed),
                }
            ),
            "freed_bytes": self.freed_bytes,
            "bookkeeping_errors": [f.describe() for f in self.failures],
            "interrupted_after_completion": self.interrupted_after_completion,
        }


#: Why :meth:`CellRunner.undo` has nothing to undo.
_NOTHING_RUN = "no cell has run yet"
_LAST_INTERRUPTED = "the last cell was interrupted, and its changes were rolled back already"
_LAST_DISCARDED = "the last cell's changes were rolled back already"
_LAST_UNDONE = "%undo goes back one cell only, and the last cell was undone already"
_LAST_UNFINISHED = "the last cell could not start"
_NO_ROLLBACK = "rollback was off during the last cell: no checkpoint was kept"
_RUNNING = "a cell is running"
#: What an undo does not restore (the limitation of rollback).
_UNDO_NOTE = "(names and Guarded values only: objects the cell changed in place stay changed)"


@dataclass(frozen=True)
class UndoReport:
    """What :meth:`CellRunner.undo` did: ``undone`` and what was rolled back
    (``rollback``, and the bookkeeping ``failures`` of user ``__restore__``
    methods), or ``reason``, why there was nothing to undo.

    >>> import memprof_limits as ml
    >>> ns = {}
    >>> runner = ml.CellRunner(ns)
    >>> print(runner.undo().describe())
    nothing to undo: no cell has run yet
    >>> with runner.cell() as cell:
    ...     _ = cell.run(lambda: exec("x = 1", ns))
    >>> print(runner.undo().describe())
    undid the last cell: rolled back: x (added)
    (names and Guarded values only: objects the cell changed in place stay changed)
    >>> "x" in ns, runner.undo().reason
    (False, '%undo goes back one cell only, and the last cell was undone already')
    """

    undone: bool
    rollback: RollbackReport | None = None
    reason: str | None = None
    failures: tuple[BookkeepingFailure, ...] = ()

    def describe(self) -> str:
        """``undid the last cell: rolled back: x (changed)`` and a line that
        says what is not restored, or ``nothing to undo: REASON``."""
        if not self.undone:
            return f"nothing to undo: {self.reason}"
        parts = [self.rollback.describe() if self.rollback is not None else "nothing to roll back"]
        parts += [f.describe() for f in self.failures]
        return "undid the last cell: " + "; ".join(parts) + "\n" + _UNDO_NOTE


def canonical_collector() -> None:
    """Put CPython's cyclic collector in the same state whatever ran before:
    empty free lists and zero generation counts.

    A cell's allocation count depends on both: an object taken from a free
    list (tuples, lists, dicts, floats...) is not an allocation, and a full
    collection empties the free lists.  Measured on 3.12: the same 9.7 MB
    search cell counted 119 KB more after a full collection between cells
    (which a kernel's event loop runs when its own allocations say so) than
    after none.

    A full collection does it.  When nothing is frozen, a full collection of
    nothing does it in O(1) of the heap: everything is frozen meanwhile
    (``gc.freeze`` moves the generations to the permanent one, a list
    splice) and unfrozen after, into the oldest generation.  The price: the
    collector's estimate of the old generation's size is reset too, so the
    first ~70 000 container allocations after it end in one full collection.
    When the program froze objects (a pre-fork server's ``gc.freeze()``),
    unfreezing would undo that: a plain full collection (O(heap)) is made
    instead, which leaves frozen objects alone.  CPython 3.12 freezes
    immortal objects itself (375 tuples); those do not count as frozen by
    the program (no collection can free an immortal object).
    docs/design.md, "Deterministic counts".  Known failure cases: another
    thread that calls ``gc.freeze()`` while the collection runs (finalizers
    release the GIL) has its freeze undone, and so has a program that froze
    objects before importing the library (3.12 only: they are taken for
    CPython's own).

    >>> import gc
    >>> canonical_collector(); gc.get_count()[1:]  # (the line itself counts in generation 0)
    (0, 0)
    """
    if gc.get_freeze_count() > _CPYTHON_FROZEN:  # the program froze objects: they stay frozen
        gc.collect()
        return
    try:
        gc.freeze()  # inside the try: a signal handler raising after it still unfreezes
        gc.collect()
    finally:
        gc.unfreeze()


#: The objects CPython 3.12 keeps frozen itself: every collection moves the immortal objects
#: it meets to the permanent generation (update_refs in gcmodule.c), the tuples of its static
#: types (375 from the start) -- objects no collection can free, frozen or not, so the
#: canonical state unfreezes them with the rest.  Counted when the package is imported (not
#: this module, loaded on first use: a program's gc.freeze() may come between): objects a
#: program froze before importing the library are counted with them.
_CPYTHON_FROZEN = _FREEZE_COUNT_AT_IMPORT if sys.version_info[:2] == (3, 12) else 0


# -- cell header lines (both front ends) --------------------------------------------------

HEADERS = ("limits", "count_allocations")
_BLANK_LINES = re.compile(r"(?:[ \t]*\n)*")
_HEADER = re.compile(r"[ \t]*%%(limits|count_allocations)(?:[ \t]+([^\n]*))?[ \t]*(?:\n|\Z)")


def split_cell_headers(code: str, names: tuple[str, ...] = HEADERS) -> tuple[dict[str, str], str]:
    """The header lines that start a cell -- ``%%limits SPEC`` and
    ``%%count_allocations [N]``, each at most once, in either order (only
    those of ``names``) -- as ``{name: argument}``, and the rest of the cell:
    the kernel and the REPL read cells alike.  A header given twice, or
    another ``%%`` line, ends the headers: the rest starts with it (each
    front end says what that is).

    >>> split_cell_headers("%%count_allocations 5\\n%%limits memory=1GB\\nx = 1")
    ({'count_allocations': '5', 'limits': 'memory=1GB'}, 'x = 1')
    >>> split_cell_headers("x = 1")
    ({}, 'x = 1')
    """
    start = _BLANK_LINES.match(code)
    pos = start.end() if start is not None else 0
    headers: dict[str, str] = {}
    while True:
        m = _HEADER.match(code, pos)
        if m is None or m.group(1) in headers or m.group(1) not in names:
            break
        headers[m.group(1)] = (m.group(2) or "").strip()
        pos = m.end()
    return (headers, code[pos:]) if headers else ({}, code)


class Cell:
    """One cell being run; see :meth:`CellRunner.cell`."""

    def __init__(self, runner: CellRunner, limits: CellLimits) -> None:
        self.limits = limits
        self.token = Token()
        self.outcome = CellOutcome(limits=limits)
        self._runner = runner
        self._allocated = 0
        self._completed = False
        self._discard = False

    @property
    def completed(self) -> bool:
        """Whether :meth:`complete` was called on a cell not interrupted."""
        return self._completed

    @property
    def discarded(self) -> bool:
        """Whether :meth:`discard` was called."""
        return self._discard

    def discard(self) -> None:
        """Roll this cell's changes back when it ends, though it was not
        interrupted: the namespace and the tracked :class:`Guarded` values
        return to the cell's checkpoint (``outcome.rollback`` says what was
        undone), as for an interrupted cell, and the cell is not the one
        :meth:`CellRunner.undo` undoes.  :class:`AllocationCounter` discards
        every run but the last.  Nothing is rolled back when the runner's
        ``rollback`` is off (there is no checkpoint)."""
        self._discard = True

    def complete(self) -> None:
        """The cell's user code has ended (successfully or with an ordinary
        exception): from now on the cell is not interrupted by anything --
        a token set later rolls nothing back, and a task run later (a hook)
        that is interrupted leaves the cell as it is.  No effect on a cell
        already interrupted."""
        if not self.outcome.interrupted:
            self._completed = True

    def run(self, fn: Callable[[], T], *, charge: bool = True) -> Ok[T] | Error:
        """Run ``fn()`` as a task of this cell: ``Ok(value)`` or ``Error(exc)``
        when one of the cell's limits is reached (or it was interrupted).
        Other exceptions propagate.  Once the cell is interrupted, later
        calls return ``Error`` without running ``fn``.

        ``charge=False`` runs ``fn`` under the cell's token and memory limit
        only: its allocations are neither limited by nor added to the cell's
        allocation budget (a front end's machinery around the user's code,
        such as IPython's input transformers, whose work would otherwise
        change every cell's count).

        After :meth:`complete`, tasks still run under the cell's token and
        limits, but an interrupted one only sets
        ``outcome.interrupted_after_completion`` (and later tasks are
        refused)."""
        outcome = self.outcome
        if outcome.interrupted or outcome.interrupted_after_completion:
            message = outcome.message or outcome.late_message or "interrupted"
            return Error(outcome.exception or Interrupted(message))
        remaining = None
        if charge and self.limits.allocations is not None:
            remaining = max(0, self.limits.allocations - self._allocated)
        scope = LimitScope(
            memory=self.limits.memory is not None, allocations=remaining, token=self.token
        )
        try:
            result = _run(scope, fn)
        finally:
            if charge:
                self._allocated += scope.allocated_bytes or 0
        if not isinstance(result, Error):
            return result
        exc = result.exc
        if scope.reason == "allocations" and self.limits.allocations is not None:
            # The figures of the cell, not of this task's share of its budget.
            message = (
                f"allocation limit of {self.limits.allocations} bytes reached "
                f"({self._allocated} bytes allocated)"
            )
        elif isinstance(exc, Interrupted):
            message = display_name(exc)
        else:
            message = _describe_scope(scope)
        if scope.reason == "memory" and self.limits.memory_text and self.limits.memory:
            # The limit as the user wrote it (400MB, not 381.5 MiB).
            written = f"limit of {self.limits.memory_text}"
            message = message.replace(f"limit of {format_bytes(self.limits.memory)}", written, 1)
        if self._completed:
            outcome.interrupted_after_completion = True
            outcome.late_message = message
            return Error(exc)
        outcome.interrupted = True
        outcome.reason = scope.reason
        outcome.exception = exc
        outcome.message = message
        return Error(exc)


class CellRunner:
    """Runs cells under session limits with rollback of a namespace.

    Args:
        namespace: the user namespace (rolled back in place), or ``None``.
        limits: session defaults; a cell can override them.
        rollback: roll the namespace and tracked :class:`Guarded` values back
            when a cell is interrupted.
        exclude: names of the namespace that are never rolled back (history
            variables of IPython, say).

    After a cell that was not interrupted (it ended normally or raised), the
    runner keeps its checkpoint until the next cell starts, for
    :meth:`undo`: the objects that cell rebound or deleted stay alive until
    then (dropped before the next cell's checkpoint, so a cell's peak memory
    is what it is without undo).
    """

    def __init__(
        self,
        namespace: MutableMapping[str, Any] | None = None,
        *,
        limits: CellLimits | None = None,
        rollback: bool = True,
        exclude: Callable[[str], bool] | None = None,
    ) -> None:
        self.limits = limits or CellLimits()
        self.rollback = rollback
        self.last: CellOutcome | None = None
        self._ns = namespace
        self._namespace = (
            None
            if namespace is None
            else Guarded(namespace, name="namespace", exclude=exclude, track=False)
        )
        self._current: Cell | None = None
        #: Checkpoints taken before the last cell, for undo() (None: nothing
        #: to undo).  The guards are held weakly: a Guarded that nothing else
        #: holds any more (not even the namespace's checkpoint) has nothing to
        #: restore, and undo must not keep it alive (nor tracked).
        self._undo: list[tuple[weakref.ref[Guarded[Any]], Any]] | None = None
        self._undo_reason = _NOTHING_RUN
        #: The AllocationCounter whose runs are being made, if any.
        self._counter: AllocationCounter | None = None

    @property
    def running(self) -> bool:
        """Whether a cell is running."""
        return self._current is not None

    def interrupt(self) -> bool:
        """Interrupt the running cell (set its token).  Safe from any thread
        and from signal handlers; never affects a later cell -- except the
        next run of an :class:`AllocationCounter` being made: its runs are one
        cell to the user, so an interrupt between two runs interrupts the
        next one.  Returns whether a cell (or a count) was running."""
        counter = self._counter
        if counter is not None:
            counter._interrupt_requested = True
        cell = self._current
        if cell is None:
            return counter is not None
        cell.token.set()
        return True

    def undo(self) -> UndoReport:
        """Roll the namespace and the tracked :class:`Guarded` values back to
        their state before the last cell, if that cell ended (normally or
        with an exception) and was not undone already.

        One level: a second call has nothing to undo.  An interrupted cell was
        rolled back when it ended, so after one there is nothing to undo
        either.  As for a rollback, only bindings and ``Guarded`` values are
        restored, not objects changed in place.  Never raises: a
        ``__restore__`` that fails is reported in ``failures`` and the rest
        is still restored.  Call it between cells (while a cell runs it does
        nothing).
        """
        if self._current is not None:
            return UndoReport(False, reason=_RUNNING)
        kept, self._undo = self._undo, None
        if kept is None:
            return UndoReport(False, reason=self._undo_reason)
        self._undo_reason = _LAST_UNDONE
        checkpoints = [(guard, cp) for ref, cp in kept if (guard := ref()) is not None]
        failures: list[BookkeepingFailure] = []
        report = self._rollback(checkpoints, failures)
        return UndoReport(True, report, failures=tuple(failures))

    @contextmanager
    def cell(
        self,
        limits: CellLimits | None = None,
        *,
        undoable: bool = True,
        collect: bool = False,
        canonical: bool | None = None,
    ) -> Iterator[Cell]:
        """Run one cell: ``with runner.cell() as cell: cell.run(fn)``.

        ``limits`` overrides the session limits for this cell.  After the
        block, ``cell.outcome`` (also ``runner.last``) says what happened.

        ``undoable=False`` is for a cell that only changes a front end's
        settings (``%limits``) or undoes (``%undo``): :meth:`undo` then
        still undoes the cell before it.  ``collect=True`` runs a full
        garbage collection before the cell (after what the previous cell
        left for :meth:`undo` is freed), which empties CPython's free lists:
        :class:`AllocationCounter` starts every run so.

        ``canonical`` (by default: when the cell has an allocation limit)
        starts the cell from the same collector state whatever ran before it
        (``canonical_collector`` in ``_cells.py``), so that what a front end
        did between cells does not change the cell's allocation count.
        """
        limits = limits or self.limits
        if undoable:
            # What the previous cell rebound or deleted is freed here, before
            # this cell's checkpoint: undo costs no memory during a cell.
            self._undo = None
            self._undo_reason = _LAST_UNFINISHED
        if canonical is None:
            canonical = limits.allocations is not None
        try:
            if collect:
                gc.collect()
            elif canonical:
                canonical_collector()
        except Exception:  # finalizers' errors are unraisable; this is belt and braces
            pass
        cell = Cell(self, limits)
        outcome = cell.outcome
        if self._ns is not None and "__builtins__" not in self._ns:
            # What ``exec(code, namespace)`` would add during the cell: added
            # before the checkpoint, it is not reported as the cell's doing
            # ("rolled back: __builtins__ (added)") nor removed by a rollback.
            try:
                self._ns["__builtins__"] = builtins.__dict__
            except Exception:  # a mapping that refuses it: exec would fail the same way
                pass
        checkpoints = self._checkpoint(outcome) if self.rollback else []
        previous_limit = get_global_memory_limit()
        try:
            if limits.memory is not None:
                set_global_memory_limit(limits.memory)
            _sampler.ensure_started()
            _sampler.reset_peak_rss()
            _sampler.set_track_rss(True)
            start_rss = _sampler.rss_bytes()
        except BaseException:
            set_global_memory_limit(previous_limit)
            raise
        start = time.perf_counter()
        self._current = cell
        try:
            yield cell
        finally:
            self._current = None
            # A cell is interrupted iff one of its tasks was (Cell.run): a
            # token set when no task of the cell follows interrupts nothing.
            try:
                outcome.wall_time_s = time.perf_counter() - start
                outcome.allocated_bytes = cell._allocated
                _sampler.set_track_rss(False)
                outcome.peak_rss_bytes = max(
                    start_rss, _sampler.peak_rss_bytes(), _sampler.rss_bytes()
                )
            except Exception as e:
                outcome.failures.append(
                    BookkeepingFailure("figures", "the cell's figures", describe_exception(e))
                )
            if (outcome.interrupted or cell._discard) and checkpoints:
                outcome.rollback = self._rollback(checkpoints, outcome.failures)
            if undoable:
                self._keep_for_undo(cell, checkpoints)
            if outcome.interrupted:
                if outcome.reason == "memory":
                    # From the cell's peak: the interrupted frames freed most
                    # of it as they unwound, before we get here.
                    try:
                        release_memory()
                        outcome.freed_bytes = max(0, outcome.peak_rss_bytes - _sampler.rss_bytes())
                    except Exception as e:
                        outcome.failures.append(
                            BookkeepingFailure("release", "release_memory", describe_exception(e))
                        )
            if limits.memory is not None:
                set_global_memory_limit(previous_limit)
            self.last = outcome

    def _checkpoint(self, outcome: CellOutcome) -> list[tuple[Guarded[Any], Any]]:
        """Checkpoints of the namespace and the tracked values; a value whose
        checkpoint fails is left out (and reported): the cell still runs."""
        guards: list[Guarded[Any]] = list(tracked_guards())
        if self._namespace is not None:
            guards.insert(0, self._namespace)
        checkpoints = []
        for guard in guards:
            try:
                checkpoints.append((guard, guard.checkpoint()))
            except BaseException as e:  # user code: SystemExit, KeyboardInterrupt too
                error = f"{guard.snapshot_method()} raised {describe_exception(e)}"
                outcome.failures.append(
                    BookkeepingFailure("checkpoint", self._culprit(guard), error)
                )
        return checkpoints

    def _keep_for_undo(self, cell: Cell, checkpoints: list[tuple[Guarded[Any], Any]]) -> None:
        """After an undoable cell: keep its checkpoints for :meth:`undo`, or
        say why there is nothing to undo."""
        if cell.outcome.interrupted:
            self._undo_reason = _LAST_INTERRUPTED
        elif cell._discard:
            self._undo_reason = _LAST_DISCARDED
        elif not self.rollback:
            self._undo_reason = _NO_ROLLBACK
        else:
            self._undo = [(weakref.ref(guard), checkpoint) for guard, checkpoint in checkpoints]

    def _rollback(
        self, checkpoints: list[tuple[Guarded[Any], Any]], failures: list[BookkeepingFailure]
    ) -> RollbackReport:
        """Roll every value back on its own: one that fails is reported (in
        ``failures``) and the others are still rolled back."""
        report = RollbackReport()
        for guard, checkpoint in checkpoints:
            try:
                part = guard.rollback(checkpoint)
            except BaseException as e:  # user code: SystemExit, KeyboardInterrupt too
                error = f"{guard.restore_method(checkpoint)} raised {describe_exception(e)}"
                failures.append(BookkeepingFailure("rollback", self._culprit(guard), error))
                continue
            for failed in part.failed:
                failures.append(BookkeepingFailure("rollback", self._culprit(guard), failed))
            report = report.merge(replace(part, failed=()))
        return report

    def _culprit(self, guard: Guarded[Any]) -> str:
        return "the namespace" if guard is self._namespace else f"Guarded {guard.name!r}"
