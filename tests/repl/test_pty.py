"""The REPL in a real pseudo-terminal (pexpect): Ctrl+C is the terminal's
interrupt character, so the REPL receives a real SIGINT while a cell runs
and the key ``\\x03`` at the prompt."""

from __future__ import annotations

import re
import time

import pytest
from repl_helpers import Child, Spawn, strip_ansi

pexpect = pytest.importorskip("pexpect")
pytest.importorskip("prompt_toolkit")

# pexpect forks (forkpty) then execs at once; the engine's watchdog thread of
# the in-process tests makes Python 3.12+ warn about forking with threads.
pytestmark = pytest.mark.filterwarnings(
    "ignore:This process .* is multi-threaded:DeprecationWarning"
)

PROMPT_LATENCY_LIMIT_S = 2.0  # the issue asks for "within a second"; the machine is noisy
CELL_STARTED = re.escape("\x1b[?2004l")  # the prompt application ended: the cell runs


def interrupt_and_time(child: Child, *, settle_s: float = 0.5) -> tuple[float, str]:
    """Wait until the cell runs, Ctrl+C, wait for the next prompt.
    Returns (seconds from Ctrl+C to the prompt, what was printed)."""
    child.proc.expect(CELL_STARTED)
    time.sleep(settle_s)  # let the cell get into its loop / sleep
    start = time.monotonic()
    child.proc.sendintr()
    end = child.wait_prompt()
    return end - start, strip_ansi(child.proc.before or "")


def assert_rolled_back_cleanly(printed: str) -> None:
    """The kernel's report: where the cell was stopped (the cell's frames,
    never the REPL's), then `Interrupted: ...; rolled back: ... x (changed)`."""
    assert re.search(
        r"Interrupted: [^\n]*; rolled back: [^\n]*\bx \(changed\)",
        printed,
    ), printed
    assert all(f.startswith("<cell ") for f in re.findall(r'File "([^"]+)"', printed)), printed
    assert "KeyboardInterrupt" not in printed, printed


def test_ctrl_c_interrupts_a_busy_loop_and_rolls_back(spawn: Spawn) -> None:
    """x = 1; then x = 2 and an endless loop in one cell; Ctrl+C: the prompt
    comes back within a second and x is 1 again."""
    child = spawn()
    child.wait_prompt()
    child.run("x = 1")
    # Ctrl+O puts a newline into a complete statement (as in IPython):
    # `x = 2; while True: pass` is not valid Python on one line.
    child.proc.send("x = 2\x0fwhile True: pass\r")
    latency, printed = interrupt_and_time(child)
    print(f"Ctrl+C -> prompt (busy loop): {latency * 1000:.1f} ms")
    assert_rolled_back_cleanly(printed)
    assert latency < PROMPT_LATENCY_LIMIT_S
    assert child.run("print(x)").strip().splitlines()[-1] == "1"


def test_ctrl_c_interrupts_time_sleep(spawn: Spawn) -> None:
    """The same with a cell blocked in time.sleep(60)."""
    child = spawn()
    child.wait_prompt()
    child.run("import time")
    child.run("x = 1")
    child.proc.send("x = 2; time.sleep(60)\r")
    latency, printed = interrupt_and_time(child)
    print(f"Ctrl+C -> prompt (time.sleep): {latency * 1000:.1f} ms")
    assert_rolled_back_cleanly(printed)
    assert latency < PROMPT_LATENCY_LIMIT_S
    assert child.run("print(x)").strip().splitlines()[-1] == "1"


def test_ctrl_c_right_after_enter_still_interrupts_the_cell(spawn: Spawn) -> None:
    """Ctrl+C sent with no pause after Enter, possibly before the cell
    started: it is meant for that cell, which must not sleep for a minute."""
    child = spawn()
    child.wait_prompt()
    child.run("import time; x = 1")
    start = time.monotonic()
    child.proc.send("x = 2; time.sleep(60)\r")
    child.proc.sendintr()
    child.wait_prompt()
    assert time.monotonic() - start < 30
    assert child.run("print(x)").strip().splitlines()[-1] == "1"


def test_memory_limit_interrupts_the_cell_and_the_repl_survives(spawn: Spawn) -> None:
    child = spawn("--memory", "400MiB")
    child.wait_prompt()
    child.run("x = 1")
    printed = child.run("x = 2; big = [bytearray(2**20) for _ in range(3000)]")
    assert re.search(r"MemoryLimitExceeded: .*memory limit of 400MiB exceeded", printed), printed
    assert re.search(r"rolled back: .*\bx \(changed\)", printed), printed
    assert child.run("print(x, 'big' in dir())").strip().splitlines()[-1] == "1 False"


def test_ctrl_c_at_the_prompt_discards_the_input(spawn: Spawn) -> None:
    child = spawn()
    child.wait_prompt()
    child.proc.send("garbage = 1")
    child.proc.expect("garbage")  # echoed: the prompt has it
    child.proc.send("\x03")
    child.wait_prompt()
    last = child.run("print('garbage' in dir())").strip().splitlines()[-1]
    assert last == "False"


def test_ctrl_d_on_an_empty_line_exits_with_status_0(spawn: Spawn) -> None:
    child = spawn()
    child.wait_prompt()
    child.run("y = 5")
    child.proc.send("\x04")
    child.proc.expect(pexpect.EOF)
    child.proc.close()
    assert child.proc.exitstatus == 0


def test_exit_status_of_sys_exit(spawn: Spawn) -> None:
    child = spawn()
    child.wait_prompt()
    child.proc.send("raise SystemExit(7)\r")
    child.proc.expect(pexpect.EOF)
    child.proc.close()
    assert child.proc.exitstatus == 7


def test_dumb_terminal(spawn: Spawn, repl_env: dict[str, str]) -> None:
    """TERM=dumb: plain '>>> ' prompts, no escape sequences; the same cells
    and the same Ctrl+C."""
    child = spawn(env={**repl_env, "TERM": "dumb"})
    child.prompt = re.compile(">>> ")
    child.wait_prompt()
    child.run("x = 1")
    child.proc.send("x = 2; import time; time.sleep(60)\r")
    child.proc.expect("\n")
    time.sleep(0.5)
    start = time.monotonic()
    child.proc.sendintr()
    end = child.wait_prompt()
    printed = child.proc.before or ""
    # No colours, no cursor movements (prompt-toolkit still says "show the
    # cursor" once at start-up, before the first prompt).
    after_first_prompt = child.text().split(">>> ", 1)[1]
    assert "\x1b[" not in after_first_prompt, after_first_prompt
    assert_rolled_back_cleanly(printed)
    assert end - start < PROMPT_LATENCY_LIMIT_S
    assert child.run("print(x)").strip().splitlines()[-1] == "1"
    child.proc.send("\x04")
    child.proc.expect(pexpect.EOF)


def test_simple_prompt_without_prompt_toolkit_ui(spawn: Spawn) -> None:
    """--simple-prompt (plain input(), for Emacs shells and when the [repl]
    extra is missing): the same multi-line cells, Ctrl+C and Ctrl+D."""
    child = spawn("--simple-prompt")
    child.prompt = re.compile(r"(>>>|\.\.\.) ")
    child.wait_prompt()
    child.run("x = 1")
    child.run("def f():")
    child.run("    return 5")
    child.run("")
    child.proc.send("x = 2; import time; time.sleep(60)\r")
    child.proc.expect("\n")
    time.sleep(0.5)
    start = time.monotonic()
    child.proc.sendintr()
    end = child.wait_prompt()
    assert_rolled_back_cleanly(child.proc.before or "")
    assert end - start < PROMPT_LATENCY_LIMIT_S
    child.proc.send("garbage")
    child.proc.sendintr()
    child.wait_prompt()
    assert "input discarded" in (child.proc.before or "")
    assert child.run("print(x, f())").strip().splitlines()[-1] == "1 5"
    child.proc.send("\x04")
    child.proc.expect(pexpect.EOF)
    child.proc.close()
    assert child.proc.exitstatus == 0


def test_ctrl_c_stops_a_count_and_rolls_it_back(spawn: Spawn) -> None:
    """%%count_allocations in a real terminal: Ctrl+C interrupts the run
    being made, which is rolled back, and the count says it stopped."""
    child = spawn()
    child.wait_prompt()
    child.run("x = 1")
    child.proc.send("%%count_allocations 5\r")  # the header alone is incomplete: a new line
    child.proc.send("x = 2\x0fwhile True: pass\r")
    latency, printed = interrupt_and_time(child)
    assert_rolled_back_cleanly(printed)
    assert "count stopped: run 1 of 5 was interrupted (token); no suggested limit" in printed
    assert latency < PROMPT_LATENCY_LIMIT_S
    # Rolled back already: nothing to undo (%undo says why).
    assert "nothing to undo: the last cell was interrupted" in child.run("%undo")
    assert child.run("print(x)").strip().splitlines()[-1] == "1"
