"""The Python <-> C boundary is declared once (issue 16): every function ``_sampler`` and
``memprof`` call through ``native_function`` has a prototype in a header under ``native/``,
with the same number of parameters and matching C and ctypes types; and ``_sampler`` is the
only module that imports the compiled module."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src" / "memprof_limits"

# ctypes spelling (as written in the package, aliases included) -> C types it can stand for.
CTYPES = {
    "None": {"void"},
    "ctypes.c_int": {"int"},
    "_i64": {"int64_t"},
    "ctypes.c_uint64": {"uint64_t"},
    "ctypes.c_double": {"double"},
    "_vp": {"void *", "ml_ctl_t *", "int64_t *"},
    "ctypes.c_void_p": {"void *", "ml_ctl_t *", "int64_t *"},
    "_py": {"PyObject *"},
    "ctypes.py_object": {"PyObject *"},
}
PROTOTYPE = re.compile(
    r"^(?:PyAPI_FUNC\(([^)]*)\)|([A-Za-z_][\w ]*?\**))\s*\b(ml_\w+)\s*\(([^;{]*)\)\s*;",
    re.M | re.S,
)


def _normal(c_type: str) -> str:
    c_type = re.sub(r"\bconst\b", "", c_type)
    c_type = re.sub(r"\s+", " ", c_type).strip()
    return re.sub(r"\s*\*", " *", c_type).replace("* *", "**")


def prototypes() -> dict[str, tuple[str, list[str]]]:
    """name -> (return type, parameter types) of every ml_ function declared in a header."""
    found = {}
    for header in sorted((ROOT / "native").glob("*.h")):
        text = re.sub(r"/\*.*?\*/", "", header.read_text(), flags=re.S)
        for m in PROTOTYPE.finditer(text):
            ret = _normal(m.group(1) or m.group(2))
            params = [p.strip() for p in m.group(4).split(",") if p.strip()]
            types = [] if params == ["void"] else [_normal(re.sub(r"\w+$", "", p)) for p in params]
            found[m.group(3)] = (ret, types)
    return found


def declarations() -> list[tuple[str, str, list[str], str]]:
    """(name, restype, argtypes, where) of every native_function(...) call in the package."""
    calls = []
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id == "native_function"
                and node.args
                and isinstance(node.args[0], ast.Constant)
            ):
                restype, *argtypes = (ast.unparse(a) for a in node.args[1:])
                where = f"{path.relative_to(SRC)}:{node.lineno}"
                calls.append((node.args[0].value, restype, argtypes, where))
    return calls


def mismatches(
    calls: list[tuple[str, str, list[str], str]], protos: dict[str, tuple[str, list[str]]]
) -> list[str]:
    problems = []
    for name, restype, argtypes, where in calls:
        if name not in protos:
            problems.append(f"{where}: {name} has no prototype in native/*.h")
            continue
        ret, params = protos[name]
        if ret not in CTYPES.get(restype, set()):
            problems.append(f"{where}: {name} returns {ret}, declared {restype}")
        if len(params) != len(argtypes):
            problems.append(f"{where}: {name} takes {len(params)} parameters, declared {argtypes}")
            continue
        for c_type, ct in zip(params, argtypes, strict=True):
            if c_type not in CTYPES.get(ct, set()):
                problems.append(f"{where}: {name}: parameter {c_type} declared {ct}")
    return problems


def test_every_native_function_has_a_matching_prototype() -> None:
    calls = declarations()
    assert len(calls) >= 35, calls  # (the parser found them)
    assert mismatches(calls, prototypes()) == []


def test_a_wrong_declaration_is_caught() -> None:
    """The check can fail: wrong types, a wrong count, an undeclared function."""
    protos = prototypes()
    assert protos["ml_set_global_limit"] == ("void", ["int64_t"])
    assert protos["ml_set_classes"] == ("int", ["PyObject *"] * 8)
    wrong = [
        ("ml_set_global_limit", "None", ["ctypes.c_int"], "a"),
        ("ml_allocated", "ctypes.c_int", [], "b"),
        ("ml_arm", "ctypes.c_int", [], "c"),
        ("ml_nowhere", "None", [], "d"),
    ]
    assert len(mismatches(wrong, protos)) == 4, mismatches(wrong, protos)


def test_one_module_imports_the_compiled_module() -> None:
    importers = []
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level >= 1:
                names = [node.module or ""] + [a.name for a in node.names if not node.module]
                if "_native" in names:
                    importers.append(str(path.relative_to(SRC)))
    assert importers == ["_sampler.py"], importers
