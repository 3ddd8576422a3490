"""The prompt in process: prompt-toolkit reads keys from a pipe
(``create_pipe_input``) and draws to ``DummyOutput``; the cells run in this
process.  Keys: ``\\r`` Enter, ``\\x03`` Ctrl+C, ``\\x04`` Ctrl+D, ``\\x0f``
Ctrl+O, ``\\x1b\\r`` Esc Enter, ``\\t`` Tab, ``\\x1b[C`` Right."""

from __future__ import annotations

import linecache
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("prompt_toolkit")

from memprof_limits_repl import COMMANDS, Session
from memprof_limits_repl._complete import NamespaceCompleter
from memprof_limits_repl._prompt import interact
from memprof_limits_repl._toolbar import toolbar_text
from prompt_toolkit.completion import CompleteEvent
from prompt_toolkit.document import Document
from prompt_toolkit.input import PipeInput, create_pipe_input
from prompt_toolkit.output import DummyOutput

import memprof_limits as ml


@pytest.fixture
def pipe() -> Iterator[PipeInput]:
    with create_pipe_input() as inp:
        yield inp


def drive(
    session: Session,
    pipe: PipeInput,
    *keys: str,
    pause_s: float = 0.0,
    history_file: Path | None = None,
) -> int:
    """Type ``keys`` into the prompt (all at once, or one chunk every
    ``pause_s`` from another thread, for what prompt-toolkit computes in the
    background: suggestions, completions) and run the REPL until it exits."""
    if pause_s:

        def feeder() -> None:
            for chunk in keys:
                time.sleep(pause_s)
                pipe.send_text(chunk)

        threading.Thread(target=feeder, daemon=True).start()
    else:
        pipe.send_text("".join(keys))
    return interact(session, input=pipe, output=DummyOutput(), history_file=history_file)


def cell_source(number: int) -> str:
    return "".join(linecache.getlines(f"<cell {number}>"))


def test_enter_runs_a_complete_statement_and_continues_an_incomplete_one(
    pipe: PipeInput,
) -> None:
    s = Session()
    status = drive(s, pipe, "x = 1\r", "def f():\r", "return x + 1\r", "\r", "y = f()\r", "\x04")
    assert status == 0
    assert s.namespace["y"] == 2
    assert s.cells_run == 3
    # Enter after `def f():` indented the body; after `return` it dedented.
    assert cell_source(2) == "def f():\n    return x + 1\n"


def test_enter_in_the_middle_of_a_multiline_input_splits_the_line(pipe: PipeInput) -> None:
    s = Session()
    # Type two lines, go up (Ctrl+P... the Up key) to the end of the first
    # line, Enter there inserts a line instead of running the cell.
    drive(s, pipe, "if True:\r", "a = 1", "\x1b[A", "\r", "b = 2", "\x1b[B", "\r\r", "\x04")
    assert s.namespace["a"] == 1 and s.namespace["b"] == 2
    assert s.cells_run == 1


def test_enter_runs_a_complete_line_wherever_the_cursor_is(pipe: PipeInput) -> None:
    s = Session()
    drive(s, pipe, "q = 12", "\x1b[D\x1b[D\x1b[D", "\r", "\x04")  # Left x3, Enter
    assert s.namespace["q"] == 12


def test_reverse_history_search_then_enter_runs_the_line_found(
    pipe: PipeInput, tmp_path: Path
) -> None:
    history = tmp_path / "history"
    history.write_text("\n# 2024-01-01 00:00:00\n+answer = 42\n")
    s = Session()
    # Ctrl+R, type "ans", Enter (leaves the search), Enter (runs "answer = 42").
    drive(s, pipe, "\x12", "ans", "\r", "\r", "\x04", pause_s=0.3, history_file=history)
    assert s.namespace["answer"] == 42


def test_ctrl_c_at_the_prompt_discards_the_input(pipe: PipeInput) -> None:
    s = Session()
    status = drive(s, pipe, "garbage = 1\x03", "def g():\r", "\x03", "z = 3\r", "\x04")
    assert status == 0
    assert s.namespace["z"] == 3
    assert "garbage" not in s.namespace and "g" not in s.namespace
    assert s.cells_run == 1


def test_ctrl_d_exits_only_on_an_empty_input(pipe: PipeInput) -> None:
    s = Session()
    assert drive(s, pipe, "w = 1\x04", "\r", "\x04") == 0
    assert s.namespace["w"] == 1


def test_exit_status_of_sys_exit(pipe: PipeInput) -> None:
    assert drive(Session(), pipe, "import sys; sys.exit(4)\r") == 4


def test_ctrl_o_inserts_a_newline_and_esc_enter_runs_the_input_as_it_is(
    pipe: PipeInput, capsys: pytest.CaptureFixture[str]
) -> None:
    s = Session()
    drive(s, pipe, "a = 2\x0fb = a * 3\r", "if True:\x1b\r", "\x04")
    assert (s.namespace["a"], s.namespace["b"]) == (2, 6)
    assert cell_source(1) == "a = 2\nb = a * 3\n"
    assert "IndentationError" in capsys.readouterr().err  # `if True:` ran as it was


def test_tab_indents_at_the_start_of_a_line(pipe: PipeInput) -> None:
    s = Session()
    drive(s, pipe, "xs = [\r", "\t1]\r", "\x04")
    assert s.namespace["xs"] == [1]
    assert cell_source(1) == "xs = [\n    1]\n"


def test_tab_completes_an_attribute(pipe: PipeInput) -> None:
    s = Session()
    drive(
        s,
        pipe,
        "import collections\r",
        "od = collections.OrderedD",
        "\t",
        "()\r",
        "\x04",
        pause_s=0.3,
    )
    assert type(s.namespace["od"]).__name__ == "OrderedDict"


def test_history_persists_and_suggests(pipe: PipeInput, tmp_path: Path) -> None:
    history = tmp_path / "sub" / "history"
    first = Session()
    drive(first, pipe, "value = 41 + 1\r", "\x04", history_file=history)
    assert "value = 41 + 1" in history.read_text()
    second = Session()
    # Typing "val" suggests the rest from the history; Right accepts it.
    drive(second, pipe, "val", "\x1b[C", "\r", "\x04", pause_s=0.3, history_file=history)
    assert second.namespace["value"] == 42


def test_limits_and_rollback_through_the_prompt(
    pipe: PipeInput, capsys: pytest.CaptureFixture[str]
) -> None:
    s = Session()
    drive(
        s,
        pipe,
        "%limits allocations=10MB\r",
        "x = 1\r",
        "x = 2; y = [str(i) for i in range(10**6)]\r",
        "\x04",
    )
    assert s.namespace["x"] == 1 and "y" not in s.namespace
    assert "rolled back: x (changed)" in capsys.readouterr().err
    toolbar = toolbar_text(s)
    assert toolbar.startswith(" RSS ") and "MiB" in toolbar.split("|")[0]
    assert "| limits: allocations=10MB |" in toolbar
    assert "| last [2]: allocation limit after 9.5 MiB, " in toolbar


def test_toolbar_before_and_after_a_cell() -> None:
    s = Session(limits=ml.CellLimits(memory=2**30))
    assert toolbar_text(s).endswith("| limits: memory=1.0 GiB | last: - ")
    s.run_cell("data = bytearray(3 * 2**20)")
    last = toolbar_text(s).split("|")[-1]
    assert last.startswith(" last [1]: 3.0 MiB in ") and last.endswith(" s "), last
    s.run_cell("%rollback off")
    assert "| limits: memory=1.0 GiB; rollback off |" in toolbar_text(s)


def completions(namespace: dict[str, object], text: str) -> list[str]:
    completer = NamespaceCompleter(namespace, COMMANDS)
    doc = Document(text, len(text))
    return [
        c.text for c in completer.get_completions(doc, CompleteEvent(completion_requested=True))
    ]


def test_completer_names_attributes_and_commands() -> None:
    import os

    ns: dict[str, object] = {"alpha": 1, "alphabet": "abc", "os": os, "_hidden": 0}
    assert completions(ns, "alph") == ["alpha", "alphabet"]
    assert "print" in completions(ns, "pri") and "while" in completions(ns, "whi")
    assert completions(ns, "_hid") == ["_hidden"]
    assert "_hidden" not in completions(ns, "")  # nothing typed: nothing offered
    assert completions(ns, "os.pa") == ["pardir", "path", "pathconf", "pathconf_names", "pathsep"]
    assert "upper" in completions(ns, "alphabet.up")
    assert completions(ns, "x = (alpha).re") == []  # no calls, no parentheses
    assert completions(ns, "%li") == ["%limits"]
    assert completions(ns, "nothing.there") == []


def test_completer_never_runs_a_property() -> None:
    calls: list[str] = []

    class Thing:
        @property
        def expensive(self) -> object:
            calls.append("ran")
            return self

    ns: dict[str, object] = {"thing": Thing()}
    assert completions(ns, "thing.exp") == ["expensive"]
    assert completions(ns, "thing.expensive.exp") == []
    assert calls == []
