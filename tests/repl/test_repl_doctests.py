"""The examples in the REPL package's docstrings run."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import memprof_limits_repl
import pytest

MODULES = sorted(
    m.name
    for m in pkgutil.iter_modules(memprof_limits_repl.__path__, "memprof_limits_repl.")
    if m.name != "memprof_limits_repl.__main__"
)


@pytest.mark.parametrize("name", ["memprof_limits_repl", *MODULES])
def test_docstring_examples(name: str) -> None:
    if name in ("memprof_limits_repl._prompt", "memprof_limits_repl._complete"):
        pytest.importorskip("prompt_toolkit")
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
