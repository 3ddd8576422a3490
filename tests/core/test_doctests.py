"""The examples in docstrings run (every public function has one)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import memprof_limits

MODULES = sorted(
    m.name
    for m in pkgutil.iter_modules(memprof_limits.__path__, "memprof_limits.")
    if not m.name.endswith(("_native", "_native_testing"))
)


@pytest.mark.parametrize("name", ["memprof_limits", *MODULES])
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
