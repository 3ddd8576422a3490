"""The only module that talks to the native sampler (``memprof_limits._native``).

Two ways into the same shared object:

- ``lib`` (cffi): functions that need no GIL -- life cycle, the current
  thread's counters, atomics on a control block.  cffi releases the GIL
  around every call.
- ``_dll`` (``ctypes.PyDLL``): the [GIL] functions of ``native/sampler.h``
  -- arming another thread, masked calls, brackets.  PyDLL keeps the GIL held
  for the whole call, which is what makes "check the mask, then arm" and
  "enter the mask, then call" atomic with respect to every thread's bytecode.
"""

from __future__ import annotations

import contextlib
import ctypes
import sys
import threading
from collections.abc import Callable
from typing import Any, Final

from . import _exceptions
from . import _native as _native_module  # type: ignore[attr-defined]
from ._native import ffi, lib  # type: ignore[import-not-found,unused-ignore]

__all__ = [
    "DEFAULT_SAMPLING_RATE",
    "NO_BUDGET",
    "ThreadState",
    "allocated_bytes",
    "arm",
    "bracket",
    "masked_call",
    "masked_methods",
    "start",
    "stop",
    "thread_state",
]

DEFAULT_SAMPLING_RATE: Final = 1 / 80_000  # per byte: 1e-4 per 8-byte word
NO_BUDGET: Final = 2**63 - 1
REASON_MEMORY: Final = int(lib.ML_REASON_MEMORY)
REASON_ALLOCATIONS: Final = int(lib.ML_REASON_ALLOCATIONS)
REASON_TOKEN: Final = int(lib.ML_REASON_TOKEN)

_dll = ctypes.PyDLL(_native_module.__file__)
_py = ctypes.py_object


def _fn(name: str, restype: Any, *argtypes: Any) -> Any:
    f = getattr(_dll, name)
    f.restype = restype
    f.argtypes = list(argtypes)
    return f


_arm = _fn("ml_arm", ctypes.c_int, ctypes.c_void_p)
_bracket = _fn("ml_bracket", _py, _py, _py, _py)
_masked_call = _fn("ml_masked_call", _py, _py, _py)
_tramp_enter = _fn("ml_tramp_enter", _py, _py)
_tramp_exit = _fn("ml_tramp_exit", _py, _py, _py, _py, _py)
_async_exc_armed = _fn("ml_async_exc_armed", ctypes.c_int)
_numpy_patch = _fn("ml_numpy_patch", ctypes.c_int, ctypes.c_void_p)
_set_classes = _fn("ml_set_classes", ctypes.c_int, _py, _py, _py, _py, _py, _py)
_instancemethod = ctypes.pythonapi.PyInstanceMethod_New
_instancemethod.argtypes = [_py]
_instancemethod.restype = _py


class ThreadState:
    """Per-thread delivery state: the C control block and the open scopes.

    The control block's memory belongs to this object; the thread's TLS
    points to it while this object lives (a thread that exits drops it).
    """

    __slots__ = ("__weakref__", "ctl", "ident", "is_main", "scopes")

    def __init__(self) -> None:
        self.ctl: Any = ffi.new("ml_ctl_t *")
        self.ident = threading.get_ident()
        self.ctl.thread_id = self.ident
        self.is_main = threading.current_thread() is threading.main_thread()
        self.scopes: list[Any] = []
        lib.ml_set_ctl(self.ctl)

    def __del__(self) -> None:
        # Runs in the owner thread when it exits (threading.local cleanup);
        # elsewhere it does nothing, as that thread's TLS holds another ctl.
        with contextlib.suppress(Exception):  # interpreter shutdown
            lib.ml_detach_ctl(self.ctl)

    @property
    def address(self) -> int:
        return int(ffi.cast("uintptr_t", self.ctl))

    def add_pending(self, bits: int) -> None:
        lib.ml_ctl_add_pending(self.ctl, bits)

    def clear_pending(self, bits: int) -> None:
        lib.ml_ctl_clear_pending(self.ctl, bits)


_local = threading.local()


def thread_state() -> ThreadState:
    """The current thread's :class:`ThreadState`, created on first use."""
    try:
        st: ThreadState = _local.state
    except AttributeError:
        st = _local.state = ThreadState()
    return st


def _ensure_ctl() -> None:
    thread_state()


def _flush() -> None:
    """A no-op Python function: calling it delivers an armed exception."""


def init_native(describe: Callable[[str], str]) -> None:
    _exceptions.Interrupted._describe = describe
    _set_classes(
        _exceptions.Interrupted,
        _exceptions.MemoryLimitExceeded,
        _exceptions.AllocationLimitExceeded,
        _exceptions.Cancelled,
        _flush,
        _ensure_ctl,
    )


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
        if lib.ml_is_started():
            if sampling_rate != lib.ml_sampling_rate():
                raise RuntimeError(
                    f"memprof_limits is already started with sampling_rate="
                    f"{lib.ml_sampling_rate()!r}; call stop() before restarting it with "
                    f"{sampling_rate!r}"
                )
            return
        rc = lib.ml_start(float(sampling_rate), seed & (2**64 - 1))
        if rc:
            raise RuntimeError(f"memprof_limits.start(): {_ERRORS[rc]}")
        if "numpy" in sys.modules:
            _patch_numpy()


def ensure_started() -> None:
    if not lib.ml_is_started():
        start()
    elif not lib.ml_numpy_patched() and "numpy" in sys.modules:
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


def stop() -> None:
    """Restore the allocators that were in place before :func:`start`."""
    with _lifecycle_lock:
        rc = lib.ml_stop()
        if rc and rc != lib.ML_ERR_NOT_STARTED:
            raise RuntimeError(f"memprof_limits.stop(): {_ERRORS[rc]}")


def is_started() -> bool:
    return bool(lib.ml_is_started())


def sampling_rate() -> float:
    return float(lib.ml_sampling_rate())


def set_sampling_rate(rate: float) -> None:
    rc = lib.ml_set_sampling_rate(float(rate))
    if rc:
        raise ValueError(_ERRORS[rc])


def allocated_bytes() -> int:
    return int(lib.ml_allocated())


def samples() -> int:
    return int(lib.ml_samples())


def set_budget_end(end: int) -> None:
    lib.ml_set_budget_end(end)


def set_global_limit(limit: int | None) -> None:
    lib.ml_set_global_limit(limit or 0)


def rss_bytes() -> int:
    return int(lib.ml_rss())


def peak_rss_bytes() -> int:
    return int(lib.ml_peak_rss())


def reset_peak_rss() -> None:
    lib.ml_reset_peak_rss()


def set_track_rss(on: bool) -> None:
    lib.ml_set_track_rss(int(on))


# --------------------------------------------------------------------------
# Delivery primitives.


def arm(st: ThreadState) -> bool:
    """Arm ``st``'s thread if it has a pending reason and is not masked."""
    return bool(_arm(st.address))


def async_exc_armed() -> bool:
    """Whether an asynchronous exception is armed on the current thread."""
    return bool(_async_exc_armed())


def masked_call(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` with interrupts deferred until it returns."""
    return _masked_call(fn, args)


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
    lib.ml_record_samples(buf, n)

    def done() -> list[int]:
        count = int(lib.ml_recorded_samples())
        lib.ml_record_samples(ffi.NULL, 0)
        return [int(buf[i]) for i in range(count)]

    return done
