"""Where a cell ends (Enter at the prompt, lines from a pipe), the next
line's indentation, and how cells compile."""

from __future__ import annotations

import pytest
from memprof_limits_repl import check_complete, iter_cells
from memprof_limits_repl._source import CellCompiler, next_line_indent


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("", ("complete", "")),
        ("x = 1", ("complete", "")),
        ("x = 1; y = 2", ("complete", "")),
        ("def f(): return 1", ("complete", "")),
        ("x = (1,", ("incomplete", "")),
        ('s = """abc', ("incomplete", "")),
        ("x = 1 + \\", ("incomplete", "")),
        ("for i in range(3):", ("incomplete", "    ")),
        ("for i in range(3):\n    print(i)", ("incomplete", "    ")),
        ("for i in range(3):\n    print(i)\n", ("complete", "")),
        ("for i in range(3):\n    print(i)\n    ", ("complete", "")),
        ("def f():\n    return 1", ("incomplete", "")),
        ("if x:\n    pass\nelse:", ("incomplete", "    ")),
        ("if x:  # comment\n", ("incomplete", "    ")),
        ("class A:\n    def f(self):", ("incomplete", "        ")),
        ("x = 1 +", ("invalid", "")),
        ("x = 1)", ("invalid", "")),
        ("%limits memory=1GiB", ("complete", "")),
        ("%%limits allocations=1MB", ("incomplete", "")),
        ("%%limits allocations=1MB\nx = 1", ("complete", "")),
        ("%%limits allocations=1MB\nfor i in y:", ("incomplete", "    ")),
        ("# just a comment", ("complete", "")),
        ("xs = [\n    1]", ("complete", "")),  # a continuation line is not a block
        ("if x: pass", ("complete", "")),
        ("for i in x:\n    f(\n1)", ("incomplete", "")),
        ("try:\n    pass\nexcept E:\n    y = 1", ("incomplete", "    ")),
        ("match x:\n    case 1:\n        y = 1", ("incomplete", "        ")),
        ("match x:\n    case 1:\n        pass", ("incomplete", "    ")),
    ],
)
def test_check_complete(source: str, expected: tuple[str, str]) -> None:
    assert check_complete(source) == expected


def test_a_syntax_warning_does_not_make_the_input_invalid() -> None:
    """`1 is 1` warns but compiles: it must run (and warn once), not be
    reported as a syntax error or wait for more input."""
    assert check_complete("1 is 1")[0] == "complete"


@pytest.mark.parametrize(
    ("line", "indent"),
    [
        ("x = 1", ""),
        ("    x = 1", "    "),
        ("def f():", "    "),
        ("    if x:", "        "),
        ("        return x", "    "),
        ("    pass", ""),
        ("\tx = 1", "    "),
    ],
)
def test_next_line_indent(line: str, indent: str) -> None:
    assert next_line_indent(line) == indent


def cells(text: str) -> list[str]:
    return list(iter_cells(text.split("\n")))


def test_iter_cells_simple_statements_are_cells() -> None:
    assert cells("x = 1\ny = 2\n\n\nz = 3") == ["x = 1", "y = 2", "z = 3"]


def test_iter_cells_an_unindented_line_ends_a_block() -> None:
    text = "def f():\n    return 1\nprint(f())\nfor i in range(2):\n    pass\n"
    assert cells(text) == ["def f():\n    return 1", "print(f())", "for i in range(2):\n    pass"]


def test_iter_cells_continuation_keywords_and_comments_stay_in_the_block() -> None:
    text = "if x:\n    a = 1\n# a comment\nelif y:\n    a = 2\nelse:\n    a = 3\nb = a"
    assert cells(text) == [
        "if x:\n    a = 1\n# a comment\nelif y:\n    a = 2\nelse:\n    a = 3",
        "b = a",
    ]


def test_iter_cells_an_empty_line_ends_a_cell_but_not_inside_brackets_or_strings() -> None:
    text = 'x = [\n\n1]\ns = """a\n\nb"""\nif x:\n    pass\n\n    \ny = 1'
    assert cells(text) == ["x = [\n\n1]", 's = """a\n\nb"""', "if x:\n    pass", "y = 1"]


def test_iter_cells_commands_and_limits_headers() -> None:
    text = "%limits allocations=1MB\n%%limits memory=1GiB\ndef f():\n    pass\n%last"
    assert cells(text) == [
        "%limits allocations=1MB",
        "%%limits memory=1GiB\ndef f():\n    pass",
        "%last",
    ]


def test_iter_cells_invalid_input_is_a_cell_of_its_own() -> None:
    """A syntax error ends the cell at once (it runs, to show the error)."""
    assert cells("x = 1 +\ny = 2") == ["x = 1 +", "y = 2"]


def test_iter_cells_is_lazy() -> None:
    """A simple statement is yielded before the next line is read (a cell
    that reads stdin gets the line after it)."""
    read: list[str] = []

    def lines() -> object:
        for line in ["x = 1", "y = 2"]:
            read.append(line)
            yield line

    it = iter_cells(lines())  # type: ignore[arg-type]
    assert next(it) == "x = 1"
    assert read == ["x = 1"]


def test_compiler_splits_the_last_expression() -> None:
    compiler = CellCompiler()
    cell = compiler.compile("x = 1\nx + 1", "<test>")
    assert cell.body is not None and cell.last_expression is not None and cell.display
    ns: dict[str, object] = {}
    exec(cell.body, ns)
    assert eval(cell.last_expression, ns) == 2
    assert not compiler.compile("x + 1;", "<test>").display
    only_statements = compiler.compile("x = 1", "<test>")
    assert only_statements.last_expression is None and not only_statements.display


def test_compiler_remembers_future_imports() -> None:
    compiler = CellCompiler()
    compiler.compile("from __future__ import annotations", "<a>")
    cell = compiler.compile("def f(x: undefined_name) -> None: pass\nf.__annotations__", "<b>")
    ns: dict[str, object] = {}
    assert cell.body is not None and cell.last_expression is not None
    exec(cell.body, ns)
    assert eval(cell.last_expression, ns) == {"x": "undefined_name", "return": "None"}
