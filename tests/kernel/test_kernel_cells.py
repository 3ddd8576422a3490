"""Cells as limited tasks: %limits / %%limits, reply metadata, rollback and
what it leaves alone, user_expressions, subshells, IPython features."""

from __future__ import annotations

import re
import time

from kernel_helpers import MESSAGE, Kernel

import memprof_limits as ml


def plain(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def test_limits_magic_sets_and_shows_session_limits(kernel: Kernel) -> None:
    from memprof_limits._defaults import default_memory_limit

    default = default_memory_limit()
    assert default.bytes is not None
    r = kernel.ok("%limits")
    # Safe by default: a memory limit derived from the machine, and where it comes from.
    assert r.stdout.startswith(
        f"session limits: memory={ml.format_bytes(default.bytes)} (the default memory limit: "
        f"{default.describe()}; %limits memory=off removes it)"
    ), r.stdout
    assert kernel.ok("1").figures["limits"] == {"memory": default.bytes, "allocations": None}
    r = kernel.ok("%limits memory=3GiB allocations=500MB")
    # As written: 500MB is not shown as "476.8 MiB".
    assert "session limits: memory=3GiB allocations=500MB\n" == r.stdout, r.stdout
    r = kernel.ok("%limits")
    assert "memory=3GiB allocations=500MB" in r.stdout and "last cell:" in r.stdout
    assert r.figures["limits"] == {"memory": 3 * 2**30, "allocations": 500_000_000}
    kernel.ok("%limits allocations=off")  # from the next cell on
    assert kernel.ok("1").figures["limits"] == {"memory": 3 * 2**30, "allocations": None}
    r = kernel.ok("%limits off")
    assert "no limits" in r.stdout
    assert kernel.ok("1").figures["limits"] == {"memory": None, "allocations": None}


def test_a_fresh_kernel_shows_its_default_limit_and_it_can_be_removed_alone() -> None:
    from memprof_limits._defaults import default_memory_limit

    default = default_memory_limit()
    k = Kernel(MESSAGE)
    try:
        msg_id = k.kc.kernel_info()
        while True:
            reply = k.kc.get_shell_msg(timeout=10)
            if reply["parent_header"].get("msg_id") == msg_id:
                break
        banner = reply["content"]["banner"]
        assert "memprof-limits kernel" in banner
        expected = f"Limits: memory={ml.format_bytes(default.bytes or 0)} (the default memory limit"
        assert expected in banner, banner
        k.ok("%limits allocations=1GB")
        r = k.ok("%limits memory=off")
        assert r.stdout == "session limits: allocations=1GB\n", r.stdout
        assert k.ok("1").figures["limits"] == {"memory": None, "allocations": 10**9}
    finally:
        k.close()


def test_limits_magic_refuses_bad_input(kernel: Kernel) -> None:
    for line in ["%limits memory=lots", "%limits cpu=3", "%limits report maybe"]:
        r = kernel.run(line)
        assert r.status == "error" and r.content["ename"] == "UsageError", (line, r.content)
    assert kernel.ok("%limits").stdout.startswith("session limits: no limits")


def test_cell_limits_override_for_one_cell(kernel: Kernel) -> None:
    kernel.ok("kept = 1")
    r = kernel.run(
        "%%limits allocations=1MB\nkept = 2\nbig = [str(i) for i in range(10**6)]\nlast = 3"
    )
    assert r.status == "error", r.content
    assert r.content["ename"] == "AllocationLimitExceeded"
    evalue = r.content["evalue"]
    # The cell's limit and total (not those of the statement that crossed it).
    assert evalue.startswith("allocation limit of 1000000 bytes reached ("), evalue
    assert "kept (changed)" in evalue
    figures = r.figures
    assert figures["reason"] == "allocations" and figures["limits"]["allocations"] == 1_000_000
    assert 1_000_000 < figures["allocated_bytes"] < 1_200_000
    # The traceback is short, points at the user's line, and keeps line numbers.
    tb = plain("\n".join(r.content["traceback"]))
    assert "line 3" in tb and "big = [str(i)" in tb
    # Rolled back, and the next cell runs with the session's limits again.
    assert kernel.value("(kept, 'big' in globals(), 'last' in globals())") == "(1, False, False)"
    assert (
        kernel.ok("data = [str(i) for i in range(10**6)]").figures["limits"]["allocations"] is None
    )


def test_cell_limits_bad_spec_runs_nothing(kernel: Kernel) -> None:
    r = kernel.run("%%limits allocations=much\nnever = 1")
    assert r.status == "error" and r.content["ename"] == "UsageError"
    assert "allocations" in r.content["evalue"]
    assert kernel.value("'never' in globals()") == "False"


def test_cell_limits_compose_with_other_cell_magics(kernel: Kernel) -> None:
    r = kernel.ok("%%limits allocations=50MB\n%%capture captured\nprint('hidden')")
    assert r.figures["limits"]["allocations"] == 50_000_000
    assert kernel.value("captured.stdout") == "'hidden\\n'"


def test_reply_metadata_carries_exact_allocations(kernel: Kernel) -> None:
    r = kernel.ok("buf = bytearray(10**6)")
    f = r.figures
    assert 10**6 <= f["allocated_bytes"] < 10**6 + 4096, f
    assert f["interrupted"] is False and f["reason"] is None and f["rolled_back"] is None
    assert f["peak_rss_bytes"] > 10**7 and f["wall_time_s"] > 0
    # Same cell, same count (in this kernel too).
    assert kernel.ok("buf = bytearray(10**6)").figures["allocated_bytes"] == f["allocated_bytes"]
    assert r.msg["metadata"]["status"] == "ok"


def test_report_after_each_cell(kernel: Kernel) -> None:
    kernel.ok("%limits report")
    r = kernel.ok("blob = bytes(2 * 10**6)")
    line = [x for x in r.stdout.splitlines() if x.startswith("[memprof-limits]")]
    assert len(line) == 1 and f"({r.figures['allocated_bytes']} bytes)" in line[0], r.stdout
    r = kernel.interrupt_after("while True: pass", delay=0.2)
    assert "[memprof-limits] allocated" in r.stdout or any(
        "[memprof-limits]" in m["content"].get("text", "") for m in r.outputs
    )
    kernel.ok("%limits report off")
    assert "[memprof-limits]" not in kernel.ok("1 + 1").stdout


def test_history_and_execution_count_stay_consistent(kernel: Kernel) -> None:
    a = kernel.ok("40 + 2")
    n = a.content["execution_count"]
    assert a.result == "42"
    b = kernel.interrupt_after("_ = 'user value?'\nmarker = 1\nwhile True: pass", delay=0.2)
    assert b.status == "error" and b.content["execution_count"] == n + 1
    c = kernel.ok(
        f"print(_, Out[{n}], 'while True' in In[{n + 1}], {n + 1} in Out, len(In) == {n + 3})"
    )
    assert c.content["execution_count"] == n + 2
    assert c.stdout.strip() == "42 42 True False True"
    assert kernel.value("'marker' in globals()") == "False"


def test_interrupted_expression_is_not_displayed(kernel: Kernel) -> None:
    kernel.ok("'before'")
    r = kernel.run("%%limits allocations=1MB\n[str(i) for i in range(10**6)]")
    assert r.status == "error" and r.result is None
    assert kernel.value("_") == "'before'"


def test_user_repr_runs_under_the_limits(kernel: Kernel) -> None:
    kernel.ok("class Slow:\n    def __repr__(self):\n        while True:\n            pass")
    r = kernel.interrupt_after("Slow()", delay=0.3)
    assert r.status == "error" and r.content["ename"] == "Interrupted"
    assert r.result is None
    r = kernel.run(
        "class Big:\n    def __repr__(self):\n        return str([str(i) for i in range(10**6)])\n"
        "%limits allocations=2MB"
    )
    r = kernel.run("Big()")
    kernel.ok("%limits off")
    assert r.status == "error" and r.content["ename"] == "AllocationLimitExceeded", r.content


def test_guarded_values_roll_back(kernel: Kernel) -> None:
    kernel.ok("import memprof_limits as ml\ng = ml.Guarded([1, 2], name='g')")
    r = kernel.interrupt_after("g.value.append(3)\nwhile True: pass", delay=0.2)
    assert "g (restored)" in r.content["evalue"], r.content["evalue"]
    assert kernel.value("g.value") == "[1, 2]"


def test_user_expressions_run_under_the_cell_limits(kernel: Kernel) -> None:
    r = kernel.run("ue = 1", user_expressions={"a": "ue + 1", "b": "1/0"})
    assert r.status == "ok"
    exprs = r.content["user_expressions"]
    assert exprs["a"]["status"] == "ok" and exprs["a"]["data"]["text/plain"] == "2"
    assert exprs["b"]["status"] == "error" and exprs["b"]["ename"] == "ZeroDivisionError"
    # An expression that reaches the cell's limit: see
    # test_kernel_bookkeeping.py (it runs after the cell completed).
    r = kernel.run(
        "%%limits allocations=1MB\nue = [str(i) for i in range(10**6)]",
        user_expressions={"never": "ue"},
    )
    assert r.status == "error" and r.content["ename"] == "AllocationLimitExceeded"
    assert r.content["user_expressions"] == {}
    assert kernel.value("ue") == "1"


def test_stop_on_error_aborts_queued_cells(kernel: Kernel) -> None:
    first = kernel.submit("while True: pass")
    queued = [kernel.submit(f"queued_{i} = 1") for i in range(2)]
    time.sleep(0.3)
    kernel.interrupt_and_wait()
    assert kernel.collect(first).status == "error"
    assert [kernel.collect(q).status for q in queued] == ["aborted", "aborted"]
    assert kernel.value("'queued_0' in globals()") == "False"


def test_output_before_an_interrupt_is_kept(kernel: Kernel) -> None:
    r = kernel.interrupt_after("print('partial', flush=True)\nwhile True: pass", delay=0.3)
    assert r.status == "error"
    assert "partial" in "".join(m["content"].get("text", "") for m in r.outputs)


def test_ipython_features_keep_working(kernel: Kernel) -> None:
    assert "Wall time" in kernel.ok("%time sum(range(10))").stdout
    assert (
        kernel.ok("from IPython.display import display\ndisplay(7)").outputs[0]["content"]["data"][
            "text/plain"
        ]
        == "7"
    )
    kernel.ok("get_ipython().run_cell('nested = 5')")
    assert kernel.value("nested") == "5"
    assert kernel.ok("import asyncio\nawait asyncio.sleep(0)\n6 * 7").result == "42"
    r = kernel.ok("%lsmagic")
    assert "%limits" in (r.result or "")


def test_kernel_info_drops_subshells_and_debugger(kernel: Kernel) -> None:
    msg_id = kernel.kc.kernel_info()
    reply = kernel.kc.get_shell_msg(timeout=10)
    assert reply["parent_header"]["msg_id"] == msg_id
    features = reply["content"].get("supported_features", [])
    assert "kernel subshells" not in features and "debugger" not in features
    assert reply["content"]["implementation"] == "memprof_limits_kernel"


def test_subshells_are_refused(kernel: Kernel) -> None:
    msg = kernel.kc.session.msg("create_subshell_request", {})
    kernel.kc.control_channel.send(msg)
    reply = kernel.kc.get_control_msg(timeout=10)
    assert reply["msg_type"] == "create_subshell_reply"
    assert reply["content"]["status"] == "error"
    assert "subshells" in reply["content"]["evalue"]
    assert kernel.ok("2 + 2").result == "4"


def test_hash_seed_is_fixed(kernel: Kernel) -> None:
    # Seed 0 for the kernel itself, not exported (test_kernel_hash_seed.py).
    assert kernel.value("__import__('sys').flags.hash_randomization") == "0"
    expected = repr(__import__("os").environ.get("PYTHONHASHSEED"))
    assert kernel.value("__import__('os').environ.get('PYTHONHASHSEED')") == expected


def test_a_failing_repr_fails_the_cell_as_in_ipykernel(kernel: Kernel) -> None:
    kernel.ok("class BadRepr:\n    def __repr__(self):\n        raise ValueError('bad repr')")
    r = kernel.run("BadRepr()")
    assert r.status == "error" and r.result is None
    assert [e["ename"] for e in r.errors] == ["ValueError"]
    assert kernel.ok("1 + 1").result == "2"
