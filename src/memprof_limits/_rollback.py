"""Rollback guards: values whose changes are undone when a task is interrupted.

The third rule of recovering from interrupts is to isolate state: a task
that is interrupted half-way leaves half-made changes.  A :class:`Guarded`
value keeps a checkpoint; when the task is interrupted its changes are rolled
back to the checkpoint, otherwise they are committed.  Snapshots are shallow
by default -- O(number of entries) for mappings, lists and sets, which is
what the kernel and the REPL need for the user namespace -- and deeper state
can provide its own ``snapshot``/``restore`` functions (or
``__snapshot__``/``__restore__`` methods).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator, MutableMapping, MutableSequence, MutableSet
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from . import _sampler
from ._exceptions import Interrupted
from ._sampler import is_interrupted

__all__ = ["Guarded", "RollbackReport", "describe_exception", "display_name", "tracked_guards"]

T = TypeVar("T")

_MISSING = object()
_tracked: weakref.WeakSet[Guarded[Any]] = weakref.WeakSet()
_ENTER, _EXIT = _sampler.masked_methods()


def display_name(obj: object) -> str:
    """A name for ``obj`` in a report that cannot fail: ``str(obj)`` (an exact
    ``str`` for a ``str`` subclass, whose own ``__str__`` is not called), else
    ``<unprintable TYPE>`` when ``str`` raises or returns something else."""
    if isinstance(obj, str):
        return str.__str__(obj)
    try:
        text = str(obj)
    except BaseException:  # a hostile __str__ may raise anything (SystemExit...)
        return f"<unprintable {type(obj).__name__}>"
    if not isinstance(text, str):  # pragma: no cover - str() checks this itself
        return f"<unprintable {type(obj).__name__}>"
    return str.__str__(text)


def describe_exception(exc: BaseException) -> str:
    """``TYPE: message``; never raises (a hostile ``__str__`` gives
    ``TYPE: <unprintable TYPE>``)."""
    name = type(exc).__name__
    text = display_name(exc)
    return f"{name}: {text}" if text else name


@dataclass(frozen=True)
class RollbackReport:
    """What a rollback undid.  For mappings, the keys a task added, changed
    or removed; for other values, whether anything was restored."""

    added: tuple[str, ...] = ()
    changed: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    restored: tuple[str, ...] = field(default=())  # names of other guarded values
    #: What could not be rolled back, one description each (a mapping key
    #: whose deletion or restoration raised); the rest was rolled back.
    failed: tuple[str, ...] = field(default=())

    def __bool__(self) -> bool:
        return bool(self.added or self.changed or self.removed or self.restored or self.failed)

    def merge(self, other: RollbackReport) -> RollbackReport:
        return RollbackReport(
            self.added + other.added,
            self.changed + other.changed,
            self.removed + other.removed,
            self.restored + other.restored,
            self.failed + other.failed,
        )

    def describe(self) -> str:
        """One line, e.g. ``rolled back: x (changed), y (added)``.  Names are
        always strings (unprintable keys are shown as ``<unprintable T>``)."""
        parts = [f"{k} (added)" for k in self.added]
        parts += [f"{k} (changed)" for k in self.changed]
        parts += [f"{k} (deleted)" for k in self.removed]
        parts += [f"{k} (restored)" for k in self.restored]
        line = "rolled back: " + ", ".join(parts) if parts else "nothing to roll back"
        if self.failed:
            line += "; could not roll back: " + ", ".join(self.failed)
        return line


class _Checkpoint:
    __slots__ = ("contents", "value")

    def __init__(self, value: Any, contents: Any) -> None:
        self.value = value
        self.contents = contents


class Guarded(Generic[T]):
    """A value whose modifications are rolled back if a task is interrupted.

    Use :meth:`transaction` around the code that modifies it, or let a
    :class:`CellRunner` do it (every ``Guarded`` created with
    ``track=True``, the default, is checkpointed before each cell of the
    kernel and the REPL and rolled back if the cell is interrupted).

    The checkpoint is shallow: a mapping's bindings, a list's or a set's
    elements, and the binding of ``.value`` itself.  For deeper state pass
    ``snapshot(value) -> state`` and ``restore(value, state)``, or give the
    value ``__snapshot__()`` and ``__restore__(state)`` methods.

    >>> import memprof_limits as ml
    >>> accounts = ml.Guarded({"alice": 10, "bob": 0})
    >>> def transfer():
    ...     with accounts.transaction():
    ...         accounts.value["alice"] -= 5
    ...         raise ml.Cancelled("interrupted half-way")
    >>> try:
    ...     transfer()
    ... except ml.Cancelled:
    ...     pass
    >>> accounts.value
    {'alice': 10, 'bob': 0}
    """

    def __init__(
        self,
        value: T,
        *,
        snapshot: Callable[[T], Any] | None = None,
        restore: Callable[[T, Any], object] | None = None,
        name: str | None = None,
        exclude: Callable[[str], bool] | None = None,
        track: bool = True,
    ) -> None:
        if (snapshot is None) != (restore is None):
            raise TypeError("Guarded: give both snapshot= and restore=, or neither")
        if name is not None and not isinstance(name, str):
            raise TypeError(f"Guarded: name: expected a str, got {type(name).__name__}")
        self.value = value
        # An exact str: reports format it, and a str subclass could override
        # __str__ / __format__.
        self.name = str.__str__(name) if name else type(value).__name__
        self._snapshot = snapshot
        self._restore = restore
        self._exclude = exclude
        if track:
            _tracked.add(self)

    def __repr__(self) -> str:
        return f"Guarded({self.value!r})"

    # -- checkpoints -------------------------------------------------------

    def snapshot_method(self) -> str:
        """What :meth:`checkpoint` calls, for error messages: ``snapshot=``,
        ``__snapshot__`` or ``copy`` (the shallow copy of a container)."""
        if self._snapshot is not None:
            return "snapshot="
        return "__snapshot__" if hasattr(type(self.value), "__snapshot__") else "copy"

    def restore_method(self, checkpoint: _Checkpoint) -> str:
        """What :meth:`rollback` calls, for error messages: ``restore=``,
        ``__restore__`` or ``restore`` (the restoration of a container)."""
        if self._restore is not None:
            return "restore="
        return "__restore__" if hasattr(type(checkpoint.value), "__restore__") else "restore"

    def checkpoint(self) -> _Checkpoint:
        """Take a checkpoint of the current state (O(size) for containers)."""
        v: Any = self.value
        if self._snapshot is not None:
            return _Checkpoint(v, self._snapshot(v))
        if hasattr(type(v), "__snapshot__"):
            return _Checkpoint(v, v.__snapshot__())
        if isinstance(v, MutableMapping):
            return _Checkpoint(v, dict(v))
        if isinstance(v, MutableSequence | MutableSet):
            return _Checkpoint(v, list(v))
        return _Checkpoint(v, None)

    def rollback(self, checkpoint: _Checkpoint) -> RollbackReport:
        """Restore the state of ``checkpoint``; report what was undone."""
        v: Any = checkpoint.value
        rebound = self.value is not v
        self.value = v
        if self._restore is not None:
            self._restore(v, checkpoint.contents)
            return RollbackReport(restored=(self.name,))
        if hasattr(type(v), "__restore__"):
            v.__restore__(checkpoint.contents)
            return RollbackReport(restored=(self.name,))
        if isinstance(v, MutableMapping):
            return self._rollback_mapping(v, checkpoint.contents)
        if isinstance(v, MutableSequence):
            changed = (
                rebound
                or len(v) != len(checkpoint.contents)
                or any(a is not b for a, b in zip(v, checkpoint.contents, strict=False))
            )
            v[:] = checkpoint.contents
            return RollbackReport(restored=(self.name,) if changed else ())
        if isinstance(v, MutableSet):
            changed = rebound or set(v) != set(checkpoint.contents)
            v.clear()
            v |= set(checkpoint.contents)
            return RollbackReport(restored=(self.name,) if changed else ())
        return RollbackReport(restored=(self.name,) if rebound else ())

    def _rollback_mapping(
        self, current: MutableMapping[Any, Any], old: dict[Any, Any]
    ) -> RollbackReport:
        # Keys are user objects: their __eq__ (on a hash collision) or the
        # exclude() predicate may raise, their __str__ too.  Each key is
        # rolled back on its own; one that fails is reported and the others
        # are still rolled back.  Names go through display_name (never str()).
        exclude = self._exclude or (lambda _k: False)
        added: list[str] = []
        changed: list[str] = []
        removed: list[str] = []
        failed: list[str] = []
        for key in list(current):
            try:
                if key in old or exclude(key):
                    continue
                del current[key]
            except BaseException as e:  # a key's __eq__ may raise anything
                failed.append(f"key {display_name(key)} ({describe_exception(e)})")
                continue
            added.append(display_name(key))
        for key, value in old.items():
            try:
                now = current.get(key, _MISSING)
                if now is value or exclude(key):  # identity first: exclude() only on changes
                    continue
                current[key] = value
            except BaseException as e:  # a key's __eq__ may raise anything
                failed.append(f"key {display_name(key)} ({describe_exception(e)})")
                continue
            (removed if now is _MISSING else changed).append(display_name(key))
        return RollbackReport(tuple(added), tuple(changed), tuple(removed), failed=tuple(failed))

    def transaction(self) -> _Transaction[T]:
        """A context manager: checkpoint on entry; roll back on exit if the
        block is left by an asynchronous exception -- an :class:`Interrupted`
        or a ``KeyboardInterrupt``, which can land half-way through it -- or
        while the task is being interrupted (:func:`is_interrupted`); commit
        otherwise (an ordinary exception is the block's own doing, as without
        a guard).  Entry and exit run masked."""
        return _Transaction(self)


class _Transaction(Generic[T]):
    __enter__ = _ENTER
    __exit__ = _EXIT

    def __init__(self, guarded: Guarded[T]) -> None:
        self._guarded = guarded
        self._checkpoint: _Checkpoint | None = None
        self.report: RollbackReport | None = None

    def _ml_enter(self) -> Guarded[T]:
        self._checkpoint = self._guarded.checkpoint()
        return self._guarded

    def _ml_exit(self, et: Any, ev: Any, tb: Any) -> bool:
        if self._checkpoint is not None and (
            isinstance(ev, (Interrupted, KeyboardInterrupt)) or is_interrupted()
        ):
            self.report = self._guarded.rollback(self._checkpoint)
        self._checkpoint = None
        return False


def tracked_guards() -> Iterator[Guarded[Any]]:
    """The live :class:`Guarded` values created with ``track=True``."""
    return iter(list(_tracked))
