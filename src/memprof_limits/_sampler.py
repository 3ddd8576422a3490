"""The only module that talks to the native sampler (``memprof_limits._native``).

Two ways into the same shared object:

- ``ffi`` (cffi): the types, to allocate control blocks and token flags
  (``ffi.new``) and read their fields.
- ``_dll`` (``ctypes.PyDLL``): every function that takes no Python object
  (those that do are builtins made by ``ml_builtins``).  PyDLL keeps the GIL held
  for the whole call, which is what makes "check the mask, then arm" and
  "enter the mask, then call" atomic with respect to every thread's
  bytecode.  cffi's own calls release the GIL: under contention, getting it
  back can take a whole switch interval (5 ms) per call, so even the trivial
  getters go through PyDLL.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import sys
import threading
from collections.abc import Callable

from . import _exceptions
from ._native import ffi, lib  # type: ignore[import-not-found,unused-ignore]

TYPE_CHECKING = False  # (not typing's: the start-up path does not import typing)
if TYPE_CHECKING:
    from typing import Any, Final

__all__ = [
    "DEFAULT_SAMPLING_RATE",
    "HANDLER_ROUNDS",
    "NO_BUDGET",
    "ThreadState",
    "allocated_bytes",
    "arm",
    "bracket",
    "ffi",
    "is_interrupted",
    "lib",
    "mark_armed",
    "masked_call",
    "masked_methods",
    "native_function",
    "start",
    "stop",
    "thread_state",
]

DEFAULT_SAMPLING_RATE: Final = 1 / 80_000  # per byte: 1e-4 per 8-byte word
NO_BUDGET: Final = 2**63 - 1
REASON_MEMORY: Final[int] = int(lib.ML_REASON_MEMORY)
REASON_ALLOCATIONS: Final[int] = int(lib.ML_REASON_ALLOCATIONS)
REASON_TOKEN: Final[int] = int(lib.ML_REASON_TOKEN)
# Watchdog rounds a handler of its own interrupt gets (native/sampler.h).
HANDLER_ROUNDS: Final[int] = int(lib.ML_HANDLER_ROUNDS)

_dll = ctypes.PyDLL(sys.modules[f"{__package__}._native"].__file__)
_py = ctypes.py_object


def native_function(name: str, restype: Any, *argtypes: Any) -> Any:
    """The compiled module's function ``name``, called through PyDLL (the GIL
    held); its prototype in native/*.h is checked by tests/native/test_binding.py."""
    f = getattr(_dll, name)
    f.restype = restype
    f.argtypes = list(argtypes)
    return f


_i64 = ctypes.c_int64
_vp = ctypes.c_void_p

# The allocator hooks, the exception classes and the callbacks the C side
# holds are process-wide and belong to the main interpreter: a subinterpreter
# (which can load the module) must not replace them with objects that die
# with it.  Checked before anything below touches the C side.
if not native_function("ml_in_main_interpreter", ctypes.c_int)():
    raise ImportError(
        "memprof_limits runs in the main interpreter only (its allocator hooks are "
        "process-wide): import and start it in the main interpreter"
    )
_c_start = native_function("ml_start", ctypes.c_int, ctypes.c_double, ctypes.c_uint64)
_c_stop = native_function("ml_stop", ctypes.c_int)
_c_is_started = native_function("ml_is_started", ctypes.c_int)
_c_sampling_rate = native_function("ml_sampling_rate", ctypes.c_double)
_c_set_sampling_rate = native_function("ml_set_sampling_rate", ctypes.c_int, ctypes.c_double)
_c_allocated = native_function("ml_allocated", _i64)
_c_samples = native_function("ml_samples", _i64)
_c_set_budget_end = native_function("ml_set_budget_end", None, _i64)
_c_set_ctl = native_function("ml_set_ctl", None, _vp)
_c_detach_ctl = native_function("ml_detach_ctl", None, _vp)
_c_add_pending = native_function("ml_ctl_add_pending", None, _vp, _i64)
_c_clear_pending = native_function("ml_ctl_clear_pending", None, _vp, _i64)
_c_pending = native_function("ml_ctl_pending", _i64, _vp)
pending_changed = native_function("ml_pending_changed", None)
any_pending = native_function("ml_any_pending", ctypes.c_int)
set_tasks_open = native_function("ml_set_tasks_open", None, _i64)
_c_set_global_limit = native_function("ml_set_global_limit", None, _i64)
_c_rss = native_function("ml_rss", _i64)
_c_peak_rss = native_function("ml_peak_rss", _i64)
_c_reset_peak_rss = native_function("ml_reset_peak_rss", None)
_c_set_track_rss = native_function("ml_set_track_rss", None, ctypes.c_int)
_c_over_rss = native_function("ml_over_rss", _i64)
_c_over_block = native_function("ml_over_block", _i64)
_c_refused_blocks = native_function("ml_refused_blocks", _i64)
_c_numpy_patched = native_function("ml_numpy_patched", ctypes.c_int)
_c_record_samples = native_function("ml_record_samples", None, _vp, _i64)
_c_recorded_samples = native_function("ml_recorded_samples", _i64)
_arm = native_function("ml_arm", ctypes.c_int, ctypes.c_void_p)
_mark_armed = native_function("ml_mark_armed", None, ctypes.c_void_p, _i64)
_async_exc_armed = native_function("ml_async_exc_armed", ctypes.c_int)
_numpy_patch = native_function("ml_numpy_patch", ctypes.c_int, ctypes.c_void_p)
_set_classes = native_function(
    "ml_set_classes", ctypes.c_int, _py, _py, _py, _py, _py, _py, _py, _py
)
# The entry points that call Python are builtins (native/masking.c), not
# ctypes functions: no argument conversion that could fail (ctypes wraps a
# RecursionError in ArgumentError), and a plain C call.
(
    _masked_call,
    _quiet_call,
    _bracket,
    _tramp_enter,
    _tramp_exit,
    wrap_signal_handler,
    _after_fork_child,
    gc_first,
    gc_last,
    gc_guard,
    take_deferred_signals,
    wrap_installed_handlers,
) = native_function("ml_builtins", _py)()
_instancemethod = ctypes.pythonapi.PyInstanceMethod_New
_instancemethod.argtypes = [_py]
_instancemethod.restype = _py


class ThreadState:
    """Per-thread delivery state: the C control block and the open scopes.

    The control block's memory belongs to this object; the thread's TLS
    points to it while this object lives (a thread that exits drops it).
    ``forked`` is set in a child process created by ``os.fork`` on the state
    of the forking thread, which the child replaces by a fresh one: the
    scopes still open on it belong to the parent and no longer limit
    anything.
    """

    __slots__ = ("__weakref__", "address", "ctl", "forked", "ident", "is_main", "scopes")

    def __init__(self) -> None:
        self.ctl: Any = ffi.new("ml_ctl_t *")
        self.ident = threading.get_ident()
        self.ctl.thread_id = self.ident
        self.is_main = threading.current_thread() is threading.main_thread()
        self.scopes: list[Any] = []
        self.forked = False
        self.address = int(ffi.cast("uintptr_t", self.ctl))
        _c_set_ctl(self.address)
        if self.is_main:
            _on_main_state()

    def __del__(self) -> None:
        # Normally in the owner thread when it exits (threading.local
        # cleanup); wherever it runs, no thread's TLS may keep pointing to
        # the block (native/sampler.c, ml_detach_ctl).
        with contextlib.suppress(Exception):  # interpreter shutdown
            _c_detach_ctl(self.address)

    def pending(self) -> int:
        """The reasons pending (ML_REASON_* bits), watched tokens included."""
        return int(_c_pending(self.address))

    def add_pending(self, bits: int) -> None:
        _c_add_pending(self.address, bits)

    def clear_pending(self, bits: int) -> None:
        _c_clear_pending(self.address, bits)

    def watch_token(self, flag: Any) -> None:
        """Watch a token's flag (``int64_t *``) while a scope is open."""
        ctl = self.ctl
        if ctl.n_tokens >= lib.ML_MAX_TOKENS:
            raise RuntimeError(
                f"more than {lib.ML_MAX_TOKENS} token scopes open at once in one thread; "
                "combine tokens (a Token can be set by several parties) or nest fewer scopes"
            )
        ctl.token_flags[ctl.n_tokens] = flag
        ctl.n_tokens += 1
        if flag[0]:
            pending_changed()  # a token set before its scope opened: now pending here

    def unwatch_token(self, flag: Any) -> None:
        ctl = self.ctl
        n = int(ctl.n_tokens)
        for i in range(n - 1, -1, -1):  # normally the last one
            if ctl.token_flags[i] == flag:
                for j in range(i, n - 1):
                    ctl.token_flags[j] = ctl.token_flags[j + 1]
                ctl.n_tokens = n - 1
                return


_local = threading.local()


def thread_state() -> ThreadState:
    """The current thread's :class:`ThreadState`, created on first use."""
    try:
        st: ThreadState = _local.state
    except AttributeError:
        st = _local.state = ThreadState()
    return st


def is_interrupted() -> bool:
    """Whether the current thread's task is being interrupted.

    True from the moment one of the limits of a task running on this thread
    is reached (the interrupt is raised, or deferred by masking) until that
    task ends.  Use it in a ``release`` function to poison or roll back, and
    in ``except`` clauses to avoid swallowing an interrupt.

    >>> import memprof_limits as ml
    >>> ml.is_interrupted()
    False
    """
    st: ThreadState | None = getattr(_local, "state", None)
    return bool(st is not None and st.ctl.active > 0 and st.pending())


def _ensure_ctl() -> None:
    thread_state()


def _flush() -> None:
    """A no-op Python function: calling it delivers an armed exception."""


def _noop(*_args: Any) -> None:
    pass


# Hooks that later modules set (the C side holds our trampolines to them):
# the main-thread signal delivery (_delivery.deliver_in_handler), what runs
# once a main-thread state exists (_signals installs its handler wrappers),
# and resets in a forked child (run after the thread's own state is reset).
deliver_hook: Callable[[Any], None] = _noop
main_state_hook: Callable[[], None] = _noop
after_fork_hooks: list[Callable[[], None]] = []


def _on_main_state() -> None:
    main_state_hook()


def _deliver(frame: Any) -> None:
    deliver_hook(frame)


def _after_fork() -> None:
    """In a forked child: the forking thread gets a fresh state (no limit of
    the parent applies); the parent's open scopes stay on the old one,
    marked ``forked``.  (The C side already cleared what its hooks read.)"""
    old: ThreadState | None = getattr(_local, "state", None)
    if old is not None:
        # The control block stays the thread's: a masked region that forked is
        # still running on it (its C frames hold it), and must end masked.
        # The retired state (its scopes are the parent's) gets a blank one.
        new = ThreadState.__new__(ThreadState)
        new.ctl, new.address = old.ctl, old.address
        new.ident = threading.get_ident()
        new.ctl.thread_id = new.ident
        new.ctl.active = new.ctl.pending = new.ctl.n_tokens = new.ctl.watch_global = 0
        new.ctl.entering = new.ctl.top = ffi.NULL
        new.is_main = threading.current_thread() is threading.main_thread()
        new.scopes = []
        new.forked = False
        old.ctl = ffi.new("ml_ctl_t *")
        old.address = int(ffi.cast("uintptr_t", old.ctl))
        old.forked = True
        _local.state = new
    for hook in after_fork_hooks:
        hook()


def _describe(reason: str) -> str:
    """An interrupt's message (_scope._describe).  An interrupt exists only
    under a scope, so _scope is loaded by then: here it is only looked up."""
    from ._scope import _describe

    return _describe(reason)


def _init_native() -> None:
    """Hand the exception classes and the Python callbacks to the C side, at
    this module's import: every masked form needs them (``current_ctl``), and
    the package loads its modules on first use, in any order."""
    _exceptions.Interrupted._describe = _describe
    # Their construction runs masked from C (native/masking.c, quiet_call).
    init = _exceptions.Interrupted.__init__
    quiet_init = functools.partial(_quiet_call, init)
    quiet_init.__wrapped__ = init  # type: ignore[attr-defined]  # (inspect.signature: init's)
    _exceptions.Interrupted.__init__ = _instancemethod(quiet_init)  # type: ignore[method-assign]
    set_ = _set_classes(
        _exceptions.Interrupted,
        _exceptions.MemoryLimitExceeded,
        _exceptions.AllocationLimitExceeded,
        _exceptions.Cancelled,
        _flush,
        _ensure_ctl,
        _deliver,
        _after_fork,
    )
    if set_ != 0:
        raise ImportError("memprof_limits: not the main interpreter")


_init_native()
os.register_at_fork(after_in_child=_after_fork_child)


# --------------------------------------------------------------------------
# Engine life cycle.

_lifecycle_lock = threading.Lock()
_ERRORS = {
    int(lib.ML_ERR_ALREADY_STARTED): "the engine is already started",
    int(lib.ML_ERR_NOT_STARTED): "the engine is not started",
    int(lib.ML_ERR_NOT_ON_TOP): (
        "another allocator hook (tracemalloc?) was installed after memprof_limits.start(); "
        "stop it first (tracemalloc.stop()), then call memprof_limits.stop()"
    ),
    int(lib.ML_ERR_RATE): "sampling_rate must be a float in (0, 1] (per byte)",
}


def start(sampling_rate: float = DEFAULT_SAMPLING_RATE, *, seed: int = 0) -> None:
    """Install the allocator hooks (no-op if already started with these settings)."""
    if isinstance(sampling_rate, bool) or not isinstance(sampling_rate, float | int):
        raise TypeError(
            f"sampling_rate: expected a float in (0, 1] per byte, got {sampling_rate!r}"
        )
    if not 0 < sampling_rate <= 1:
        raise ValueError(
            f"sampling_rate: expected a float in (0, 1] per byte, got {sampling_rate!r}"
        )
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed: expected an int, got {seed!r}")
    with _lifecycle_lock:
        if _c_is_started():
            if sampling_rate != _c_sampling_rate():
                raise RuntimeError(
                    f"memprof_limits is already started with sampling_rate="
                    f"{_c_sampling_rate()!r}; call stop() before restarting it with "
                    f"{sampling_rate!r}"
                )
            return
        rc = _c_start(float(sampling_rate), seed & (2**64 - 1))
        if rc:
            raise RuntimeError(f"memprof_limits.start(): {_ERRORS[rc]}")
        if "numpy" in sys.modules:
            _patch_numpy()


def ensure_started() -> None:
    if not _c_is_started():
        start()
    elif "numpy" in sys.modules and not _c_numpy_patched():
        _patch_numpy()


def _patch_numpy() -> None:
    """Count NumPy array buffers (see ml_numpy_patch in native/sampler.c)."""
    numpy = sys.modules.get("numpy")
    core = getattr(numpy, "_core", None) or getattr(numpy, "core", None)
    capsule = getattr(getattr(core, "multiarray", None), "_ARRAY_API", None)
    if capsule is None:
        return
    get = ctypes.pythonapi.PyCapsule_GetPointer
    get.restype = ctypes.c_void_p
    get.argtypes = [_py, ctypes.c_char_p]
    api = (ctypes.c_void_p * 307).from_address(get(capsule, None))
    # PyDataMem_DefaultHandler: API slot 306, a PyObject** to a capsule.
    slot = api[306]
    handler = ctypes.c_void_p.from_address(slot).value if slot else None
    if handler:
        _numpy_patch(get(ctypes.cast(handler, _py).value, b"mem_handler"))


def ensure_started_for_task() -> None:
    """:func:`ensure_started`, for a task that has just become active: under
    the life-cycle lock, so that :func:`stop` either ran entirely before (the
    engine is started again here) or sees the task and refuses."""
    with _lifecycle_lock:
        if not _c_is_started():
            rc = _c_start(float(_c_sampling_rate()), 0)
            if rc and rc != lib.ML_ERR_ALREADY_STARTED:
                raise RuntimeError(f"memprof_limits.start(): {_ERRORS[rc]}")
    if "numpy" in sys.modules and not _c_numpy_patched():
        _patch_numpy()


def stop(refuse: Callable[[], str | None] | None = None) -> None:
    """Restore the allocators that were in place before :func:`start`;
    ``refuse()`` (under the life-cycle lock) may say why not."""
    with _lifecycle_lock:
        reason = refuse() if refuse is not None else None
        if reason:
            raise RuntimeError(f"memprof_limits.stop(): {reason}")
        rc = _c_stop()
        if rc and rc != lib.ML_ERR_NOT_STARTED:
            raise RuntimeError(f"memprof_limits.stop(): {_ERRORS[rc]}")


def is_started() -> bool:
    return bool(_c_is_started())


def sampling_rate() -> float:
    return float(_c_sampling_rate())


def set_sampling_rate(rate: float) -> None:
    rc = _c_set_sampling_rate(float(rate))
    if rc:
        raise ValueError(_ERRORS[rc])


def watch_restart() -> None:
    lib.ml_watch_restart()


def watch_sleep(interval_ns: int, idle: bool) -> None:
    """The watchdog's sleep (native/sampler.h, ``ml_watch_sleep``): through
    cffi, which releases the GIL, and allocation-free."""
    lib.ml_watch_sleep(interval_ns, idle)


def allocated_bytes() -> int:
    return int(_c_allocated())


def samples() -> int:
    return int(_c_samples())


def set_budget_end(end: int) -> None:
    _c_set_budget_end(end)


def set_global_limit(limit: int | None) -> None:
    """Bytes (0 is a real limit: every sample is over it), or ``None``."""
    _c_set_global_limit(-1 if limit is None else limit)


def rss_bytes() -> int:
    return int(_c_rss())


def peak_rss_bytes() -> int:
    return int(_c_peak_rss())


def reset_peak_rss() -> None:
    _c_reset_peak_rss()


def high_water_mark_bytes() -> int | None:
    """The process's peak resident memory since it started (``VmHWM``, the
    kernel's own: it sees what no sample saw), or ``None`` outside Linux.
    Not ``getrusage``'s ``ru_maxrss``: across ``exec`` it keeps the peak of
    the process before (a worker spawned by a big parent starts at its peak)."""
    try:
        fd = os.open("/proc/self/status", os.O_RDONLY | os.O_CLOEXEC)
        try:
            data = os.read(fd, 8192)
        finally:
            os.close(fd)
        start = data.index(b"VmHWM:") + 6
        return int(data[start : data.index(b"kB", start)]) * 1024
    except (OSError, ValueError):
        return None


def over_limit_rss_bytes() -> int:
    """The RSS read when the global limit was last found exceeded."""
    return int(_c_over_rss())


def over_limit_block_bytes() -> int:
    """The block requested counted in with that RSS (0 if none): blocks of
    1 MiB or more are checked before their pages are touched (and refused if
    the process cannot hold them within the limit)."""
    return int(_c_over_block())


def refused_blocks() -> int:
    """How many big blocks were refused so far because the process could not
    hold them within the global memory limit (the caller raised MemoryError)."""
    return int(_c_refused_blocks())


def set_track_rss(on: bool) -> None:
    _c_set_track_rss(int(on))


# --------------------------------------------------------------------------
# Delivery primitives.


def arm(st: ThreadState) -> bool:
    """Arm ``st``'s thread if it has a pending reason and is not masked."""
    return bool(_arm(st.address))


def mark_armed(st: ThreadState, pending: int) -> None:
    """The interrupt for ``pending`` is about to be raised on ``st``'s thread
    by Python code (the main thread's signal delivery): the one-cause rule
    treats its creation as that of an armed one."""
    _mark_armed(st.address, pending)


def async_exc_armed() -> bool:
    """Whether an asynchronous exception is armed on the current thread."""
    return bool(_async_exc_armed())


def masked_call(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` with interrupts deferred until it returns."""
    return _masked_call(fn, *args)


def bracket(
    acquire: Callable[[], Any],
    body: Callable[[Any], Any],
    release: Callable[[Any, Any, BaseException | None], Any],
) -> Any:
    """``release(r, v, e)`` after ``body(r)``, with ``r = acquire()``; see ml_bracket."""
    return _bracket(acquire, body, release)


def masked_methods() -> tuple[Any, Any]:
    """``(__enter__, __exit__)`` descriptors running ``self._ml_enter()`` and
    ``self._ml_exit(et, ev, tb)`` masked, entered from C (no bytecode boundary
    between the ``with`` statement and the masked region)."""
    return _instancemethod(_tramp_enter), _instancemethod(_tramp_exit)


def record_samples(n: int) -> Callable[[], list[int]]:
    """Record the byte positions of the current thread's next ``n`` samples.

    Returns a function that stops recording and returns them (tests).
    """
    buf = ffi.new("int64_t[]", n)
    _c_record_samples(int(ffi.cast("uintptr_t", buf)), n)

    def done() -> list[int]:
        count = int(_c_recorded_samples())
        _c_record_samples(None, 0)
        return [int(buf[i]) for i in range(count)]

    return done
