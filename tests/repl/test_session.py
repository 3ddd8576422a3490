"""A REPL session in process: cells run by the shared cell runner, rollback,
output, tracebacks, and the ``%`` commands."""

from __future__ import annotations

import pickle
import re
import signal
import threading
import time

import pytest
from memprof_limits_repl import Session

import memprof_limits as ml

BIG = "[str(i) for i in range(10**6)]"  # allocates well over 10 MB


def test_cells_share_a_main_namespace_and_show_the_last_expression(
    capsys: pytest.CaptureFixture[str],
) -> None:
    s = Session()
    assert s.run_cell("x = 20").status == "ok"
    assert s.run_cell("x * 2 + 2").status == "ok"
    assert s.run_cell("x;").status == "ok"  # a final ; hides the value (IPython)
    assert s.run_cell("None").status == "ok"
    assert capsys.readouterr().out == "42\n"
    assert s.namespace["_"] == 42
    assert s.namespace["__name__"] == "__main__"


def test_an_interrupted_cell_is_rolled_back_and_reported(
    capsys: pytest.CaptureFixture[str],
) -> None:
    s = Session(limits=ml.CellLimits(allocations=10**7))
    s.run_cell("x = 1")
    report = s.run_cell(f"x = 2\nnew = 'added'\ny = {BIG}")
    assert report.status == "interrupted"
    assert report.outcome is not None and report.outcome.reason == "allocations"
    assert report.exit_status == 3
    assert s.namespace["x"] == 1 and "new" not in s.namespace and "y" not in s.namespace
    err = capsys.readouterr().err
    # Where the cell was stopped (its own frames only), then one line.
    assert set(re.findall(r'File "([^"]+)"', err)) <= {"<cell 2>"}, err
    # The kernel's line: the cause's exception name, then the runner's report.
    last = err.rstrip("\n").splitlines()[-1]
    assert last == f"AllocationLimitExceeded: {report.outcome.interrupt_line()}", err
    assert "allocation limit of 10000000 bytes reached" in last, err
    assert last.endswith("; rolled back: new (added), x (changed)"), err


def test_the_report_of_an_interrupt_shows_where_the_cell_was_stopped(
    capsys: pytest.CaptureFixture[str],
) -> None:
    s = Session(limits=ml.CellLimits(allocations=10**7))
    for number in range(1, 6):
        assert s.run_cell(f"def f():\n    return {BIG}\n\ny = f()").status == "interrupted"
        err = capsys.readouterr().err
        assert err.startswith("Traceback (most recent call last):\n"), err
        assert re.findall(r'File "([^"]+)", line (\d+), in (\S+)', err)[:2] == [
            (f"<cell {number}>", "4", "<module>"),
            (f"<cell {number}>", "2", "f"),
        ], err


def test_no_rollback_keeps_the_changes_of_an_interrupted_cell() -> None:
    s = Session(limits=ml.CellLimits(allocations=10**7), rollback=False)
    s.run_cell("x = 1")
    assert s.run_cell(f"x = 2\ny = {BIG}").status == "interrupted"
    assert s.namespace["x"] == 2


def test_exceptions_show_a_traceback_of_user_frames_only(
    capsys: pytest.CaptureFixture[str],
) -> None:
    s = Session()
    report = s.run_cell("def f():\n    return 1 / 0\n\nf()")
    assert report.status == "error" and isinstance(report.exception, ZeroDivisionError)
    assert report.exit_status == 1
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last):\n"), err
    assert re.findall(r'File "([^"]+)"', err) == ["<cell 1>", "<cell 1>"]
    assert "return 1 / 0" in err  # the cell's source is shown
    assert err.rstrip().endswith("ZeroDivisionError: division by zero")


def test_a_syntax_error_is_shown_like_python_shows_it(
    capsys: pytest.CaptureFixture[str],
) -> None:
    s = Session()
    assert s.run_cell("x = (1 +").status == "error"
    err = capsys.readouterr().err
    assert "Traceback" not in err and "SyntaxError" in err and "<cell 1>" in err


def test_an_exception_does_not_roll_back() -> None:
    """Rollback is for interrupts; an ordinary exception keeps what the
    cell did before it (as Python does)."""
    s = Session()
    s.run_cell("x = 1")
    s.run_cell("x = 2\nraise ValueError")
    assert s.namespace["x"] == 2


def test_system_exit_propagates() -> None:
    with pytest.raises(SystemExit) as info:
        Session().run_cell("raise SystemExit(3)")
    assert info.value.code == 3


def test_percent_limits_sets_shows_and_removes_the_session_limits(
    capsys: pytest.CaptureFixture[str],
) -> None:
    s = Session()
    assert s.run_cell("%limits memory=1GiB allocations=10MB").status == "command"
    assert s.runner.limits == ml.CellLimits(memory=2**30, allocations=10**7)
    assert s.run_cell(f"y = {BIG}").status == "interrupted"
    assert s.run_cell("%limits allocations=off").status == "command"
    assert s.runner.limits == ml.CellLimits(memory=2**30)
    assert s.run_cell("%limits off").status == "command"
    assert s.runner.limits == ml.CellLimits()
    assert s.run_cell("%limits").status == "command"
    assert s.run_cell("%limits memory=lots").status == "error"
    out, err = capsys.readouterr()
    assert out.splitlines() == [
        "limits: memory=1GiB allocations=10MB; rollback on",
        "limits: memory=1GiB; rollback on",
        "limits: no limits; rollback on",
        "limits: no limits; rollback on",
    ]
    assert "%limits: memory" in err and "'lots'" in err
    assert "limits: limits:" not in err


def test_percent_percent_limits_applies_to_one_cell_only() -> None:
    s = Session(limits=ml.CellLimits(memory=4 * 2**30))
    report = s.run_cell(f"%%limits allocations=10MB\ny = {BIG}")
    assert report.status == "interrupted" and report.outcome is not None
    assert report.outcome.limits == ml.CellLimits(memory=4 * 2**30, allocations=10**7)
    assert s.run_cell(f"y = {BIG}").status == "ok"
    assert s.runner.limits == ml.CellLimits(memory=4 * 2**30)
    assert s.run_cell("%%nonsense\nx = 1").status == "error"


def test_line_numbers_of_a_limits_cell_count_its_header(
    capsys: pytest.CaptureFixture[str],
) -> None:
    s = Session()
    assert s.run_cell("%%limits memory=4GiB\nx = 1\n1 / 0").status == "error"
    err = capsys.readouterr().err
    assert 'File "<cell 1>", line 3, in <module>\n    1 / 0' in err, err


def test_percent_rollback_last_help_and_unknown_commands(
    capsys: pytest.CaptureFixture[str],
) -> None:
    s = Session()
    assert s.run_cell("%last").status == "command"
    s.run_cell("x = list(range(1000))")
    assert s.run_cell("%rollback off").status == "command"
    assert not s.runner.rollback
    assert s.run_cell("%rollback maybe").status == "error"
    assert s.run_cell("%last").status == "command"
    assert s.run_cell("%help").status == "command"
    assert s.run_cell("%frobnicate").status == "error"
    out, err = capsys.readouterr()
    assert "no cell has run yet" in out
    assert "rollback off" in out
    assert re.search(r"last cell: allocated .* bytes\), peak RSS .*, [0-9.]+ s", out), out
    assert "%limits" in out and "%memprof" in out
    assert "unknown command %frobnicate" in err


def test_classes_defined_in_cells_pickle_under_as_main() -> None:
    s = Session()
    with s.as_main():
        s.run_cell("class Point:\n    def __init__(self, x):\n        self.x = x\n")
        s.run_cell("import pickle; data = pickle.dumps(Point(3))")
        data = s.namespace["data"]
        assert pickle.loads(data).x == 3


def test_sigint_interrupts_the_running_cell_even_in_sleep() -> None:
    """A real SIGINT to the process (what Ctrl+C sends) while a cell sleeps."""
    s = Session()
    s.run_cell("import time; x = 1")
    main = threading.main_thread().ident
    assert main is not None
    timer = threading.Timer(0.3, signal.pthread_kill, (main, signal.SIGINT))
    with s.sigint_to_cells():
        start = time.monotonic()
        timer.start()
        report = s.run_cell("x = 2; time.sleep(30)")
        elapsed = time.monotonic() - start
    assert report.status == "interrupted" and report.exit_status == 130
    assert s.namespace["x"] == 1
    assert elapsed < 5


def test_sigint_between_cells_is_for_the_next_cell_until_input_is_awaited() -> None:
    s = Session()
    with s.sigint_to_cells():
        signal.raise_signal(signal.SIGINT)  # no cell is running: nothing raised
        assert s.run_cell("x = 1").status == "interrupted"
        assert "x" not in s.namespace
        signal.raise_signal(signal.SIGINT)
        s.waiting_for_input()  # the front end waits for input: forget it
        assert s.run_cell("x = 1").status == "ok"


def _profiler() -> object | None:
    try:
        from memprof_limits import memprof
    except Exception:  # not in this version, or a build without its native part
        return None
    return memprof


def test_percent_memprof_profiles_a_cell_under_its_limits(
    capsys: pytest.CaptureFixture[str],
) -> None:
    memprof = _profiler()
    if memprof is None:
        pytest.skip("memprof_limits.memprof is not available in this build")
    s = Session()
    s.run_cell("def f(n):\n    return [str(i) for i in range(n)]\n")
    capsys.readouterr()
    assert s.run_cell("%memprof -n 2 y = f(300000)").status == "ok"
    out = capsys.readouterr().out.splitlines()
    assert re.fullmatch(r"~\d+\.\d MiB allocated, estimated from \d+ samples .*", out[0]), out
    assert out[1].startswith("#1: <cell 1>:2: size="), out  # the line in f that allocates
    assert out[2].strip() == "return [str(i) for i in range(n)]", out
    assert len([line for line in out if line.startswith("#")]) <= 2, out
    assert not any("memprof_limits_repl" in line for line in out), out  # only the cell's work
    assert len(s.namespace["y"]) == 300000
    # The statement is a cell like any other: limits and rollback apply.
    s.run_cell("%limits allocations=1MB")
    assert s.run_cell("%memprof y = f(400000)").status == "interrupted"
    assert len(s.namespace["y"]) == 300000
    assert not memprof.is_tracing()  # type: ignore[attr-defined]
    for bad in ("%memprof", "%memprof --bogus 1", "%memprof -n many x = 1"):
        assert s.run_cell(bad).status == "error", bad
    assert s.run_cell("%memprof -r 1/1000000000 x = 1").status == "error"  # below the engine's
    err = capsys.readouterr().err
    assert "unknown option --bogus" in err and "lower than the rate" in err, err


def test_percent_memprof_says_when_the_profiler_is_missing(
    capsys: pytest.CaptureFixture[str],
) -> None:
    if _profiler() is not None:
        pytest.skip("the profiler is available (tested above)")
    s = Session()
    assert s.run_cell("%memprof x = [0] * 1000").status == "error"
    assert "the profiler is not available" in capsys.readouterr().err
    assert "x" not in s.namespace
