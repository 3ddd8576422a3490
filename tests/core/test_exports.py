"""The public surface: what __init__ re-exports, documented and typed."""

from __future__ import annotations

import ast
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import memprof_limits as ml

ROOT = Path(__file__).resolve().parents[2]


def test_all_is_sorted_and_complete() -> None:
    assert ml.__all__ == sorted(ml.__all__)
    assert all(getattr(ml, n) is not None for n in ml.__all__)  # (loaded on first use)
    public = {n for n in dir(ml) if not n.startswith("_")}
    modules = {n for n in public if inspect.ismodule(getattr(ml, n))}
    assert public - modules - {"annotations"} == set(ml.__all__)
    with pytest.raises(AttributeError, match="has no attribute 'LimitScop'"):
        ml.LimitScop  # noqa: B018


def test_start_up_loads_only_the_engine(python: Callable[..., Any]) -> None:
    """``import memprof_limits; start()`` and a first limited task load none of the heavy
    modules the library needs elsewhere (benchmarks/RESULTS.md, "Start-up": they made the
    import cost 4x a bare interpreter): names are loaded on first use."""
    proc = python(
        """
        import sys
        import memprof_limits as ml
        ml.start()
        assert ml.limit_allocations(lambda: 1, limit=10**6) == ml.Ok((1, 0))
        heavy = ["asyncio", "inspect", "dataclasses", "subprocess", "ctypes.util", "tempfile",
                 "memprof_limits._cells", "memprof_limits._async", "memprof_limits._rollback"]
        print([m for m in heavy if m in sys.modules])
        ml.CellRunner  # and the rest is there when asked for
        print("memprof_limits._cells" in sys.modules)
        """
    )
    assert proc.stdout == "[]\nTrue\n", proc


def test_every_public_object_is_documented_with_an_example() -> None:
    undocumented = [n for n in ml.__all__ if not (getattr(ml, n).__doc__ or "").strip()]
    assert undocumented == []
    functions = [n for n in ml.__all__ if inspect.isfunction(getattr(ml, n))]
    without_example = [n for n in functions if ">>>" not in (getattr(ml, n).__doc__ or "")]
    assert without_example == [], "public functions need a >>> example"


def _imports(package_dir: Path) -> set[str]:
    names = set()
    for path in package_dir.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
    return names


def test_imports_go_one_way() -> None:
    """native -> memprof_limits -> kernel or REPL; never sideways."""
    core = _imports(ROOT / "src" / "memprof_limits")
    assert not core & {"memprof_limits_kernel", "memprof_limits_repl", "IPython", "ipykernel"}
    kernel = ROOT / "kernel" / "memprof_limits_kernel"
    repl = ROOT / "repl" / "memprof_limits_repl"
    if kernel.exists():
        assert "memprof_limits_repl" not in _imports(kernel)
    if repl.exists():
        assert "memprof_limits_kernel" not in _imports(repl)


FIRST_USES = {
    "protect": "import threading\nwith ml.protect(threading.Lock()): pass",
    "SafeMutex": "with ml.SafeMutex(): pass",
    "with_resource": "assert ml.with_resource(lambda x: x, 1, lambda r: r + 1, id) == 2",
    "masked": "assert ml.masked(lambda: 3) == 3",
    "Guarded": "g = ml.Guarded([1])\nwith g.transaction(): g.value.append(2)",
    "Token": "t = ml.Token()\nt.set()\n"
    "assert isinstance(ml.limit_with_token(len, token=t), ml.Error)",
    "LimitScope": "with ml.LimitScope(allocations=10**6) as s: pass\nassert s.allocated_bytes == 0",
    "CellRunner": "r = ml.CellRunner({})\nwith r.cell() as c: c.run(lambda: 1)",
    "limit_async": "import asyncio\nasync def f(): return 1\n"
    "assert asyncio.run(ml.limit_async(f(), allocations=10**6)) == ml.Ok(1)",
    "memprof": "from memprof_limits import memprof\nmemprof.start()\nmemprof.stop()",
    "sigint_sets": "ml.sigint_sets(ml.Token())",
}


@pytest.mark.parametrize("name", sorted(FIRST_USES))
def test_each_entry_point_works_as_the_first_use(name: str, python: Callable[..., Any]) -> None:
    """The package loads its modules on first use, in whatever order a program asks for them:
    each entry point works as the very first thing a fresh interpreter does (a masked form
    used before any scope found the C side without its callbacks: SystemError)."""
    proc = python("import memprof_limits as ml\n" + FIRST_USES[name] + "\nprint('ok')")
    assert proc.stdout == "ok\n", proc


def test_the_lazy_table_and_the_type_checkers_imports_agree() -> None:
    """``__init__`` says twice where each name lives (``_WHERE`` for the loader, imports for
    type checkers): both name the same module for every name of ``__all__``."""
    tree = ast.parse((ROOT / "src" / "memprof_limits" / "__init__.py").read_text())
    typed = {
        alias.name: node.module
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module
        for alias in node.names
    }
    assert typed == ml._WHERE  # type: ignore[attr-defined]
    assert sorted(ml._WHERE) == sorted(ml.__all__)  # type: ignore[attr-defined]
