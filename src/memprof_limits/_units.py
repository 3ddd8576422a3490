"""Byte quantities as humans write them: ``512 MiB``, ``10GB``, ``1_000_000``."""

from __future__ import annotations

import re

__all__ = ["MAX_BYTES", "format_bytes", "parse_bytes"]

#: The largest size the library accepts: every limit ends in a C ``int64_t``.
MAX_BYTES = 2**63 - 1

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
# Every unit divides 10**_FRACTION_DIGITS, so digits below 10**-_FRACTION_DIGITS
# cannot change the rounded-down result (see _exact_bytes).
_FRACTION_DIGITS = 40
assert all(10**_FRACTION_DIGITS % unit == 0 for unit in _UNITS.values())
# 10**_MAGNITUDE is more than MAX_BYTES; 10**-_TINY times any unit is less than 1.
_MAGNITUDE = len(str(MAX_BYTES))
_TINY = len(str(max(_UNITS.values())))
assert 10 ** (_MAGNITUDE - 1) <= MAX_BYTES < 10**_MAGNITUDE
assert max(_UNITS.values()) < 10**_TINY

# Matched against the stripped string; ASCII digits and unit letters only (no
# re.I: under it [a-z] matches the Kelvin sign), no sign before the number.
_PATTERN = re.compile(
    r"(?P<int>[0-9][0-9_]*)(?:\.(?P<frac>[0-9]*))?"
    r"(?:[eE](?P<esign>[+-]?)(?P<exp>[0-9]+))?"
    r"\s*(?P<unit>[A-Za-z]*)"
)
_EXPECTED = (
    "expected a non-negative number of bytes, at most 2**63 - 1 = "
    f"{MAX_BYTES}: an int, or a string such as "
    "'512 MiB', '10GB', '1.5 GiB' or '80000' (units: B, kB, MB, GB, TB, KiB, MiB, GiB, TiB)"
)
_TOO_LARGE = (
    f"expected at most 2**63 - 1 = {MAX_BYTES} bytes (about 8 EiB, the largest size "
    "the C engine can represent)"
)


def parse_bytes(value: int | str, *, what: str = "limit") -> int:
    """Return ``value`` as a whole number of bytes, at most :data:`MAX_BYTES`.

    Accepts a non-negative ``int`` or a string made of a number and an
    optional unit (decimal ``kB``/``MB``/``GB``/``TB`` or binary
    ``KiB``/``MiB``/``GiB``/``TiB``; case-insensitive; spaces allowed around
    and between).  The number is digits, with ``_`` allowed after the first
    one, an optional fraction (``1.5``) and an optional exponent (``2e9``,
    ``1.5E-3``); it takes no sign (``"+5MB"`` is refused like ``"-5MB"``).
    The string is read exactly (no float rounding), then the fraction of a
    byte is rounded down: ``"1.5 KiB"`` is 1536, ``"0.5 B"`` is 0.

    Raises:
        TypeError: for ``bool``, ``float`` and other types (a float is refused
            so that ``1e9`` vs ``10**9`` is never a silent surprise: use
            ``"1e9"`` or an int).
        ValueError: for negative numbers, NaN, infinity, an unparsable
            string, or more than ``MAX_BYTES`` = ``2**63 - 1`` bytes, the
            largest size the C engine can represent.

    >>> parse_bytes("512 MiB")
    536870912
    >>> parse_bytes("10GB")
    10000000000
    >>> parse_bytes("1.5 KiB"), parse_bytes("0.5 B"), parse_bytes("9007199254740993")
    (1536, 0, 9007199254740993)
    """
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise TypeError(f"{what}: {_EXPECTED}; got {type(value).__name__} {_shown(value)}")
    if isinstance(value, int):
        n = int.__index__(value)  # a plain int, even from a subclass
        if n < 0:
            raise ValueError(f"{what}: {_EXPECTED}; got {_shown(n)}")
        if n > MAX_BYTES:
            raise ValueError(f"{what}: {_TOO_LARGE}; got {_shown(n)}")
        return n
    match = _PATTERN.fullmatch(value.strip())
    if match is None or match["unit"].lower() not in _UNITS:
        raise ValueError(f"{what}: {_EXPECTED}; got {_shown(value)}")
    parsed = _exact_bytes(match)
    if parsed is None or parsed > MAX_BYTES:
        raise ValueError(f"{what}: {_TOO_LARGE}; got {_shown(value)}")
    return parsed


def _exact_bytes(match: re.Match[str]) -> int | None:
    """``floor(number * unit)`` for a match of ``_PATTERN``, or ``None`` if clearly too large.

    ``None`` means the number alone is at least ``10**_MAGNITUDE`` (more than
    ``MAX_BYTES``).  Never builds an int much larger than ``MAX_BYTES *
    10**_FRACTION_DIGITS``, whatever the count of digits or the exponent.
    """
    unit = _UNITS[match["unit"].lower()]
    fraction = match["frac"] or ""
    exp_digits = match["exp"].lstrip("0") if match["exp"] else ""
    # No string has 10**18 characters: an exponent that large decides alone.
    exponent = int(exp_digits or "0") if len(exp_digits) <= 18 else 10**18
    if match["esign"] == "-":
        exponent = -exponent
    digits = (match["int"].replace("_", "") + fraction).lstrip("0")
    if not digits:
        return 0
    # The value is digits * 10**scale with 10**(len(digits) - 1 + scale) <= value.
    scale = exponent - len(fraction)
    if len(digits) - 1 + scale >= _MAGNITUDE:
        return None
    if len(digits) + scale <= -_TINY:
        return 0  # value < 10**-_TINY, so value * unit < 1
    # Keep the digits down to 10**-_FRACTION_DIGITS (at most about 60 of them):
    # floor(value * unit) == floor(floor(value * 10**F) / (10**F // unit)) since
    # unit divides 10**F.
    if scale < -_FRACTION_DIGITS:
        digits = digits[: len(digits) - (-_FRACTION_DIGITS - scale)]
        scale = -_FRACTION_DIGITS
        if not digits:
            return 0
    power: int = 10 ** abs(scale)
    return int(digits) * power * unit if scale >= 0 else int(digits) * unit // power


def _shown(value: object) -> str:
    """``repr(value)`` cut to a readable length (an int too long to print is described)."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 256:
        return f"an int of {value.bit_length()} bits"
    try:
        text = repr(value)
    except Exception:  # a hostile __repr__ must not hide the real error
        text = f"<{type(value).__name__} object>"
    return text if len(text) <= 80 else text[:60] + "..." + text[-16:]


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
