"""A REPL session in process: cells run by the shared cell runner, rollback,
output, tracebacks, and the ``%`` commands."""

from __future__ import annotations

import pickle
import re
import signal
import threading
import time
from pathlib import Path

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
    capsys: pytest.CaptureFixture[str], tmp_path: Path
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
    # The kernel magic's options, parsed by the same function: the exports are written.
    collapsed = tmp_path / "cell.collapsed"
    assert s.run_cell(f"%memprof -r 1/1000 -f 8 --collapsed {collapsed} z = f(1000)").status == "ok"
    assert collapsed.read_text().strip(), "no stack written"


def test_percent_memprof_says_when_the_profiler_is_missing(
    capsys: pytest.CaptureFixture[str],
) -> None:
    if _profiler() is not None:
        pytest.skip("the profiler is available (tested above)")
    s = Session()
    assert s.run_cell("%memprof x = [0] * 1000").status == "error"
    assert "the profiler is not available" in capsys.readouterr().err
    assert "x" not in s.namespace


# -- %%count_allocations and %undo ------------------------------------------------------------

COUNTED = "x = x + 1; words = [str(i * i) for i in range(10**5)]"


def _count_lines(out: str) -> list[str]:
    """The report of a count: its last four lines."""
    return out.rstrip("\n").splitlines()[-4:]


def test_count_allocations_reports_and_leaves_the_state_of_one_run(
    capsys: pytest.CaptureFixture[str],
) -> None:
    s = Session(limits=ml.CellLimits(allocations="10MB"))
    s.run_cell("x, words = 0, None")
    report = s.run_cell(f"%%count_allocations 5\n{COUNTED}")
    assert report.status == "ok" and report.outcome is not None
    assert s.namespace["x"] == 1  # the state after one run
    counts, limit, rule, line = _count_lines(capsys.readouterr().out)
    # The same count every time on a quiet machine; under load the library's watchdog thread
    # can take a tuple or two from CPython's free lists (docs/serve.md, "Limits"): tens of bytes.
    m = re.fullmatch(
        r"allocated (\d+) bytes \((\d+\.\d) MB\) in each of 5 runs from the same state "
        r"\(spread 0\)"
        r"|allocated (\d+) to (\d+) bytes \((\d+\.\d) MB\) in 5 runs from the same state "
        r"\(spread (\d+) bytes, [0-9.]+%\)",
        counts,
    )
    assert m, counts
    low = int(m.group(1) or m.group(3))
    assert m.group(6) is None or int(m.group(6)) <= 512, counts
    assert low <= report.outcome.allocated_bytes <= low + 512 and low > 10**7
    assert limit == (
        "the allocation limit is 10MB: the count is over it (the cell is interrupted at that limit)"
    )
    assert rule == "suggested limit (2 x the largest count, rounded up to 1, 2 or 5 x 10^k bytes):"
    assert line == "%%limits allocations=50MB"
    # Pasted, it works; below the count, the cell is interrupted.
    assert s.run_cell(f"{line}\n{COUNTED}").status == "ok" and s.namespace["x"] == 2
    below = f"%%limits allocations={low - 1024}\n{COUNTED}"
    assert s.run_cell(below).outcome.reason == "allocations"  # type: ignore[union-attr]
    assert s.namespace["x"] == 2


def test_count_allocations_of_one_run_and_with_limits_in_either_order(
    capsys: pytest.CaptureFixture[str],
) -> None:
    s = Session()
    s.run_cell("x, words = 0, None")
    assert s.run_cell(f"%%count_allocations\n{COUNTED}").status == "ok"
    counts, limit, *_ = _count_lines(capsys.readouterr().out)
    assert re.fullmatch(r"allocated \d+ bytes \(\d+\.\d MB\)", counts), counts
    assert limit == "no allocation limit is set"
    for cell in [
        f"%%limits memory=8GiB allocations=1MB\n%%count_allocations 2\n{COUNTED}",
        f"%%count_allocations 2\n%%limits memory=8GiB allocations=1MB\n{COUNTED}",
    ]:
        assert s.run_cell(cell).status == "ok"
        out = capsys.readouterr().out
        assert "the allocation limit is 1MB: the count is over it" in out, out
        assert s.runner.last is not None and s.runner.last.limits.memory == 8 * 2**30
    assert s.namespace["x"] == 3
    # The line numbers count the headers.
    assert s.run_cell("%%count_allocations 2\n%%limits memory=8GiB\nx = 1\n1 / 0").status == "error"
    err = capsys.readouterr().err
    assert re.search(r'File "<cell \d+>", line 4, in <module>\n    1 / 0', err), err
    assert "count stopped: run 1 of 2 raised an exception; no suggested limit" in err


@pytest.mark.parametrize(
    ("header", "message"),
    [
        ("%%count_allocations abc", "got 'abc'"),
        ("%%count_allocations 0", "got '0'"),
        ("%%count_allocations 100000", "got '100000'"),
        ("%%count_allocations 5 6", "got '5 6'"),
        ("%%count_allocations 2\n%%count_allocations 3", "%%count_allocations: given twice"),
        ("%%count_allocations 2\n%%limits allocations=lots", "%%limits: "),
    ],
)
def test_count_allocations_refuses_bad_input_and_the_session_goes_on(
    capsys: pytest.CaptureFixture[str], header: str, message: str
) -> None:
    s = Session()
    s.run_cell("x = 0")
    assert s.run_cell(f"{header}\nx = x + 1").status == "error"
    err = capsys.readouterr().err
    assert message in err, err
    if "given twice" not in message and "%%limits" not in message:
        assert err.startswith("%%count_allocations: expected a number of runs from 1 to 100"), err
    assert s.namespace["x"] == 0  # nothing ran
    assert s.run_cell("x = x + 1").status == "ok" and s.namespace["x"] == 1


def test_count_allocations_with_rollback_off_counts_one_run_only(
    capsys: pytest.CaptureFixture[str],
) -> None:
    s = Session(rollback=False)
    s.run_cell("x = 0")
    assert s.run_cell("%%count_allocations 3\nx = x + 1").status == "error"
    assert "cannot make 3 runs from the same state with rollback off" in capsys.readouterr().err
    assert s.run_cell("%%count_allocations\nx = x + 1").status == "ok" and s.namespace["x"] == 1


def test_ctrl_c_during_a_count_stops_it_and_rolls_back(
    capsys: pytest.CaptureFixture[str],
) -> None:
    s = Session()
    s.run_cell("import time\nx, calls = 0, []")
    main = threading.main_thread().ident
    assert main is not None
    calls: list[int] = s.namespace["calls"]  # type: ignore[assignment]

    def ctrl_c_in_run_3() -> None:  # (not at a fixed time: runs 1 and 2 may be slow)
        deadline = time.monotonic() + 30
        while len(calls) < 3 and time.monotonic() < deadline:
            time.sleep(0.005)
        signal.pthread_kill(main, signal.SIGINT)

    timer = threading.Thread(target=ctrl_c_in_run_3)
    code = "x = x + 1\ncalls.append(1)\nwhile len(calls) == 3: time.sleep(0.01)"
    with s.sigint_to_cells():
        timer.start()
        report = s.run_cell(f"%%count_allocations 5\n{code}")
    timer.join()
    assert report.status == "interrupted" and report.exit_status == 130
    assert s.namespace["x"] == 0 and len(s.namespace["calls"]) == 3  # type: ignore[arg-type]
    err = capsys.readouterr().err
    assert "Interrupted: cancelled: the token was set; rolled back: x (changed)" in err, err
    last = err.rstrip("\n").splitlines()[-1]
    assert last.startswith(
        "count stopped: run 3 of 5 was interrupted (token); no suggested limit (before it: "
    ), err
    # The next count is not affected by that Ctrl+C.
    assert s.run_cell("%%count_allocations 2\nx = x + 1").status == "ok" and s.namespace["x"] == 1


def test_the_memory_limit_stops_a_count_and_the_session_survives(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from memprof_limits import _sampler

    s = Session()
    s.run_cell("x = 0")
    memory = _sampler.rss_bytes() + 64 * 2**20
    code = "x = x + 1\nkeep = []\nwhile True: keep.append(bytearray(10**5))"
    report = s.run_cell(f"%%count_allocations 3\n%%limits memory={memory}\n{code}")
    assert report.status == "interrupted" and report.exit_status == 4
    assert s.namespace["x"] == 0 and "keep" not in s.namespace
    err = capsys.readouterr().err
    assert "MemoryLimitExceeded: " in err and "x (changed)" in err, err
    assert "count stopped: run 1 of 3 was interrupted (memory); no suggested limit" in err, err
    assert s.run_cell("x = 5").status == "ok"


def test_undo_goes_back_one_cell_and_says_when_it_cannot(
    capsys: pytest.CaptureFixture[str],
) -> None:
    s = Session(limits=ml.CellLimits(allocations=10**7))
    assert s.run_cell("%undo").status == "command"
    assert capsys.readouterr().out == "nothing to undo: no cell has run yet\n"
    s.run_cell("x = 1")
    s.run_cell("x = 2\ny = 3")
    s.run_cell("%limits")  # commands are not cells
    capsys.readouterr()
    assert s.run_cell("%undo").status == "command"
    assert capsys.readouterr().out == (
        "undid the last cell: rolled back: y (added), x (changed)\n"
        "(names and Guarded values only: objects the cell changed in place stay changed)\n"
    )
    assert s.namespace["x"] == 1 and "y" not in s.namespace
    s.run_cell("%undo")
    assert capsys.readouterr().out == (
        "nothing to undo: %undo goes back one cell only, and the last cell was undone already\n"
    )
    assert s.namespace["x"] == 1
    # After a cell that raised: what it did before raising is undone.
    assert s.run_cell("x = 3\n1 / 0").status == "error" and s.namespace["x"] == 3
    s.run_cell("%undo")
    assert s.namespace["x"] == 1
    # After an interrupted cell: nothing (it was rolled back already).
    assert s.run_cell(f"x = 4\ny = {BIG}").status == "interrupted"
    capsys.readouterr()
    s.run_cell("%undo")
    assert capsys.readouterr().out == (
        "nothing to undo: the last cell was interrupted, and its changes were rolled back already\n"
    )
    assert s.namespace["x"] == 1
    # Guarded values come back; other objects changed in place do not.
    s.run_cell("import memprof_limits as ml\ng = ml.Guarded([0])\nplain = [0]")
    s.run_cell("g.value.append(1); plain.append(1)")
    s.run_cell("%undo")
    assert s.namespace["g"].value == [0] and s.namespace["plain"] == [0, 1]  # type: ignore[attr-defined]
    assert s.run_cell("%undo now").status == "error"
    assert "%undo: takes no argument" in capsys.readouterr().err


def test_help_lists_the_new_commands(capsys: pytest.CaptureFixture[str]) -> None:
    Session().run_cell("%help")
    out = capsys.readouterr().out
    assert "%%count_allocations [N]" in out and "%undo" in out
