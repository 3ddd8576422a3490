"""``Ok`` / ``Error``: the results of the ``limit_*`` functions.

Plain classes, not dataclasses: ``dataclasses`` imports ``inspect`` (and
``ast``, ``dis``, ``tokenize``), a quarter of the library's start-up.
"""

from __future__ import annotations

from typing import Any, Generic, NoReturn, TypeVar

__all__ = ["Error", "Ok", "Result"]

T = TypeVar("T")


class Ok(Generic[T]):
    """The task finished and its limit was not reached (immutable).

    >>> match Ok(3):
    ...     case Ok(v): print(v)
    3
    """

    __slots__ = ("value",)
    __match_args__ = ("value",)
    value: T

    def __init__(self, value: T) -> None:
        object.__setattr__(self, "value", value)

    def __repr__(self) -> str:
        return f"Ok(value={self.value!r})"

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return (self.value,) == (other.value,)  # type: ignore[attr-defined]  # (as a dataclass)

    def __hash__(self) -> int:
        return hash((self.value,))

    def __setattr__(self, name: str, value: Any) -> NoReturn:
        raise AttributeError(f"cannot assign to field {name!r} (Ok is immutable)")

    __delattr__ = __setattr__  # type: ignore[assignment]


class Error:
    """The task's limit was reached.  ``exc`` is the last exception that
    escaped the task, or the library's interrupt if none did (the task
    swallowed it and returned)."""

    __slots__ = ("exc",)
    __match_args__ = ("exc",)
    exc: BaseException

    def __init__(self, exc: BaseException) -> None:
        object.__setattr__(self, "exc", exc)

    def __repr__(self) -> str:
        return f"Error(exc={self.exc!r})"

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return (self.exc,) == (other.exc,)  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((self.exc,))

    def __setattr__(self, name: str, value: Any) -> NoReturn:
        raise AttributeError(f"cannot assign to field {name!r} (Error is immutable)")

    __delattr__ = __setattr__  # type: ignore[assignment]


Result = Ok[T] | Error
