"""Byte quantities as humans write them: ``512 MiB``, ``10GB``, ``1_000_000``."""

from __future__ import annotations

import math
import re

__all__ = ["format_bytes", "parse_bytes"]

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "kib": 1024,
    "m": 1000**2,
    "mb": 1000**2,
    "mib": 1024**2,
    "g": 1000**3,
    "gb": 1000**3,
    "gib": 1024**3,
    "t": 1000**4,
    "tb": 1000**4,
    "tib": 1024**4,
}
_PATTERN = re.compile(r"\s*([0-9][0-9_]*(?:\.[0-9]*)?(?:e[0-9]+)?)\s*([a-z]*)\s*", re.I)
_EXPECTED = (
    "expected a non-negative number of bytes: an int, or a string such as "
    "'512 MiB', '10GB', '1.5 GiB' or '80000' (units: B, kB, MB, GB, TB, KiB, MiB, GiB, TiB)"
)


def parse_bytes(value: int | str, *, what: str = "limit") -> int:
    """Return ``value`` as a whole number of bytes.

    Accepts a non-negative ``int`` or a string made of a number and an
    optional unit (decimal ``kB``/``MB``/``GB``/``TB`` or binary
    ``KiB``/``MiB``/``GiB``/``TiB``; case-insensitive).  Fractions are rounded
    down to a whole byte.

    Raises:
        TypeError: for ``bool``, ``float`` and other types (a float is refused
            so that ``1e9`` vs ``10**9`` is never a silent surprise: use
            ``"1e9"`` or an int).
        ValueError: for negative numbers, NaN or an unparsable string.

    >>> parse_bytes("512 MiB")
    536870912
    >>> parse_bytes("10GB")
    10000000000
    """
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise TypeError(f"{what}: {_EXPECTED}; got {type(value).__name__} {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"{what}: {_EXPECTED}; got {value}")
        return value
    match = _PATTERN.fullmatch(value)
    if match is None or match.group(2).lower() not in _UNITS:
        raise ValueError(f"{what}: {_EXPECTED}; got {value!r}")
    number = float(match.group(1).replace("_", ""))
    if not math.isfinite(number):
        raise ValueError(f"{what}: {_EXPECTED}; got {value!r}")
    return int(number * _UNITS[match.group(2).lower()])


def format_bytes(n: int | float) -> str:
    """Format a byte count compactly with binary units.

    >>> format_bytes(1536)
    '1.5 KiB'
    >>> format_bytes(12)
    '12 B'
    """
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")
