from __future__ import annotations

import pytest

from memprof_limits import format_bytes, parse_bytes


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0", 0),
        ("80000", 80_000),
        ("1_000", 1000),
        ("512 MiB", 512 * 2**20),
        ("10GB", 10 * 10**9),
        ("1.5 GiB", 3 * 2**29),
        ("2 kb", 2000),
        ("3KiB", 3072),
        ("1e6", 10**6),
        ("7 B", 7),
        (" 4 TiB ", 4 * 2**40),
    ],
)
def test_parse_bytes(text: str, expected: int) -> None:
    assert parse_bytes(text) == expected


def test_parse_bytes_names_what_it_parses() -> None:
    with pytest.raises(ValueError, match=r"^allocation limit: expected"):
        parse_bytes("lots", what="allocation limit")


@pytest.mark.parametrize(
    ("n", "text"),
    [(0, "0 B"), (1023, "1023 B"), (1536, "1.5 KiB"), (2**30, "1.0 GiB"), (5 * 2**40, "5.0 TiB")],
)
def test_format_bytes(n: int, text: str) -> None:
    assert format_bytes(n) == text
