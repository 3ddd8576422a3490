"""Limited tasks on Dask distributed: memory, allocation and time limits, and
cancellation of running tasks, across worker processes and machines.

    >>> from distributed import Client, LocalCluster        # doctest: +SKIP
    >>> from memprof_limits.dask import LimitsPlugin, limited
    >>> client = Client(LocalCluster(n_workers=2, threads_per_worker=1))  # doctest: +SKIP
    >>> client.register_plugin(LimitsPlugin())               # doctest: +SKIP
    >>> future = client.submit(limited(sum, allocations="10 MB"), range(10))  # doctest: +SKIP
    >>> future.result()                                      # doctest: +SKIP
    45

(Executed, with a real cluster, in ``docs/dask.md`` and ``tests/core/test_dask.py``.)

The problem
-----------
A Dask task that eats memory gets its whole worker process killed by the
nanny (at 95 % of the worker's memory limit): every task of that worker is
lost with it, and after three deaths the scheduler blames the task that
happened to run (``KilledWorker``).  A running task cannot be stopped at
all: ``Future.cancel()`` forgets the result but the worker thread runs the
function to its end (dask#1183; distributed PR #4726 is still open), and a
pure-Python loop that never returns holds its thread forever.

What does not work, and why
---------------------------
- The nanny's memory limit: it kills the process, from outside.
- ``resource.setrlimit``: a ``MemoryError`` anywhere in the worker (its
  event loop, its communication), not in the task.
- Interrupting the worker thread from the worker's own machinery: a Dask
  task is an ordinary call in a thread pool; only the task's own code may
  see an exception, and only where it is safe to.

The solution
------------
:class:`LimitsPlugin` (a worker plugin) starts this library's engine in
every worker process and sets the process's global memory limit below the
nanny's thresholds: a task that grows the process past it is interrupted
with :class:`~memprof_limits.MemoryLimitExceeded` at its next sample,
its memory is given back (:func:`~memprof_limits.release_memory`), and the
process lives on.  :func:`limited` wraps a function so that, on the worker,
it runs as a limited task (:class:`~memprof_limits.LimitScope` with the
memory limit, an allocation budget and a token).  The token is set by a
timeout (one watcher thread per process) and by the plugin when the
scheduler releases the running task (``Future.cancel``,
``Client.cancel``): the worker's state machine moves it from ``executing``
to ``cancelled``, which plugins see as a ``transition``.  A reached limit
raises the library's exception on the client, with a :class:`TaskReport`
(``exc.report``); it is an ordinary task error, so Dask does not retry it
as a lost worker.

Known failure cases
-------------------
- Cancellation reaches running tasks only on workers with the plugin; the
  other limits work without it (no memory limit unless one is set).
- A process has one memory limit and one resident memory: with several
  threads per worker, a task may be interrupted for memory that another
  task of the same process holds (the one that allocates when the process
  is over the limit is interrupted), and its ``peak_rss_bytes`` is the
  process's.  Use ``threads_per_worker=1`` for memory-hungry tasks.
- Deterministic counts need the same Python version, the same hash seed
  (``PYTHONHASHSEED`` in the workers' environment) and one task at a time
  per process: concurrent tasks share CPython's free lists.
- A task stuck in C code that does not allocate (``time.sleep(1e6)``, a
  blocking read) is interrupted when it returns to Python.
- A block bigger than the room between the plugin's limit and the nanny's
  (5 % of the worker's memory limit by default) is refused before its pages
  are touched if it comes from CPython's or NumPy's allocators (the task gets
  ``MemoryLimitExceeded``); memory from elsewhere (a C library's own
  ``malloc``, ``mmap``) touched in one C call can still get the worker
  killed.  Give such tasks room (``LimitsPlugin(memory=...)``).
- ``peak_rss_bytes`` is read at the task's samples, at its end, and from
  the kernel's high-water mark of the process: a block allocated and freed
  between two samples is missed only if the process had been bigger before.
- The memory limit is the process's: a worker whose stored results keep it
  over the limit fails every watched task (the one that runs is blamed).
- ``async def`` functions are refused (use
  :func:`~memprof_limits.limit_async` inside them).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import os
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar

try:
    import distributed
    from dask.context import thread_state  # where distributed.utils.set_thread_state sets "key"
    from distributed.diagnostics.plugin import WorkerPlugin
except ImportError as e:  # pragma: no cover - the extra is not installed
    raise ImportError(
        "memprof_limits.dask needs Dask distributed: pip install 'memprof-limits[dask]'"
    ) from e

from . import _exceptions, _sampler
from ._cells import canonical_collector
from ._defaults import default_memory_limit
from ._result import Error, Ok
from ._scope import (
    LimitScope,
    _run,
    get_global_memory_limit,
    release_memory,
    set_global_memory_limit,
)
from ._token import Token
from ._units import parse_bytes

__all__ = [
    "AllocationLimitExceeded",
    "Cancelled",
    "LimitsPlugin",
    "MemoryLimitExceeded",
    "TaskReport",
    "TaskStopped",
    "limited",
]

T = TypeVar("T")

#: The global memory limit LimitsPlugin sets by default, as a fraction of the
#: worker's memory limit: above the point where the worker pauses (80 %), below
#: the one where the nanny kills it (95 %), which is the default
#: ``distributed.worker.memory.terminate`` minus this margin when that is set.
DEFAULT_FRACTION = 0.9
_TERMINATE_MARGIN = 0.05

Why = Literal["memory", "allocations", "timeout", "cancelled"]


@dataclass(frozen=True)
class TaskReport:
    """What a limited task did (``limited(..., report=True)``, and ``exc.report``
    of a limit's exception on the client).

    Attributes:
        allocated_bytes: the bytes the task requested from CPython's allocators
            (exact; the same on every worker for the same task, Python and hash
            seed, within a few objects: docs/dask.md, "Determinism").
        peak_rss_bytes: the worker process's peak resident memory while the
            task ran (the whole process: other threads' tasks included).
        wall_time_s: the task's wall-clock time, in seconds.
        reason: ``None``, or what stopped it: ``"memory"``, ``"allocations"``,
            ``"timeout"`` or ``"cancelled"``.
        pid: the worker process.
        worker: the worker's address (``None`` outside a worker).
        where: for a stopped task, the traceback of the interrupt as text (the
            frames themselves are dropped, with the memory they hold).

    >>> from memprof_limits.dask import limited
    >>> value, report = limited(len, allocations="1 MB", report=True)("abc")
    >>> value, report.allocated_bytes >= 0, report.reason
    (3, True, None)
    """

    allocated_bytes: int
    peak_rss_bytes: int
    wall_time_s: float
    reason: Why | None
    pid: int
    worker: str | None
    where: str | None = None


class TaskStopped(Exception):
    """Base of the exceptions a limited task raises on the client.

    Each is also the library's interrupt of the same name (``except
    memprof_limits.AllocationLimitExceeded`` catches it) and an
    :class:`Exception`: on the client the task is over, there is nothing left
    to protect, and Dask's client handles only :class:`Exception` from tasks
    (a ``BaseException`` stops its event loop's callback and
    ``future.result()`` never returns).

    Attributes:
        report: the :class:`TaskReport` of the stopped task.
    """

    report: TaskReport


class AllocationLimitExceeded(_exceptions.AllocationLimitExceeded, TaskStopped):
    """The task allocated more bytes than its allocation limit."""


class MemoryLimitExceeded(_exceptions.MemoryLimitExceeded, TaskStopped):
    """The worker process exceeded its global memory limit while the task ran."""


class Cancelled(_exceptions.Cancelled, TaskStopped):
    """The task's timeout passed, or it was cancelled while it ran."""


_ON_THE_CLIENT: dict[str, type[TaskStopped]] = {
    "memory": MemoryLimitExceeded,
    "allocations": AllocationLimitExceeded,
    "timeout": Cancelled,
    "cancelled": Cancelled,
}


class Limited(Generic[T]):
    """A function wrapped by :func:`limited` (picklable if the function is)."""

    def __init__(
        self,
        fn: Callable[..., T],
        allocations: int | None,
        memory: bool | None,
        timeout_s: float | None,
        report: bool,
        deterministic: bool,
    ) -> None:
        self.fn = fn
        self.allocations = allocations
        self.memory = memory
        self.timeout_s = timeout_s
        self.report = report
        self.deterministic = deterministic
        # Dask names tasks after the function (``key_split``): keep its name.
        self.__name__ = getattr(fn, "__name__", type(fn).__name__)
        self.__qualname__ = getattr(fn, "__qualname__", self.__name__)
        self.__doc__ = getattr(fn, "__doc__", None)

    def __repr__(self) -> str:
        limits = [f"allocations={self.allocations}"] if self.allocations is not None else []
        if self.memory is not None:
            limits.append(f"memory={self.memory}")
        if self.timeout_s is not None:
            limits.append(f"timeout={self.timeout_s}")
        return f"limited({self.fn!r}{''.join(', ' + x for x in limits)})"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return _run_limited(self, args, kwargs)


def limited(
    fn: Callable[..., T],
    *,
    allocations: int | str | None = None,
    memory: bool | None = None,
    timeout: float | None = None,
    report: bool = False,
    deterministic: bool | None = None,
) -> Limited[T]:
    """Wrap ``fn`` so that a call runs it as a limited task; submit the result
    to Dask (``client.submit(limited(f, ...), *args)``, ``client.map``, a
    ``dask.delayed``).

    On the worker, ``fn(*args, **kwargs)`` runs under the limits; a reached
    limit raises :class:`~memprof_limits.AllocationLimitExceeded`,
    :class:`~memprof_limits.MemoryLimitExceeded` or
    :class:`~memprof_limits.Cancelled` (timeout, cancelled future) -- on the
    client, from ``future.result()`` -- with ``exc.report``, a
    :class:`TaskReport`.  The worker process and its thread survive.  A task
    that reaches its limit is an error even if it catches the interrupt and
    returns.  Other exceptions propagate unchanged.

    Args:
        fn: a function (not ``async def``).
        allocations: allocation budget (bytes, or ``"500 MB"``): a
            deterministic measure of work.
        memory: ``None`` (default): watched against the worker process's
            global memory limit if it has one (:class:`LimitsPlugin` sets
            it); ``True``: watched, and an error if the worker has none;
            ``False``: not watched.
        timeout: seconds of wall-clock time (a task that never allocates, a
            pure-Python loop, is stopped too).
        report: return ``(value, TaskReport)`` instead of the value.
        deterministic: start the task from a canonical state of CPython's
            collector, so that the same task counts the same bytes on every
            worker (docs/dask.md).  Default: when ``allocations`` is given.
            Its cost: nothing on 3.12 and 3.13; on 3.11 one full collection
            in a task that makes some 70 000 containers (benchmarks/RESULTS.md,
            "Dask").

    >>> from memprof_limits.dask import limited
    >>> limited(sum, allocations="1 MB")(range(10))   # called here, as a worker would
    45
    >>> limited(lambda: [str(i) for i in range(10**6)], allocations="1 MB")()
    Traceback (most recent call last):
    ...
    memprof_limits.dask.AllocationLimitExceeded: allocation limit of 1000000 bytes reached...
    """
    if not callable(fn):
        raise TypeError(f"fn: expected a function, got {fn!r}")
    if inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn):
        raise TypeError(
            f"fn: {fn!r} is an async function; limited() runs plain functions "
            "(inside a coroutine, use memprof_limits.limit_async)"
        )
    budget = None if allocations is None else parse_bytes(allocations, what="allocation limit")
    if memory is not None and not isinstance(memory, bool):
        raise TypeError(
            f"memory: expected None, True or False, got {memory!r} (the memory limit is the "
            "worker process's: LimitsPlugin(memory=...))"
        )
    timeout_s: float | None = None
    if timeout is not None:
        if isinstance(timeout, bool) or not isinstance(timeout, int | float):
            raise TypeError(f"timeout: expected a number of seconds, got {timeout!r}")
        try:
            timeout_s = float(timeout)
        except OverflowError:  # an int beyond floats
            timeout_s = math.inf
        if not (timeout_s > 0 and math.isfinite(timeout_s)):
            raise ValueError(f"timeout: expected a positive number of seconds, got {timeout!r}")
    if not isinstance(report, bool):
        raise TypeError(f"report: expected True or False, got {report!r}")
    if deterministic is None:
        deterministic = budget is not None
    elif not isinstance(deterministic, bool):
        raise TypeError(f"deterministic: expected None, True or False, got {deterministic!r}")
    return Limited(fn, budget, memory, timeout_s, report, deterministic)


# -- on the worker --------------------------------------------------------------------------


class _Control:
    """What may stop one running task besides its own limits, and which did."""

    __slots__ = ("cancelled", "timed_out", "token")

    def __init__(self) -> None:
        self.token = Token()
        self.cancelled = False
        self.timed_out = False

    def cancel(self) -> None:
        self.cancelled = True
        self.token.set()

    def time_out(self) -> None:
        self.timed_out = True
        self.token.set()


class _Running:
    """The limited tasks running in this process, by Dask key, for the
    plugin's cancellations; and the keys cancelled while they ran (until the
    worker is done with them), which a task that registers late finds."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tasks: dict[Any, list[_Control]] = {}
        self._cancelled: set[Any] = set()

    def add(self, key: Any, control: _Control) -> None:
        with self._lock:
            self._tasks.setdefault(key, []).append(control)
            if key in self._cancelled:
                control.cancel()

    def remove(self, key: Any, control: _Control) -> None:
        with self._lock:
            controls = self._tasks.get(key, [])
            if control in controls:
                controls.remove(control)
            if not controls:
                self._tasks.pop(key, None)

    def cancel(self, key: Any) -> None:
        with self._lock:
            self._cancelled.add(key)
            for control in self._tasks.get(key, []):
                control.cancel()

    def finished(self, key: Any) -> None:
        with self._lock:
            self._cancelled.discard(key)

    def forget_cancelled(self) -> None:
        with self._lock:
            self._cancelled.clear()

    def sizes(self) -> tuple[int, int]:
        """(tasks registered, keys remembered as cancelled): for the tests."""
        with self._lock:
            return len(self._tasks), len(self._cancelled)


_running = _Running()


class _Deadlines:
    """One thread per process stops the tasks whose timeout passed.  A dict,
    not a heap: it holds the running tasks of one process (at most its thread
    count), scanned when the earliest deadline passes."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._due: dict[int, tuple[float, _Control]] = {}
        self._next_id = 0
        self._thread: threading.Thread | None = None

    def add(self, timeout_s: float, control: _Control) -> int:
        with self._cond:
            if self._thread is None or not self._thread.is_alive():  # first use, or it died
                self._thread = threading.Thread(
                    target=self._loop, name="memprof-limits-deadlines", daemon=True
                )
                self._thread.start()
            self._next_id += 1
            self._due[self._next_id] = (time.monotonic() + timeout_s, control)
            self._cond.notify()
            return self._next_id

    def remove(self, handle: int) -> None:
        with self._cond:
            self._due.pop(handle, None)

    def __len__(self) -> int:
        with self._cond:
            return len(self._due)

    def _loop(self) -> None:
        with self._cond:
            while True:
                now = time.monotonic()
                for handle, (deadline, control) in list(self._due.items()):
                    if deadline <= now:
                        del self._due[handle]
                        control.time_out()
                earliest = min((d for d, _ in self._due.values()), default=None)
                if earliest is None:
                    self._cond.wait()
                else:  # (a wait longer than TIMEOUT_MAX raises OverflowError)
                    self._cond.wait(min(max(0.0, earliest - now), threading.TIMEOUT_MAX))


_deadlines = _Deadlines()


class _Peak:
    """The process's peak resident memory since the oldest running limited
    task started (the engine keeps one peak per process).  The engine reads
    the RSS at samples; a block allocated and freed between two samples is
    seen by the kernel's high-water mark, when it set a new one: it is then
    the peak (exact), else the samples' figure is."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tasks = 0
        self._mark_at_start: int | None = None

    def task_started(self) -> None:
        with self._lock:
            if self._tasks == 0:
                _sampler.reset_peak_rss()
                _sampler.set_track_rss(True)
                self._mark_at_start = _sampler.high_water_mark_bytes()
            self._tasks += 1

    def task_ended(self) -> int:
        with self._lock:
            self._tasks -= 1
            peak = max(_sampler.peak_rss_bytes(), _sampler.rss_bytes())
            mark = _sampler.high_water_mark_bytes()
            if mark is not None and self._mark_at_start is not None:
                if mark > self._mark_at_start:  # a new high since the oldest task started
                    peak = max(peak, mark)
            if self._tasks == 0:
                _sampler.set_track_rss(False)
            return peak


_peak = _Peak()


def _forget_in_fork_child() -> None:
    """No task of the parent runs in the child (the library's rule for fork): its
    registrations, deadlines and peak go, with locks the forking thread did not hold."""
    _running.__init__()  # type: ignore[misc]
    _deadlines.__init__()  # type: ignore[misc]
    _peak.__init__()  # type: ignore[misc]


os.register_at_fork(after_in_child=_forget_in_fork_child)


def _worker_address() -> str | None:
    try:
        return str(distributed.get_worker().address)
    except ValueError:  # not in a worker
        return None


def _run_limited(task: Limited[Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    _sampler.ensure_started()
    watch = task.memory
    if watch is None:
        watch = get_global_memory_limit() is not None
    elif watch and get_global_memory_limit() is None:
        raise RuntimeError(
            "limited(memory=True): this worker process has no global memory limit; register "
            "memprof_limits.dask.LimitsPlugin() with the client (or pass memory=None)"
        )
    control = _Control()
    key = getattr(thread_state, "key", None)  # the Dask task's key, in a worker thread
    scope = LimitScope(memory=watch, allocations=task.allocations, token=control.token)
    times: list[float] = []  # start, end (perf_counter)
    peaks: list[int] = []

    # The registrations take locks that the worker's event loop (the plugin) and the deadline
    # thread take too: they are made and undone masked (bracket), so that an interrupt of an
    # enclosing task (a limited call inside a limited call or a cell) cannot leave one held.
    def register() -> int | None:
        if key is not None:
            _running.add(key, control)
        try:
            handle = None if task.timeout_s is None else _deadlines.add(task.timeout_s, control)
        except BaseException:
            if key is not None:
                _running.remove(key, control)
            raise
        _peak.task_started()
        return handle

    def run(_handle: int | None) -> Ok[Any] | Error:
        if task.deterministic:
            canonical_collector()
        times.append(time.perf_counter())
        try:
            return _run(scope, lambda: task.fn(*args, **kwargs))
        finally:
            times.append(time.perf_counter())

    def unregister(handle: int | None, result: Any, exc: BaseException | None) -> Any:
        peaks.append(_peak.task_ended())
        if handle is not None:
            _deadlines.remove(handle)
        if key is not None:
            _running.remove(key, control)
        if exc is not None:
            raise exc
        return result

    result = _sampler.bracket(register, run, unregister)
    start, end = times
    wall_time_s, (peak,) = end - start, peaks
    why: Why | None = None
    if isinstance(result, Error):
        if scope.reason == "token":
            why = "cancelled" if control.cancelled or not control.timed_out else "timeout"
        else:
            why = "memory" if scope.reason == "memory" else "allocations"
    report = TaskReport(
        scope.allocated_bytes or 0, peak, wall_time_s, why, os.getpid(), _worker_address()
    )
    if isinstance(result, Error):
        raise _stopped(task, scope, result.exc, report)
    value = result.value
    if inspect.isawaitable(value) or inspect.isasyncgen(value):
        close = getattr(value, "aclose", None) or getattr(value, "close", None)
        if inspect.iscoroutine(value) and close is not None:
            close()  # (an async generator's aclose() is itself a coroutine: left to the GC)
        raise TypeError(
            f"{task.fn!r} returned {type(value).__name__} {value!r}: limited() runs plain "
            "functions, and limits only what the call itself does (inside a coroutine, use "
            "memprof_limits.limit_async)"
        )
    return (value, report) if task.report else value


def _stopped(
    task: Limited[Any], scope: LimitScope, exc: BaseException, report: TaskReport
) -> TaskStopped:
    """The limit's exception for the client, without the task's frames: the
    memory they hold goes now, not when Dask drops the error."""
    assert report.reason is not None
    where = "".join(traceback.format_exception(exc))
    chained: BaseException | None = exc  # (a refused block's MemoryError is the context)
    seen: set[int] = set()
    while chained is not None and id(chained) not in seen:
        seen.add(id(chained))
        if chained.__traceback__ is not None:
            traceback.clear_frames(chained.__traceback__)
        chained = chained.__cause__ or chained.__context__
    if report.reason == "timeout":
        message = f"timeout of {task.timeout_s:g} s reached"
    elif report.reason == "cancelled":
        message = "cancelled while it ran (Future.cancel, Client.cancel)"
    else:
        interrupt = exc if isinstance(exc, _exceptions.Interrupted) else scope._interrupt()
        message = str(interrupt)
        del interrupt
    del exc
    if report.reason == "memory":
        release_memory()
    stopped = _ON_THE_CLIENT[report.reason](
        f"{message} (worker {report.worker or '-'}, pid {report.pid})"
    )
    stopped.report = dataclasses.replace(report, where=where)
    return stopped


# -- the plugin -----------------------------------------------------------------------------


class LimitsPlugin(WorkerPlugin):
    """A worker plugin: starts the engine in every worker process, sets the
    process's global memory limit, and stops the running limited tasks that
    the scheduler releases (``Future.cancel``, ``Client.cancel``).

    Register it once per cluster: ``client.register_plugin(LimitsPlugin())``
    (workers that join later get it too).

    Args:
        memory: the global memory limit of each worker process (bytes, or
            ``"4 GiB"``).  Default: :data:`DEFAULT_FRACTION` of the worker's
            memory limit (below the nanny's ``terminate`` threshold, so that
            a task is interrupted before the nanny kills the process), or,
            for a worker without one, the library's default
            (:func:`~memprof_limits.default_memory_limit`).  ``"off"``: none.

    >>> from memprof_limits.dask import LimitsPlugin
    >>> LimitsPlugin(memory="2 GiB")
    LimitsPlugin(memory=2147483648)
    """

    name = "memprof-limits"

    def __init__(self, memory: int | str | None = None) -> None:
        if memory == "off":
            self.memory: int | Literal["off"] | None = "off"
        elif memory is None:
            self.memory = None
        else:
            self.memory = parse_bytes(memory, what="memory limit")
        self.limit_bytes: int | None = None  # set on the worker
        self._previous: int | None = None

    def __repr__(self) -> str:
        return f"LimitsPlugin(memory={self.memory!r})"

    def setup(self, worker: Any) -> None:
        # (Registered again, e.g. with another limit, Dask tears the old one down first.)
        _sampler.ensure_started()
        self._previous = get_global_memory_limit()
        self.limit_bytes = worker_memory_limit(self.memory, worker)
        set_global_memory_limit(self.limit_bytes)

    def teardown(self, worker: Any) -> None:
        # Workers of one process (processes=False) share its limit: give back the limit
        # found at setup only if it is still this plugin's.
        if get_global_memory_limit() == self.limit_bytes:
            set_global_memory_limit(self._previous)
        _running.forget_cancelled()

    def transition(self, key: Any, start: str, finish: str, **kwargs: Any) -> None:
        # The worker cannot stop a running task: it moves it from executing to
        # cancelled (plugins see the requested state, "released"), and back to
        # executing if the scheduler asks for it again before it ends.
        if start in ("executing", "long-running") and finish == "released":
            _running.cancel(key)
        elif start == "cancelled":
            _running.finished(key)


def worker_memory_limit(memory: int | Literal["off"] | None, worker: Any) -> int | None:
    """The global memory limit :class:`LimitsPlugin` sets in ``worker``'s process."""
    if memory == "off":
        return None
    if memory is not None:
        return memory
    limit = getattr(getattr(worker, "memory_manager", None), "memory_limit", None)
    if limit:
        import dask

        terminate = dask.config.get("distributed.worker.memory.terminate", 0.95)
        fraction = DEFAULT_FRACTION
        if terminate:
            fraction = min(fraction, round(float(terminate) - _TERMINATE_MARGIN, 6))
        return int(limit * fraction)
    return default_memory_limit().bytes
