"""The public API as a type checker sees it (checked by test_typing.py with mypy --strict).

The package loads its names on first use (PEP 562): type checkers must still see every
re-export with its real type, not ``Any``.
"""

from __future__ import annotations

import asyncio

import memprof_limits as ml


def square(x: int) -> int:
    return x * x


r1: ml.Ok[tuple[int, int]] | ml.Error = ml.limit_allocations(lambda: square(3), limit="1 MB")
match r1:
    case ml.Ok((value, allocated)):
        total: int = value + allocated
    case ml.Error(exc):
        cause: BaseException = exc

r2: ml.Ok[str] | ml.Error = ml.limit_with_token(lambda: "done", token=ml.Token())
r3: ml.Ok[None] | ml.Error = ml.limit_global_memory(lambda: None)

with ml.LimitScope(allocations=10**6, memory=False) as scope:
    square(4)
allocated_bytes: int | None = scope.allocated_bytes
reason: str | None = scope.reason


async def coroutine() -> int:
    return 1


r4: ml.Ok[int] | ml.Error = asyncio.run(ml.limit_async(coroutine(), allocations="1 MB"))

runner = ml.CellRunner({}, limits=ml.CellLimits(allocations=10**7))
with runner.cell() as cell:
    cell.run(lambda: square(5))
interrupted: bool = cell.outcome.interrupted
size: int = ml.parse_bytes("1 MB")
text: str = ml.format_bytes(2**20)
limit: ml.DefaultMemoryLimit = ml.default_memory_limit()
