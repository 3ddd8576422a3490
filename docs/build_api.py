"""Generate docs/api.md, the API reference, from the docstrings.

    python docs/build_api.py            # (re)write docs/api.md
    python docs/build_api.py --check    # exit 1 if docs/api.md is not up to date

Documents everything in ``memprof_limits.__all__``, ``memprof_limits.stats``,
``memprof_limits.memprof`` and ``memprof_limits.dask`` (when Dask is installed):
signatures from ``inspect``, text from the docstrings, converted from their
reST-ish markup (``code``, :func:`roles`, doctests, ``Args:`` sections) to
Markdown.  Names that are not in a section below still get documented, under
"Other".
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "api.md"
# The checkout's packages first -- but src/ only where its native sampler is built
# (an editable install, or an in-place build): after `pip install .` the
# compiled module lives in site-packages only, and importing src/ without it fails.
_BUILT = any((ROOT / "src" / "memprof_limits").glob(f"_native.{sys.implementation.cache_tag}*"))
sys.path[:0] = [str(ROOT / "src")] * _BUILT + [str(ROOT / "kernel"), str(ROOT / "repl")]

SECTIONS: list[tuple[str, str, list[str]]] = [
    ("Limits", "Run a task under a limit; `Ok` or `Error`.", [
        "limit_allocations", "limit_global_memory", "limit_with_token", "limit_async", "LimitScope",
        "set_global_memory_limit", "get_global_memory_limit", "release_memory",
        "default_memory_limit", "DefaultMemoryLimit",
    ]),
    ("Results and interrupts", "", [
        "Ok", "Error", "Interrupted", "MemoryLimitExceeded", "AllocationLimitExceeded",
        "Cancelled", "PoisonedError", "is_interrupted",
    ]),
    ("Tokens and Ctrl+C", "", ["Token", "sigint_sets"]),
    ("Masking and resources", "Code that must not be interrupted half-way.", [
        "with_resource", "resource", "protect", "masked", "SafeMutex",
    ]),
    ("Rollback", "", ["Guarded", "RollbackReport"]),
    ("Cells", "The cell runner of the Jupyter kernel and the REPL.", [
        "CellRunner", "Cell", "CellLimits", "CellOutcome", "BookkeepingFailure", "UndoReport",
        "AllocationCounter", "AllocationCount", "MAX_RUNS",
    ]),
    ("Engine", "The native sampler; it starts on first use.", [
        "start", "stop", "is_started", "sampling_rate", "allocated_bytes",
    ]),
    ("Sizes", "", ["parse_bytes", "format_bytes", "MAX_BYTES"]),
]  # fmt: skip

EXTRA_MODULES = [
    ("memprof_limits.stats", "Statistics: the formulas of [statistical.md](statistical.md)."),
    ("memprof_limits.memprof", "The statistical allocation profiler (`%memprof`)."),
    ("memprof_limits.dask", "Limited tasks on Dask distributed ([dask.md](dask.md))."),
]


# -- docstrings to Markdown ---------------------------------------------------------------------

ROLE = re.compile(r":(?:func|class|meth|data|exc|attr|mod|obj):`~?([^`]+)`")
LITERAL = re.compile(r"``([^`]+)``")
SECTION = re.compile(r"^(Args|Arguments|Parameters|Returns|Raises|Yields|Attributes|Example|"
                     r"Examples|Note|Notes):\s*$")  # fmt: skip
ENTRY = re.compile(r"^(\*{0,2}[\w.]+)(\s*\([^)]*\))?:\s*(.*)$")


def inline(text: str, anchors: set[str]) -> str:
    def role(m: re.Match[str]) -> str:
        name = m.group(1)
        short = name.rsplit(".", 1)[-1] if name.startswith("memprof_limits.") else name
        key = short.split(".")[0].rstrip("()")
        return f"[`{short}`](#{key.lower()})" if key in anchors else f"`{short}`"

    return LITERAL.sub(r"`\1`", ROLE.sub(role, text))


def markdown(doc: str, anchors: set[str]) -> str:
    """reST-flavoured docstring -> Markdown."""
    lines = doc.splitlines()
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        if stripped.startswith(">>>"):  # a doctest block, until a blank line
            block = []
            while i < len(lines) and lines[i].strip():
                block.append(lines[i].strip() if lines[i].lstrip().startswith((">>>", "..."))
                             else lines[i].rstrip())  # fmt: skip
                i += 1
            out += ["```pycon", *block, "```"]
            continue
        if stripped.endswith("::") and not stripped.startswith(".."):  # literal block
            text = stripped[:-2].rstrip()
            if text:
                out.append(inline(text + ":", anchors))
            i += 1
            block = []
            indent = None
            while i < len(lines) and (not lines[i].strip() or indent is None
                                      or _indent(lines[i]) >= indent):  # fmt: skip
                if lines[i].strip() and indent is None:
                    indent = _indent(lines[i])
                    if indent <= _indent(line):
                        break
                block.append(lines[i][indent or 0 :] if lines[i].strip() else "")
                i += 1
            while block and not block[-1]:
                block.pop()
            out += ["", "```", *block, "```", ""]
            continue
        m = SECTION.match(stripped)
        if m and _indent(line) == 0:
            out += ["", f"**{m.group(1)}:**", ""]
            i += 1
            base = None
            while i < len(lines) and (not lines[i].strip() or _indent(lines[i]) > 0):
                entry = lines[i]
                if not entry.strip():
                    i += 1
                    continue
                base = _indent(entry) if base is None else base
                em = ENTRY.match(entry.strip())
                if _indent(entry) == base and em:
                    kind = (em.group(2) or "").strip()
                    out.append(f"- `{em.group(1)}`{' ' + kind if kind else ''}: "
                               f"{inline(em.group(3), anchors)}")  # fmt: skip
                elif _indent(entry) == base:
                    out.append(f"- {inline(entry.strip(), anchors)}")
                else:  # a continuation line
                    out[-1] += " " + inline(entry.strip(), anchors)
                i += 1
            out.append("")
            continue
        if re.fullmatch(r"-{3,}|={3,}", stripped) and out and out[-1].strip():
            out[-1:] = ["", f"#### {out[-1].strip()}", ""]  # a reST section title
            i += 1
            continue
        out.append(inline(line, anchors))
        i += 1
    text = "\n".join(out)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


# -- signatures ---------------------------------------------------------------------------------


def _annotation(a: Any) -> str:
    if isinstance(a, str):
        return a
    return inspect.formatannotation(a)


def signature(obj: Any) -> str:
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return "(...)"
    params = []
    star = False
    plist = list(sig.parameters.values())
    for i, p in enumerate(plist):
        if p.kind is p.KEYWORD_ONLY and not star:
            params.append("*")
            star = True
        text = p.name
        if p.kind is p.VAR_POSITIONAL:
            text, star = "*" + p.name, True
        elif p.kind is p.VAR_KEYWORD:
            text = "**" + p.name
        if p.annotation is not p.empty:
            text += f": {_annotation(p.annotation)}"
        if p.default is not p.empty:
            text += f" = {p.default!r}" if p.annotation is not p.empty else f"={p.default!r}"
        params.append(text)
        last_positional_only = p.kind is p.POSITIONAL_ONLY and (
            i + 1 == len(plist) or plist[i + 1].kind is not p.POSITIONAL_ONLY
        )
        if last_positional_only:
            params.append("/")
    ret = ""
    if sig.return_annotation is not sig.empty and not inspect.isclass(obj):
        ret = f" -> {_annotation(sig.return_annotation)}"
    return f"({', '.join(params)}){ret}"


def _own_members(cls: type) -> list[tuple[str, Any]]:
    """Public methods and properties defined by ``cls`` itself (in source order)."""
    fields = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    members = []
    for name, value in vars(cls).items():
        if name.startswith("_") or name in fields:
            continue
        if isinstance(value, (staticmethod, classmethod)):
            value = value.__func__
        if inspect.isfunction(value) or isinstance(value, property):
            members.append((name, value))
    return members


def document(
    name: str, obj: Any, anchors: set[str], level: int = 3, anchor: str | None = None
) -> list[str]:
    hashes = "#" * level
    out = [f'<a id="{anchor or name.lower()}"></a>', ""]
    if inspect.isclass(obj):
        if issubclass(obj, BaseException):
            bases = ", ".join(b.__name__ for b in obj.__bases__)
            out.append(f"{hashes} `exception {name}({bases})`")
        else:
            out.append(f"{hashes} `class {name}{signature(obj)}`")
    elif callable(obj):
        out.append(f"{hashes} `{name}{signature(obj)}`")
    else:
        out.append(f"{hashes} `{name} = {obj!r}`")
    doc = inspect.getdoc(obj) if (inspect.isclass(obj) or callable(obj)) else None
    if doc is None and not (inspect.isclass(obj) or callable(obj)):
        doc = _attribute_doc(name)
    out += ["", markdown(doc or "(no docstring)", anchors), ""]
    if inspect.isclass(obj) and not issubclass(obj, BaseException):
        for mname, member in _own_members(obj):
            if isinstance(member, property):
                head = f"`{name}.{mname}` (property)"
                mdoc = inspect.getdoc(member)
            else:
                head = f"`{name}.{mname}{signature(member)}`"
                mdoc = inspect.getdoc(member)
            out += [f"- {head}" + (f" — {_first_paragraph(mdoc, anchors)}" if mdoc else "")]
        if _own_members(obj):
            out.append("")
    return out


_ATTRIBUTE_DOCS: dict[str, str] = {}


def _attribute_doc(name: str) -> str | None:
    return _ATTRIBUTE_DOCS.get(name)


def _collect_attribute_docs(module: ModuleType) -> None:
    """Docstrings of module constants: the string literal after ``NAME: T = value``
    (in a package, in any of its modules)."""
    paths = [Path(module.__file__ or "")]
    if hasattr(module, "__path__"):
        paths = sorted(Path(p) for d in module.__path__ for p in Path(d).glob("*.py"))
    for path in paths:
        try:
            source = path.read_text()
        except OSError:
            continue
        for m in re.finditer(r'^(\w+)(?::[^=\n]+)?=[^\n]*\n"""(.*?)"""', source, re.M | re.S):
            _ATTRIBUTE_DOCS[m.group(1)] = inspect.cleandoc(m.group(2))


def _first_paragraph(doc: str, anchors: set[str]) -> str:
    para = doc.split("\n\n")[0]
    if para.lstrip().startswith(">>>"):
        return ""
    return inline(" ".join(line.strip() for line in para.splitlines()), anchors)


# -- the page -----------------------------------------------------------------------------------


def build() -> str:
    import memprof_limits as ml

    exported = list(ml.__all__)
    placed = [n for _, _, names in SECTIONS for n in names]
    unknown = [n for n in placed if n not in exported]
    if unknown:
        raise SystemExit(f"build_api.py: not in memprof_limits.__all__: {unknown}")
    sections = [*SECTIONS]
    other = [n for n in exported if n not in placed]
    if other:
        sections.append(("Other", "", other))

    extra: list[tuple[str, str, ModuleType]] = []
    for modname, blurb in EXTRA_MODULES:
        try:
            extra.append((modname, blurb, importlib.import_module(modname)))
        except ImportError:
            continue

    anchors = set(exported)
    for _, _, module in extra:
        anchors |= set(getattr(module, "__all__", []))
        _collect_attribute_docs(module)

    lines = [
        "# API reference",
        "",
        "<!-- Generated by docs/build_api.py from the docstrings: do not edit by hand. -->",
        "",
        "`import memprof_limits as ml`. Sizes in bytes accept an int or a string such as",
        '`"512 MiB"` or `"10GB"`. See the [docs home](index.md) for the guides.',
        "",
        "## Contents",
        "",
    ]
    for title, _, names in sections:
        links = ", ".join(f"[`{n}`](#{n.lower()})" for n in names)
        lines.append(f"- **{title}**: {links}")

    def anchor_in(modname: str, name: str) -> str:
        """A name that is also one of ``memprof_limits``' gets its module's prefix."""
        prefix = modname.replace(".", "-") + "-" if name in exported else ""
        return (prefix + name).lower()

    for modname, _, module in extra:
        anchor = modname.replace(".", "-").lower()
        names = getattr(module, "__all__", [])
        links = ", ".join(f"[`{n}`](#{anchor_in(modname, n)})" for n in names)
        lines.append(f"- [`{modname}`](#{anchor}): {links}")
    lines.append("")
    for title, blurb, names in sections:
        lines += [f"## {title}", ""]
        if blurb:
            lines += [blurb, ""]
        for name in names:
            lines += document(name, getattr(ml, name), anchors)
    for modname, blurb, module in extra:
        lines += [f'<a id="{modname.replace(".", "-").lower()}"></a>', "", f"## `{modname}`", ""]
        lines += [blurb, ""]
        doc = inspect.getdoc(module)
        if doc:
            lines += [_demote(markdown(doc, anchors)), ""]
        for name in getattr(module, "__all__", []):
            lines += document(name, getattr(module, name), anchors, anchor=anchor_in(modname, name))
    text = "\n".join(lines)
    return re.sub(r"\n{3,}", "\n\n", text).rstrip() + "\n"


def _demote(text: str) -> str:
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="fail if docs/api.md is outdated")
    args = parser.parse_args(argv)
    text = build()
    if args.check:
        current = OUT.read_text() if OUT.exists() else ""
        if current != text:
            print("docs/api.md is not up to date: run python docs/build_api.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
