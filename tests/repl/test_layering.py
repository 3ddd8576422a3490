"""The REPL never imports the kernel (DESIGN.md §2: what both need lives in
memprof_limits), and runs without prompt-toolkit for what needs no prompt."""

from __future__ import annotations

import ast
from pathlib import Path

import memprof_limits_repl

PACKAGE = Path(memprof_limits_repl.__file__).parent


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_the_repl_never_imports_the_kernel() -> None:
    files = sorted(PACKAGE.glob("*.py"))
    assert len(files) >= 8
    for path in files:
        bad = {m for m in imported_modules(path) if m.split(".")[0] == "memprof_limits_kernel"}
        assert not bad, f"{path.name} imports {bad}"


def test_only_the_prompt_modules_import_prompt_toolkit(python: object) -> None:
    """`memprof-limits run`, `-c` and piped input work without the [repl]
    extra: importing the package must not import prompt_toolkit."""
    proc = python(  # type: ignore[operator]
        "import sys, memprof_limits_repl\n"
        "assert 'prompt_toolkit' not in sys.modules, 'prompt_toolkit imported'\n"
        "assert 'pygments' not in sys.modules, 'pygments imported'\n"
    )
    assert proc.returncode == 0
