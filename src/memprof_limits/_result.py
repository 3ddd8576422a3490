"""``Ok`` / ``Error``: the results of the ``limit_*`` functions."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar

__all__ = ["Error", "Ok", "Result"]

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Ok(Generic[T]):
    """The task finished and its limit was not reached.

    >>> match Ok(3):
    ...     case Ok(v): print(v)
    3
    """

    value: T


@dataclass(frozen=True, slots=True)
class Error:
    """The task's limit was reached.  ``exc`` is the last exception that
    escaped the task, or the library's interrupt if none did (the task
    swallowed it and returned)."""

    exc: BaseException


Result = Ok[T] | Error
