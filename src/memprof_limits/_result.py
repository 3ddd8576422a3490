"""``Ok`` / ``Error``: the results of the ``limit_*`` functions.

Plain classes, not dataclasses, and without ``typing`` at run time (their
types are in ``_result.pyi``): ``dataclasses`` imports ``inspect`` (and
``ast``, ``dis``, ``tokenize``), ``typing`` is a sixth of what the library's
start-up costs (benchmarks/RESULTS.md, "Start-up").
"""

from __future__ import annotations

from types import GenericAlias

__all__ = ["Error", "Ok", "Result"]


class _Frozen:
    """An immutable record of one field (``__match_args__[0]``), shown,
    compared and hashed as a frozen dataclass would be."""

    __slots__ = ()
    __match_args__: tuple[str]

    def __repr__(self) -> str:
        name = self.__match_args__[0]
        return f"{type(self).__name__}({name}={getattr(self, name)!r})"

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        name = self.__match_args__[0]
        return (getattr(self, name),) == (getattr(other, name),)  # (as a dataclass)

    def __hash__(self) -> int:
        return hash((getattr(self, self.__match_args__[0]),))

    def __reduce__(self) -> tuple[type, tuple[object]]:
        # (pickle and copy would restore the slot with setattr, which refuses)
        return type(self), (getattr(self, self.__match_args__[0]),)

    def __setattr__(self, name: str, value: object) -> None:
        kind = type(self).__name__
        raise AttributeError(f"cannot assign to field {name!r} ({kind} is immutable)")

    def __delattr__(self, name: str) -> None:
        kind = type(self).__name__
        raise AttributeError(f"cannot delete field {name!r} ({kind} is immutable)")


class Ok(_Frozen):
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


class Error(_Frozen):
    """The task's limit was reached.  ``exc`` is the last exception that
    escaped the task, or the library's interrupt if none did (the task
    swallowed it and returned)."""

    __slots__ = ("exc",)
    __match_args__ = ("exc",)

    def __init__(self, exc: BaseException) -> None:
        object.__setattr__(self, "exc", exc)


Result = Ok | Error
