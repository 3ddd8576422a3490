"""Issue 12, items 9 and 10 for the REPL (real ``memprof-limits`` processes):
a failure of the library's own bookkeeping never ends the session, and a
cell whose code completed is never rolled back."""

from __future__ import annotations

from pathlib import Path

import pytest
from memprof_limits_repl import EXIT_USAGE
from repl_helpers import run_cli

BAD_GUARDS = """\
import memprof_limits as ml
class BadSnapshot:
    def __snapshot__(self):
        raise ValueError("no snapshot for you")
    def __restore__(self, state):
        pass

class BadRestore:
    n = 0
    def __snapshot__(self):
        return self.n
    def __restore__(self, state):
        raise ValueError("no restore for you")

"""

# A cell that reaches a 1 MB allocation limit (an interrupt with no SIGINT).
RUNAWAY = "%limits allocations=1MB\nx = 0; big = [str(i) for i in range(10**6)]\n%limits off\n"


@pytest.mark.parametrize(
    "line",
    [
        "%limits allocations=1e308TB",
        "%limits memory=1e400GiB",
        "%limits allocations=" + "9" * 500,
        "%%limits allocations=1e308TB\nnever = 1\n",
    ],
    ids=["alloc", "memory", "digits", "cell"],
)
def test_absurd_limits_do_not_end_the_session(repl_env: dict[str, str], line: str) -> None:
    proc = run_cli([], repl_env, stdin=f"{line}\nprint('alive', 'never' in globals())\n")
    assert proc.returncode == 0, proc.stderr
    assert "alive False" in proc.stdout, (proc.stdout, proc.stderr)
    assert "limits" in proc.stderr and "expected" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["--allocations", "1e308TB", "-c", "pass"],
        ["--memory", "1e400GiB", "-c", "pass"],
        ["run", "--allocations", "1e308TB", "script.py"],
        ["run", "--memory=" + "9" * 500, "script.py"],
    ],
    ids=["cli-alloc", "cli-memory", "run-alloc", "run-digits"],
)
def test_absurd_limits_on_the_command_line_are_usage_errors(
    repl_env: dict[str, str], tmp_path: Path, args: list[str]
) -> None:
    (tmp_path / "script.py").write_text("print('ran')\n")
    proc = run_cli(args, repl_env, cwd=tmp_path)
    assert proc.returncode == EXIT_USAGE, (proc.returncode, proc.stderr)
    assert "expected" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert "ran" not in proc.stdout


def test_a_snapshot_that_raises_does_not_end_the_session(repl_env: dict[str, str]) -> None:
    stdin = (
        BAD_GUARDS
        + "x = 1\nbad = ml.Guarded(BadSnapshot(), name='bad')\ny = 2\n"
        + RUNAWAY
        + "print('x is', x)\ndel bad\nimport gc; gc.collect()\nz = 3\nprint('alive', y, z)\n"
    )
    proc = run_cli([], repl_env, stdin=stdin)
    assert proc.returncode == 0, proc.stderr
    culprit = "checkpoint: Guarded 'bad': __snapshot__ raised ValueError: no snapshot for you"
    # Said after each completed cell while `bad` lives, and in the interrupt line.
    assert proc.stderr.count(culprit) >= 3, proc.stderr
    assert "AllocationLimitExceeded" in proc.stderr and "x (changed)" in proc.stderr
    assert "x is 1" in proc.stdout and "alive 2 3" in proc.stdout, (proc.stdout, proc.stderr)
    last = proc.stderr.split("AllocationLimitExceeded", 1)[1].split("\n", 1)[1]
    # The cells `print('x is', x)` and `del bad`; then no more.
    assert last.count(culprit) == 2, last


def test_a_restore_that_raises_does_not_end_the_session(repl_env: dict[str, str]) -> None:
    stdin = (
        BAD_GUARDS
        + "x = 1\nbad = ml.Guarded(BadRestore(), name='bad')\n"
        + RUNAWAY.replace("x = 0;", "x = 0; bad.value.n = 5;")
        + "print('after', x, bad.value.n)\ndel bad\nprint('alive')\n"
    )
    proc = run_cli([], repl_env, stdin=stdin)
    assert proc.returncode == 0, proc.stderr
    assert (
        "rollback: Guarded 'bad': __restore__ raised ValueError: no restore for you" in proc.stderr
    )
    assert "x (changed)" in proc.stderr
    assert "after 1 5" in proc.stdout and "alive" in proc.stdout, (proc.stdout, proc.stderr)


def test_an_unprintable_namespace_key_does_not_end_the_session(repl_env: dict[str, str]) -> None:
    stdin = (
        "class Key:\n"
        "    def __str__(self):\n        raise RuntimeError('no str')\n"
        "    def __repr__(self):\n        raise RuntimeError('no repr')\n\n"
        "x = 1\n"
        + RUNAWAY.replace("x = 0;", "x = 0; globals()[Key()] = 1;")
        + "print('after', x, [type(k).__name__ for k in globals() if not isinstance(k, str)])\n"
    )
    proc = run_cli([], repl_env, stdin=stdin)
    assert proc.returncode == 0, proc.stderr
    assert "<unprintable Key> (added)" in proc.stderr and "x (changed)" in proc.stderr
    assert "after 1 []" in proc.stdout, (proc.stdout, proc.stderr)


def test_an_interrupt_while_the_value_is_shown_does_not_roll_back(
    repl_env: dict[str, str],
) -> None:
    """Deterministic: writing the value to stdout sends SIGINT to the REPL
    itself -- after the cell's code completed.  The cell keeps its work."""
    stdin = (
        "import os, signal, sys\n"
        "class Out:\n"
        "    def __init__(self, out):\n        self.out = out\n"
        "    def write(self, s):\n"
        "        if 'MARK' in s:\n            os.kill(os.getpid(), signal.SIGINT)\n"
        "        return self.out.write(s)\n"
        "    def flush(self):\n        self.out.flush()\n\n"
        "x = 1\n"
        "sys.stdout = Out(sys.stdout)\n"
        "x = 2; 'MARK'\n"
        "print('x is', x)\n"
    )
    proc = run_cli([], repl_env, stdin=stdin)
    assert proc.returncode == 0, proc.stderr
    assert "'MARK'" in proc.stdout and "x is 2" in proc.stdout, (proc.stdout, proc.stderr)
    assert "Interrupted" not in proc.stderr and "rolled back" not in proc.stderr, proc.stderr
