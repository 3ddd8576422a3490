"""The interactive front end: a prompt-toolkit ``PromptSession`` feeding a
:class:`Session`.

Keys (emacs mode):

- Enter runs the input when it is complete (:func:`check_complete`), else
  inserts a newline and indents, as IPython does; on a line before the last
  one it splits the line.  Where the cursor is on the last line does not
  matter (Enter after a history search runs the line found).  An empty last
  line ends a block.
- Ctrl+O inserts a newline (to put several statements in one cell, e.g.
  ``x = 2`` Ctrl+O ``while True: pass``); Esc Enter runs the input as it is.
- Tab indents at the start of a line, completes elsewhere.
- Ctrl+C discards the input (prompt-toolkit raises ``KeyboardInterrupt``
  from ``prompt()``: the terminal is in raw mode, Ctrl+C is a key, not a
  signal); while a cell runs, the terminal is cooked, Ctrl+C is SIGINT and
  interrupts the cell (:meth:`Session.sigint_to_cells`).
- Ctrl+D on an empty input exits.
"""

from __future__ import annotations

import os
import signal
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

from prompt_toolkit import PromptSession
from prompt_toolkit.auto_suggest import AutoSuggestFromHistory
from prompt_toolkit.enums import DEFAULT_BUFFER
from prompt_toolkit.filters import Condition, has_focus
from prompt_toolkit.formatted_text import AnyFormattedText
from prompt_toolkit.history import FileHistory, History, InMemoryHistory
from prompt_toolkit.input import Input
from prompt_toolkit.input.typeahead import get_typeahead, store_typeahead
from prompt_toolkit.key_binding import KeyBindings, KeyPressEvent
from prompt_toolkit.keys import Keys
from prompt_toolkit.lexers import PygmentsLexer
from prompt_toolkit.output import Output
from prompt_toolkit.patch_stdout import patch_stdout
from pygments.lexers.python import PythonLexer  # type: ignore[import-untyped,unused-ignore]

from ._complete import NamespaceCompleter
from ._errors import EXIT_OK, system_exit_status
from ._session import COMMANDS, PROMPT, PROMPT_CONTINUATION, Session
from ._source import INDENT, check_complete, next_line_indent
from ._toolbar import toolbar_text

__all__ = ["PROMPT", "PROMPT_CONTINUATION", "interact", "make_prompt_session"]


def _key_bindings() -> KeyBindings:
    kb = KeyBindings()
    focused = has_focus(DEFAULT_BUFFER)

    @kb.add("enter", filter=focused)
    def _newline_or_run(event: KeyPressEvent) -> None:
        buffer = event.current_buffer
        state = buffer.complete_state
        if state is not None and state.current_completion is not None:
            buffer.apply_completion(state.current_completion)
            return
        document = buffer.document
        on_last_line = not document.text_after_cursor.partition("\n")[2].strip()
        if not on_last_line:
            # Editing an earlier line of a multi-line input: Enter splits it.
            buffer.insert_text("\n" + next_line_indent(document.current_line_before_cursor))
            return
        status, indent = check_complete(document.text)
        if status != "incomplete":
            buffer.validate_and_handle()  # wherever the cursor is on the last line
        elif document.is_cursor_at_the_end:
            buffer.insert_text("\n" + indent)
        else:
            buffer.insert_text("\n" + next_line_indent(document.current_line_before_cursor))

    @kb.add("c-o", filter=focused)
    def _newline(event: KeyPressEvent) -> None:
        line = event.current_buffer.document.current_line_before_cursor
        event.current_buffer.insert_text("\n" + next_line_indent(line))

    @Condition
    def empty_input() -> bool:
        from prompt_toolkit.application import get_app

        return not get_app().current_buffer.text

    @kb.add("c-d", filter=focused & empty_input)
    def _exit(event: KeyPressEvent) -> None:
        # prompt-toolkit binds this too, but not in its dumb-terminal prompt
        # before 3.0.4x (seen with 3.0.40).
        event.app.exit(exception=EOFError(), style="class:exiting")

    @Condition
    def at_indentation() -> bool:
        from prompt_toolkit.application import get_app

        before = get_app().current_buffer.document.current_line_before_cursor
        return not before.strip()

    @kb.add("tab", filter=focused & at_indentation)
    def _indent(event: KeyPressEvent) -> None:
        column = len(event.current_buffer.document.current_line_before_cursor)
        event.current_buffer.insert_text(" " * (len(INDENT) - column % len(INDENT)))

    return kb


def _take_ctrl_c(prompt_input: Input) -> bool:
    """Whether Ctrl+C was typed just after Enter, too early to be a signal:
    the terminal was still in raw mode, so it is a key, either read already
    by prompt-toolkit (its typeahead) or still waiting in the terminal.  It
    is meant for the cell about to run.  Other keys stay typeahead for the
    next prompt."""
    keys = get_typeahead(prompt_input)
    try:
        keys += prompt_input.read_keys() + prompt_input.flush_keys()
    except (OSError, ValueError):  # closed input
        pass
    store_typeahead(prompt_input, [k for k in keys if k.key != Keys.ControlC])
    return any(k.key == Keys.ControlC for k in keys)


def _continuation(width: int, line_number: int, is_soft_wrap: int) -> AnyFormattedText:
    return PROMPT_CONTINUATION.rjust(width)


def _history(history_file: str | os.PathLike[str] | None) -> History:
    if not history_file:
        return InMemoryHistory()
    path = Path(history_file).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    return FileHistory(str(path))


def make_prompt_session(
    session: Session,
    *,
    history_file: str | os.PathLike[str] | None = None,
    input: Input | None = None,
    output: Output | None = None,
) -> PromptSession[str]:
    """The ``PromptSession`` of the REPL for ``session``: Python highlighting
    (Pygments), multi-line input, history in ``history_file`` (in memory if
    ``None`` or empty), completion, suggestions from history, and the
    bottom toolbar.  ``input``/``output`` are for tests
    (``create_pipe_input()``, ``DummyOutput()``)."""
    return PromptSession(
        PROMPT,
        multiline=True,
        prompt_continuation=_continuation,
        lexer=PygmentsLexer(PythonLexer),
        completer=NamespaceCompleter(lambda: session.namespace, COMMANDS),
        complete_while_typing=False,
        auto_suggest=AutoSuggestFromHistory(),
        history=_history(history_file),
        bottom_toolbar=lambda: toolbar_text(session),
        key_bindings=_key_bindings(),
        tempfile_suffix=".py",
        enable_open_in_editor=True,
        input=input,
        output=output,
    )


def interact(
    session: Session,
    *,
    history_file: str | os.PathLike[str] | None = None,
    banner: str | None = None,
    input: Input | None = None,
    output: Output | None = None,
) -> int:
    """Read and run cells until Ctrl+D (or ``exit()``); returns the exit
    status (0, or the code given to ``SystemExit``)."""
    prompt = make_prompt_session(session, history_file=history_file, input=input, output=output)
    with session.as_main(), session.sigint_to_cells():
        if banner:
            print(banner)
        while True:
            # Text that other threads print while we wait for input goes above
            # the prompt (not with test input/output: nothing is drawn then).
            patch: AbstractContextManager[None] = (
                patch_stdout(raw=True) if output is None else nullcontext()
            )
            session.waiting_for_input()
            ours = signal.getsignal(signal.SIGINT)
            try:
                with patch:
                    text = prompt.prompt()
            except KeyboardInterrupt:  # Ctrl+C at the prompt: discard the input
                continue
            except EOFError:  # Ctrl+D on an empty input
                return EXIT_OK
            finally:
                # Older prompt-toolkit (3.0.40, say) leaves asyncio's default
                # handler (KeyboardInterrupt) behind instead of restoring ours.
                if signal.getsignal(signal.SIGINT) is not ours:
                    signal.signal(signal.SIGINT, ours)
            if _take_ctrl_c(prompt.input):
                session.interrupt_next_cell()
            try:
                session.run_cell(text)
            except SystemExit as e:
                return system_exit_status(e)
