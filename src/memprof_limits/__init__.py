"""memprof_limits: memory limits, allocation limits and cancellation tokens
for Python code, delivered as safe asynchronous interrupts.

>>> import memprof_limits as ml
>>> ml.limit_allocations(lambda: sum(range(10)), limit="10 MB")  # doctest: +ELLIPSIS
Ok(value=(45, ...))

See README.md for a tour and docs/ for the design.
"""

from __future__ import annotations

# What ``import memprof_limits`` costs is paid by every ``memprof-limits run``,
# protocol server and Dask worker: the names below are loaded on first use
# (PEP 562), so that ``import memprof_limits; start()`` loads only the engine
# (benchmarks/RESULTS.md, "Start-up").  Type checkers see the imports.
from gc import get_freeze_count as _get_freeze_count
from importlib import import_module as _import_module

# (3.12 freezes immortal objects itself: _cells.canonical_collector tells them from a
# program's frozen objects by the count at the library's import.)
_FREEZE_COUNT_AT_IMPORT = _get_freeze_count()

TYPE_CHECKING = False  # (not typing's: the start-up path does not import typing)
if TYPE_CHECKING:
    from typing import Any as _Any

    from ._async import limit_async as limit_async
    from ._cells import BookkeepingFailure as BookkeepingFailure
    from ._cells import Cell as Cell
    from ._cells import CellLimits as CellLimits
    from ._cells import CellOutcome as CellOutcome
    from ._cells import CellRunner as CellRunner
    from ._cells import UndoReport as UndoReport
    from ._counting import MAX_RUNS as MAX_RUNS
    from ._counting import AllocationCount as AllocationCount
    from ._counting import AllocationCounter as AllocationCounter
    from ._defaults import DefaultMemoryLimit as DefaultMemoryLimit
    from ._defaults import default_memory_limit as default_memory_limit
    from ._engine import allocated_bytes as allocated_bytes
    from ._engine import is_started as is_started
    from ._engine import sampling_rate as sampling_rate
    from ._engine import start as start
    from ._engine import stop as stop
    from ._exceptions import AllocationLimitExceeded as AllocationLimitExceeded
    from ._exceptions import Cancelled as Cancelled
    from ._exceptions import Interrupted as Interrupted
    from ._exceptions import MemoryLimitExceeded as MemoryLimitExceeded
    from ._exceptions import PoisonedError as PoisonedError
    from ._masking import SafeMutex as SafeMutex
    from ._masking import masked as masked
    from ._masking import protect as protect
    from ._masking import resource as resource
    from ._masking import with_resource as with_resource
    from ._result import Error as Error
    from ._result import Ok as Ok
    from ._rollback import Guarded as Guarded
    from ._rollback import RollbackReport as RollbackReport
    from ._sampler import is_interrupted as is_interrupted
    from ._scope import LimitScope as LimitScope
    from ._scope import get_global_memory_limit as get_global_memory_limit
    from ._scope import limit_allocations as limit_allocations
    from ._scope import limit_global_memory as limit_global_memory
    from ._scope import limit_with_token as limit_with_token
    from ._scope import release_memory as release_memory
    from ._scope import set_global_memory_limit as set_global_memory_limit
    from ._sigint import sigint_sets as sigint_sets
    from ._token import Token as Token
    from ._units import MAX_BYTES as MAX_BYTES
    from ._units import format_bytes as format_bytes
    from ._units import parse_bytes as parse_bytes

_WHERE = {
    "limit_async": "_async",
    "BookkeepingFailure": "_cells",
    "Cell": "_cells",
    "CellLimits": "_cells",
    "CellOutcome": "_cells",
    "CellRunner": "_cells",
    "UndoReport": "_cells",
    "MAX_RUNS": "_counting",
    "AllocationCount": "_counting",
    "AllocationCounter": "_counting",
    "DefaultMemoryLimit": "_defaults",
    "default_memory_limit": "_defaults",
    "allocated_bytes": "_engine",
    "is_started": "_engine",
    "sampling_rate": "_engine",
    "start": "_engine",
    "stop": "_engine",
    "AllocationLimitExceeded": "_exceptions",
    "Cancelled": "_exceptions",
    "Interrupted": "_exceptions",
    "MemoryLimitExceeded": "_exceptions",
    "PoisonedError": "_exceptions",
    "SafeMutex": "_masking",
    "masked": "_masking",
    "protect": "_masking",
    "resource": "_masking",
    "with_resource": "_masking",
    "Error": "_result",
    "Ok": "_result",
    "Guarded": "_rollback",
    "RollbackReport": "_rollback",
    "LimitScope": "_scope",
    "get_global_memory_limit": "_scope",
    "is_interrupted": "_sampler",
    "limit_allocations": "_scope",
    "limit_global_memory": "_scope",
    "limit_with_token": "_scope",
    "release_memory": "_scope",
    "set_global_memory_limit": "_scope",
    "sigint_sets": "_sigint",
    "Token": "_token",
    "MAX_BYTES": "_units",
    "format_bytes": "_units",
    "parse_bytes": "_units",
}

__all__ = [  # noqa: RUF022 - plain sorted() order (tests/core/test_exports.py)
    "AllocationCount",
    "AllocationCounter",
    "AllocationLimitExceeded",
    "BookkeepingFailure",
    "Cancelled",
    "Cell",
    "CellLimits",
    "CellOutcome",
    "CellRunner",
    "DefaultMemoryLimit",
    "Error",
    "Guarded",
    "Interrupted",
    "LimitScope",
    "MAX_BYTES",
    "MAX_RUNS",
    "MemoryLimitExceeded",
    "Ok",
    "PoisonedError",
    "RollbackReport",
    "SafeMutex",
    "Token",
    "UndoReport",
    "allocated_bytes",
    "default_memory_limit",
    "format_bytes",
    "get_global_memory_limit",
    "is_interrupted",
    "is_started",
    "limit_allocations",
    "limit_async",
    "limit_global_memory",
    "limit_with_token",
    "masked",
    "parse_bytes",
    "protect",
    "release_memory",
    "resource",
    "sampling_rate",
    "set_global_memory_limit",
    "sigint_sets",
    "start",
    "stop",
    "with_resource",
]


def __getattr__(name: str) -> _Any:
    module = _WHERE.get(name)
    if module is None:
        if name.startswith("_") and not name.startswith("__"):  # a private module (ml._sampler)
            try:
                return _import_module(f".{name}", __name__)
            except ModuleNotFoundError as e:
                if e.name != f"{__name__}.{name}":
                    raise
        raise AttributeError(f"module 'memprof_limits' has no attribute {name!r}")
    value = getattr(_import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


del TYPE_CHECKING
