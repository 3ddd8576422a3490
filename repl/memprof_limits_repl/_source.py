"""Python source as cells: when an input is complete, what indentation comes
next, how a stream of lines splits into cells, and how a cell compiles.

The problem
-----------
A terminal REPL must decide, each time Enter is pressed, whether to run the
input or to continue it on a new line; a scripted REPL (stdin not a tty)
must cut a stream of lines into the same cells.  Both must agree, or a
transcript pasted into a pipe behaves differently from the same lines typed.

What does not work, and why
---------------------------
- ``codeop.compile_command(source, symbol="exec")`` alone: it calls
  ``for x in y:\\n    f(x)`` complete after its first body line, so Enter
  would run a block before the user could type its second line.
- ``symbol="single"`` (what ``code.InteractiveConsole`` uses): it refuses
  several statements in one cell (a pasted snippet), and it needs a blank
  line after *every* compound statement, also in a pipe where the next
  unindented line already says the block is over.

The solution
------------
One rule, :func:`check_complete`, used by the Enter key and by
:func:`iter_cells`: an input is *incomplete* if the compiler says more input
is needed (open bracket or string, a block header with no body, a trailing
backslash) or if its last statement starts on an indented line (a block
that may go on) and the input does not end with an empty line.  Otherwise it is *complete*,
or *invalid* (a syntax error that more input cannot fix: run it to show the
error).  In a stream, an empty line also ends a cell (unless inside brackets
or a string), and an unindented line that is not ``else``/``elif``/
``except``/``finally`` ends an indented block before it.

Known failure cases
-------------------
- A ``#`` inside a string at the end of a line is taken for a comment when
  choosing the next line's indentation (only the indentation is affected).
- In a stream, the line that ends an indented block is read before the block
  runs, so a block that calls ``input()`` reads the line after it.
"""

from __future__ import annotations
import __future__

import ast
import codeop
import linecache
import re
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from types import CodeType
from typing import Any, Literal

__all__ = [
    "CellCompiler",
    "CompiledCell",
    "Status",
    "check_complete",
    "execute_compiled",
    "iter_cells",
    "next_line_indent",
    "remember_source",
]

Status = Literal["complete", "incomplete", "invalid"]
"""What :func:`check_complete` says about an input."""

INDENT = "    "
_DEDENT_AFTER = re.compile(r"^\s*(return|pass|break|continue|raise)\b")
_BLOCK_HEADER_END = re.compile(r":\s*(#.*)?$")
_CONTINUES_BLOCK = re.compile(r"^(else|elif|except|finally)\b")


def _compile_status(source: str) -> Status:
    """What the compiler says: complete, incomplete (needs more) or invalid."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # shown once, when the cell really compiles
        try:
            code = codeop.compile_command(source, "<input>", "exec")
        except (SyntaxError, ValueError, OverflowError):
            return "invalid"
    return "incomplete" if code is None else "complete"


def _is_code(line: str) -> bool:
    stripped = line.strip()
    return bool(stripped) and not stripped.startswith("#")


def _indentation(line: str) -> str:
    return line[: len(line) - len(line.lstrip(" \t"))]


def _next_indent(lines: list[str]) -> str:
    """Indentation for the line after ``lines[-1]`` (after the last
    non-empty line if ``lines[-1]`` is empty)."""
    non_empty = [line for line in lines if line]
    last = non_empty[-1] if non_empty else ""
    indent = _indentation(last).replace("\t", INDENT)
    if _BLOCK_HEADER_END.search(last) and _is_code(last):
        return indent + INDENT
    if _DEDENT_AFTER.match(last):
        return indent[: max(0, len(indent) - len(INDENT))]
    return indent


def next_line_indent(source: str) -> str:
    """Indentation for a line after ``source``: that of its last line, one
    level more after a line ending with ``:``, one less after ``return``,
    ``pass``, ``break``, ``continue`` or ``raise``.

    >>> next_line_indent("def f():")
    '    '
    """
    return _next_indent(source.split("\n"))


def _split_header(source: str) -> tuple[str | None, str]:
    """``("%%limits ...", body)`` for a cell with a ``%%`` header line."""
    if source.lstrip().startswith("%%"):
        header, _, body = source.lstrip().partition("\n")
        return header, body
    return None, source


def check_complete(source: str) -> tuple[Status, str]:
    """Whether ``source`` is ready to run, and the indentation of the next line.

    Returns ``(status, indent)``: ``"complete"`` (run it), ``"incomplete"``
    (continue on a new line indented by ``indent``) or ``"invalid"`` (a
    syntax error that more input cannot fix: run it to show the error).

    An empty input is complete.  A REPL command (a line starting with ``%``)
    is complete.  A cell that starts with a ``%%`` header line is complete
    when its body is.  Python source is incomplete while the compiler needs
    more (open bracket, open triple-quoted string, block header without a
    body, trailing backslash) and while its last statement starts on an
    indented line (inside a block), unless the source ends with an empty
    line: that is how a block is ended.

    >>> check_complete("x = 1")
    ('complete', '')
    >>> check_complete("for i in range(3):")
    ('incomplete', '    ')
    >>> check_complete("for i in range(3):\\n    print(i)")
    ('incomplete', '    ')
    >>> check_complete("for i in range(3):\\n    print(i)\\n")
    ('complete', '')
    >>> check_complete("x = 1 +")[0]
    'invalid'
    """
    if not source.strip():
        return "complete", ""
    header, body = _split_header(source)
    if header is not None:
        if not body.strip():
            return "incomplete", ""
        return check_complete(body)
    if source.lstrip().startswith("%"):
        return "complete", ""
    lines = source.split("\n")
    status = _compile_status(source)
    if status == "incomplete":
        return status, _next_indent(lines)
    if status == "invalid":
        return status, ""
    ends_with_empty_line = len(lines) > 1 and not lines[-1].strip()
    if not ends_with_empty_line and _in_block(source, lines):
        return "incomplete", _next_indent(lines)
    return "complete", ""


_COMPOUND = (
    ast.If, ast.For, ast.AsyncFor, ast.While, ast.With, ast.AsyncWith, ast.Try,
    ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Match,
)  # fmt: skip


def _last_statement(node: ast.stmt) -> ast.stmt:
    """The statement that comes last in the source, inside compound ones."""
    while isinstance(node, _COMPOUND):
        children: list[ast.stmt] = []
        for name in ("body", "orelse", "finalbody"):
            children += getattr(node, name, [])
        for handler in getattr(node, "handlers", []):
            children += handler.body
        for case in getattr(node, "cases", []):
            children += case.body
        if not children:
            break
        node = max(children, key=lambda child: (child.lineno, child.col_offset))
    return node


def _in_block(source: str, lines: list[str]) -> bool:
    """Whether the last statement of complete ``source`` starts on an
    indented line: it is in a block that the next line may continue."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return False
    if not tree.body:
        return False
    last = _last_statement(tree.body[-1])
    return bool(_indentation(lines[last.lineno - 1]))


def _body_status(lines: list[str]) -> Status:
    """What the compiler says about ``lines`` without their ``%%`` header."""
    header, body = _split_header("\n".join(lines))
    if header is not None and not body.strip():
        return "incomplete"
    return _compile_status(body)


def _closable(lines: list[str]) -> bool:
    """Whether ``lines`` is complete but for the end of an indented block."""
    return _body_status(lines) == "complete"


def _starts_statement(line: str) -> bool:
    """An unindented line that cannot continue the block above it."""
    return (
        _is_code(line)
        and not line[0].isspace()
        and not _CONTINUES_BLOCK.match(line)
        and line[0] not in ")]}"
    )


def iter_cells(lines: Iterable[str]) -> Iterator[str]:
    """Cut a stream of lines (stdin, a file) into cells, lazily.

    A cell ends when it is complete by :func:`check_complete` (so a simple
    statement is a cell by itself), at an empty line (unless inside
    brackets or a string), or before an unindented line that starts a new
    statement after an indented block.  Leading empty lines are skipped.
    A cell is yielded as soon as it ends, before more lines are read, except
    that an indented block is ended by reading the line after it.

    >>> list(iter_cells(["x = 1", "def f():", "    return x", "print(f())"]))
    ['x = 1', 'def f():\\n    return x', 'print(f())']
    """
    buf: list[str] = []
    for raw in lines:
        line = raw.rstrip("\r\n")
        if buf and not line.strip():
            if _body_status(buf) == "incomplete":
                buf.append(line)  # inside brackets, a string, or before a block's body
                continue
            yield "\n".join(buf)
            buf = []
            continue
        if not buf and not line.strip():
            continue
        if buf and _starts_statement(line) and _closable(buf):
            yield "\n".join(buf)
            buf = []
        buf.append(line)
        if check_complete("\n".join(buf))[0] != "incomplete":
            yield "\n".join(buf)
            buf = []
    if buf:
        yield "\n".join(buf)


@dataclass(frozen=True)
class CompiledCell:
    """A cell compiled for running: ``body`` (all statements but a final
    expression) and ``last_expression`` (evaluated and shown), either may
    be ``None``."""

    body: CodeType | None
    last_expression: CodeType | None
    display: bool


class CellCompiler:
    """Compiles cells, remembering ``from __future__`` imports across cells
    (as the Python REPL does).

    The value of a final expression statement is shown (as in the Python
    REPL); a final ``;`` hides it (as in IPython).
    """

    def __init__(self) -> None:
        self.flags = 0

    def compile(self, source: str, filename: str) -> CompiledCell:
        """Compile ``source``; raises ``SyntaxError`` (or ``ValueError`` for
        null bytes, ``OverflowError``) as ``compile`` does."""
        tree = compile(source, filename, "exec", ast.PyCF_ONLY_AST | self.flags, dont_inherit=True)
        for node in tree.body:
            if isinstance(node, ast.ImportFrom) and node.module == "__future__":
                for alias in node.names:
                    feature = getattr(__future__, alias.name, None)
                    if isinstance(feature, __future__._Feature):
                        self.flags |= feature.compiler_flag
        last: CodeType | None = None
        if tree.body and isinstance(tree.body[-1], ast.Expr):
            node = tree.body.pop()
            assert isinstance(node, ast.Expr)
            expression = ast.Expression(body=node.value)
            last = compile(expression, filename, "eval", self.flags, dont_inherit=True)
        body = compile(tree, filename, "exec", self.flags, dont_inherit=True) if tree.body else None
        display = last is not None and not source.rstrip().endswith(";")
        return CompiledCell(body, last, display)


def execute_compiled(compiled: CompiledCell, namespace: dict[str, Any]) -> Any:
    """Run a compiled cell in ``namespace``: its statements, then its final
    expression.  Returns the value to show (also bound to ``_``), or
    ``None``."""
    if compiled.body is not None:
        exec(compiled.body, namespace)
    if compiled.last_expression is not None:
        value = eval(compiled.last_expression, namespace)
        if compiled.display and value is not None:
            namespace["_"] = value
            return value
    return None


def remember_source(filename: str, source: str) -> None:
    """Let tracebacks and ``inspect.getsource`` show the lines of a cell
    compiled as ``filename``."""
    lines = [line + "\n" for line in source.splitlines()]
    linecache.cache[filename] = (len(source), None, lines, filename)
