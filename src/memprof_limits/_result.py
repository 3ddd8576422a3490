"""``Ok`` / ``Error``: the results of the ``limit_*`` functions.

Plain classes, not dataclasses, and without ``typing`` at run time (their
types are in ``_result.pyi``): ``dataclasses`` imports ``inspect`` (and
``ast``, ``dis``, ``tokenize``), ``typing`` is a sixth of what the library's
start-up costs (benchmarks/RESULTS.md, "Start-up").
"""

from __future__ import annotations

from types import GenericAlias

__all__ = ["Error", "Ok", "Result"]


class Ok:
    """The task finished and its limit was not reached (immutable).

    >>> match Ok(3):
    ...     case Ok(v): print(v)
    3
    """

    __slots__ = ("value",)
    __match_args__ = ("value",)
    __class_getitem__ = classmethod(GenericAlias)

    def __init__(self, value: object) -> None:
        object.__setattr__(self, "value", value)

    def __repr__(self) -> str:
        return f"Ok(value={self.value!r})"

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return (self.value,) == (other.value,)  # (as a dataclass)

    def __hash__(self) -> int:
        return hash((self.value,))

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"cannot assign to field {name!r} (Ok is immutable)")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"cannot delete field {name!r} (Ok is immutable)")


class Error:
    """The task's limit was reached.  ``exc`` is the last exception that
    escaped the task, or the library's interrupt if none did (the task
    swallowed it and returned)."""

    __slots__ = ("exc",)
    __match_args__ = ("exc",)

    def __init__(self, exc: BaseException) -> None:
        object.__setattr__(self, "exc", exc)

    def __repr__(self) -> str:
        return f"Error(exc={self.exc!r})"

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return (self.exc,) == (other.exc,)

    def __hash__(self) -> int:
        return hash((self.exc,))

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"cannot assign to field {name!r} (Error is immutable)")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"cannot delete field {name!r} (Error is immutable)")


Result = Ok | Error
