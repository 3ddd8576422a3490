"""%%count_allocations and %undo in a real kernel (over jupyter_client).

The spread of a count, measured over 10 runs (twice) in one kernel, 3.11 and
3.13: 0 for cells that build lists of strings or tuples, dicts of floats or
objects of a class; once in a while a few kB when a run adds a name to the
namespace and its table grows (3072 bytes, once), or 24 bytes (a float the
allocator kept); cells that print vary by kilobytes (output buffers shared
with the kernel's I/O thread) and cells that display a value drift down by a
few bytes per run (IPython's formatters) -- see docs/kernel.md.
"""

from __future__ import annotations

import re

import pytest
from kernel_helpers import MESSAGE, Kernel

RSS = "int(open('/proc/self/statm').read().split()[1]) * __import__('os').sysconf('SC_PAGE_SIZE')"
CELL = "x = x + 1\nsquares = [str(i * i) for i in range(10**5)]"
SPREAD_BOUND = 4096  # the namespace's table, grown once (3072 bytes measured)


def count_of(r: object) -> dict[str, object]:
    figures = r.figures  # type: ignore[attr-defined]
    return figures["count_allocations"]  # type: ignore[no-any-return]


def test_a_count_reports_its_runs_and_leaves_the_state_of_one_run(kernel: Kernel) -> None:
    kernel.ok("import memprof_limits as ml\nx, squares, log = 0, None, ml.Guarded([])")
    kernel.ok("%limits allocations=10MB")
    before = int(kernel.value("len(In)"))
    r = kernel.ok(f"%%count_allocations 5\n{CELL}\nlog.value.append(x)")
    count = count_of(r)
    runs = count["allocated_bytes"]
    assert isinstance(runs, list) and len(runs) == 5, count
    assert count["spread"] == max(runs) - min(runs) <= SPREAD_BOUND, runs
    assert count["limit"] == 10**7 and count["suggested"] == 5 * 10**7
    assert count["line"] == "%%limits allocations=50MB"
    # The report, the last line to paste; the reply is the last run's.
    lines = r.stdout.rstrip("\n").splitlines()
    assert re.fullmatch(
        r"allocated \d+ (to \d+ )?bytes \(\d+\.\d MB\) in (each of )?5 runs from the same state "
        r"\(spread \d+( bytes, [0-9.e-]+%)?\)",
        lines[0],
    ), lines
    assert lines[1:] == [
        "the allocation limit is 10MB: the count is over it "
        "(the cell is interrupted at that limit)",
        "suggested limit (2 x the largest count, rounded up to 1, 2 or 5 x 10^k bytes):",
        "%%limits allocations=50MB",
    ]
    assert r.figures["allocated_bytes"] == runs[-1] and r.figures["limits"]["allocations"] is None
    # One cell of history: In has the counted cell, then this one.
    assert int(kernel.value("len(In)")) == before + 2
    assert kernel.value("In[-3]").startswith("'# %%count_allocations 5")
    # The state after one run; the Guarded list was rolled back between the runs.
    assert kernel.value("(x, log.value)") == "(1, [1])"


def test_the_suggested_line_works_when_pasted(kernel: Kernel) -> None:
    kernel.ok("x, squares = 0, None")
    kernel.ok("%limits allocations=1MB")
    count = count_of(kernel.ok(f"%%count_allocations 3\n{CELL}"))
    line = count["line"]
    assert isinstance(line, str) and line.startswith("%%limits allocations=")
    r = kernel.ok(f"{line}\n{CELL}")
    assert r.figures["limits"]["allocations"] == count["suggested"]
    assert kernel.value("x") == "2"
    r = kernel.run(f"%%limits allocations={count['min'] - 1}\n{CELL}")
    assert r.status == "error" and r.content["ename"] == "AllocationLimitExceeded", r.content
    assert kernel.value("x") == "2"
    kernel.ok("%limits allocations=off")


@pytest.mark.parametrize("argument", ["abc", "0", "100000", "5 6", "-1"])
def test_bad_input_is_a_usage_error_and_nothing_runs(kernel: Kernel, argument: str) -> None:
    kernel.ok("x = 0")
    r = kernel.run(f"%%count_allocations {argument}\nx = x + 1")
    assert r.status == "error" and r.content["ename"] == "UsageError", r.content
    assert r.content["evalue"] == (
        "%%count_allocations: expected a number of runs from 1 to 100 (no number: 1), "
        f"got {argument!r}"
    )
    assert kernel.value("x") == "0"
    kernel.ok("x = x + 1")
    assert kernel.value("x") == "1"


def test_interrupting_a_run_stops_the_count_and_rolls_it_back(any_kernel: Kernel) -> None:
    k = any_kernel
    k.ok("import time\nx, calls = 0, []")
    code = (
        "x = x + 1\ncalls.append(1)\nif len(calls) == 3:\n    print('looping', flush=True)\n"
        "    while True: time.sleep(0.01)"
    )
    msg_id = k.submit(f"%%count_allocations 5\n{code}")
    assert k.wait_for_output(msg_id, "looping")
    k.interrupt_and_wait()
    r = k.collect(msg_id)
    assert r.status == "error" and r.content["ename"] == "Interrupted", r.content
    assert "rolled back: x (changed)" in r.content["evalue"], r.content
    assert "count stopped: run 3 of 5 was interrupted (token); no suggested limit" in r.stderr
    count = count_of(r)
    assert count["stopped"] == "interrupted" and len(count["allocated_bytes"]) == 2  # type: ignore[arg-type]
    r = k.ok("%undo")
    assert r.stdout == (
        "nothing to undo: the last cell was interrupted, and its changes were rolled back already\n"
    )
    assert k.value("(x, len(calls))") == "(0, 3)"


def test_the_memory_limit_stops_a_count_and_the_kernel_survives(kernel: Kernel) -> None:
    kernel.ok(f"x = 0\nbaseline = {RSS}")
    limit = int(kernel.value("baseline")) + 200 * 2**20
    r = kernel.run(
        f"%%limits memory={limit}\n%%count_allocations 3\nx = x + 1\nblocks = []\n"
        f"while len(blocks) < 4 * {limit} // 2**20:\n    blocks.append(bytearray(2**20))",
        timeout=60,
    )
    assert r.status == "error" and r.content["ename"] == "MemoryLimitExceeded", r.content
    assert "x (changed)" in r.content["evalue"] and "freed " in r.content["evalue"], r.content
    assert "count stopped: run 1 of 3 was interrupted (memory)" in r.stderr
    assert kernel.value("(x, 'blocks' in globals())") == "(0, False)"
    assert kernel.km.is_alive()


def test_a_run_that_raises_stops_the_count_and_keeps_its_changes(kernel: Kernel) -> None:
    kernel.ok("x, calls = 0, []")
    r = kernel.run(
        "%%count_allocations 5\nx = x + 1\ncalls.append(1)\n"
        "if len(calls) == 2:\n    raise ValueError('second')"
    )
    assert r.status == "error" and r.content["ename"] == "ValueError", r.content
    # Every run is named after the cell (In[n]), also those after the first.
    number = r.content["execution_count"]
    traceback = "\n".join(r.content["traceback"])
    assert f"In[{number}]" in re.sub(r"\x1b\[[0-9;]*m", "", traceback), traceback
    assert "count stopped: run 2 of 5 raised an exception" in r.stderr
    assert kernel.value("(x, len(calls))") == "(1, 2)"


def test_count_allocations_outside_the_first_lines_of_a_cell_is_refused(kernel: Kernel) -> None:
    r = kernel.ok("r = get_ipython().run_cell('%%count_allocations\\nx = 1')")
    assert "%%count_allocations must be the first line of a cell" in r.stderr, r.outputs
    r = kernel.run("%%capture\n%%count_allocations\n1")
    assert r.status == "ok"
    assert "must be the first line" in kernel.value("r.error_in_exec")


def test_undo(kernel: Kernel) -> None:
    kernel.ok("import memprof_limits as ml\nx, g, plain = 1, ml.Guarded([0], name='g'), [0]")
    kernel.ok("x = 2\ny = 3\ng.value.append(1)\nplain.append(1)")
    kernel.ok("%limits report off")  # %limits cells are not "the last cell"
    r = kernel.ok("%undo")
    assert r.stdout == (
        "undid the last cell: rolled back: y (added), x (changed), g (restored)\n"
        "(names and Guarded values only: objects the cell changed in place stay changed)\n"
    )
    r = kernel.ok("%undo")  # right after: %undo itself is not "the last cell" either
    assert r.stdout == (
        "nothing to undo: %undo goes back one cell only, and the last cell was undone already\n"
    )
    assert kernel.value("(x, 'y' in globals(), g.value, plain)") == "(1, False, [0], [0, 1])"
    # After a cell that raised: what it did before raising.
    assert kernel.run("x = 5\n1 / 0").status == "error"
    assert kernel.ok("%undo").stdout.startswith("undid the last cell: rolled back: x (changed)")
    assert kernel.value("x") == "1"
    # Refused anywhere but alone in its cell.
    for cell, message in [
        ("x = 7\n%undo", "%undo must be alone in its cell"),
        ("%undo 2", "%undo takes no argument"),
    ]:
        r = kernel.run(cell)
        assert r.status == "error" and r.content["ename"] == "UsageError", r.content
        assert r.content["evalue"].startswith(message), r.content
    assert kernel.value("x") == "1"


def test_undo_in_a_fresh_kernel_and_counts_with_rollback_off() -> None:
    k = Kernel(MESSAGE, extra_arguments=["--MemprofLimitsKernel.rollback=False"])
    try:
        assert k.ok("%undo").stdout == "nothing to undo: no cell has run yet\n"
        k.ok("x = 0")
        r = k.run("%%count_allocations 3\nx = x + 1")
        assert r.status == "error" and r.content["ename"] == "UsageError", r.content
        assert "cannot make 3 runs from the same state with rollback off" in r.content["evalue"]
        assert k.value("x") == "0"
        assert count_of(k.ok("%%count_allocations\nx = x + 1"))["runs"] == 1
        assert k.value("x") == "1"
        assert k.ok("%undo").stdout.startswith("nothing to undo: rollback was off")
    finally:
        k.close()
