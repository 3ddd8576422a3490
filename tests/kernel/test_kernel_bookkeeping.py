"""Issue 12, items 9-11: the kernel always replies and never loses a session;
a completed cell is never rolled back; everything IPython runs for a cell
can be interrupted.

Each test makes the library's own bookkeeping fail (a ``Guarded`` whose
``__snapshot__``/``__restore__`` raises, an absurd size, an unprintable
namespace key, a broken report) or interrupts IPython's machinery around the
user's code, and checks that the request gets a reply naming the culprit and
that the next cells run normally.
"""

from __future__ import annotations

import os
import queue
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from kernel_helpers import MESSAGE, Kernel

# Replies must come quickly; a missing reply is the bug, so do not wait long.
REPLY_TIMEOUT_S = 15.0

BAD_GUARDS = """\
import memprof_limits as ml, time
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


def alive(k: Kernel) -> None:
    """The session is usable: a plain cell runs and shows its value."""
    r = k.run("6 * 7", timeout=REPLY_TIMEOUT_S)
    assert r.status == "ok" and r.result == "42", (r.content, r.outputs)


def test_a_snapshot_that_raises_costs_no_reply(kernel: Kernel) -> None:
    kernel.ok(BAD_GUARDS + "x = 1")
    kernel.ok("bad = ml.Guarded(BadSnapshot(), name='bad')")
    culprit = "checkpoint: Guarded 'bad': __snapshot__ raised ValueError: no snapshot for you"
    # The cell runs (so the user can fix things), and is told.
    r = kernel.run("y = 2\ny", timeout=REPLY_TIMEOUT_S)
    assert r.status == "ok" and r.result == "2", r.content
    assert culprit in r.stderr, r.outputs
    assert r.figures["bookkeeping_errors"] == [culprit]
    # Interrupted: the namespace is rolled back, the reply names the value
    # that could not be.
    r = kernel.interrupt_after("x = 0\nwhile True: pass", delay=0.3, timeout=REPLY_TIMEOUT_S)
    assert r.status == "error" and r.content["ename"] == "Interrupted", r.content
    assert culprit in r.content["evalue"] and "x (changed)" in r.content["evalue"]
    assert kernel.value("x") == "1"
    # `del` works, and then the warnings stop.
    r = kernel.run("del bad", timeout=REPLY_TIMEOUT_S)
    assert r.status == "ok", r.content
    r = kernel.ok("import gc; gc.collect(); z = 3")
    assert "checkpoint" not in r.stderr, r.stderr
    alive(kernel)


def test_a_restore_that_raises_costs_no_reply(any_kernel: Kernel) -> None:
    k = any_kernel
    k.ok(BAD_GUARDS + "x = 1")
    k.ok("bad = ml.Guarded(BadRestore(), name='bad')\ngood = ml.Guarded([1], name='good')")
    r = k.interrupt_after(
        "x = 0\nbad.value.n = 5\ngood.value.append(2)\ntime.sleep(60)",
        delay=0.3,
        timeout=REPLY_TIMEOUT_S,
    )
    assert r.status == "error" and r.content["ename"] == "Interrupted", r.content
    evalue = r.content["evalue"]
    assert "rollback: Guarded 'bad': __restore__ raised ValueError: no restore for you" in evalue
    assert "x (changed)" in evalue and "good (restored)" in evalue, evalue
    assert r.figures["bookkeeping_errors"] == [
        "rollback: Guarded 'bad': __restore__ raised ValueError: no restore for you"
    ]
    assert k.value("(x, good.value, bad.value.n)") == "(1, [1], 5)"
    # Every later cell gets a reply, `del` included.
    for code in ["y = 1", "del bad", "import gc; gc.collect()"]:
        assert k.run(code, timeout=REPLY_TIMEOUT_S).status == "ok", code
    alive(k)


@pytest.mark.parametrize(
    "code",
    [
        "%%limits allocations=1e308TB\nnever = 1",
        "%%limits memory=1e400GiB\nnever = 1",
        "%%limits allocations=" + "9" * 500 + "\nnever = 1",
        "%limits allocations=1e308TB",
        "%limits memory=1e99999999",
    ],
    ids=["cell-alloc", "cell-mem", "cell-digits", "line-alloc", "line-mem"],
)
def test_absurd_limits_are_a_usage_error(kernel: Kernel, code: str) -> None:
    before = kernel.ok("%limits").stdout.splitlines()[0]
    r = kernel.run(code, timeout=REPLY_TIMEOUT_S)
    assert r.status == "error" and r.content["ename"] == "UsageError", r.content
    assert "limits" in r.content["evalue"] and "expected" in r.content["evalue"], r.content
    assert "limits: limits:" not in r.content["evalue"], r.content
    assert kernel.value("'never' in globals()") == "False"
    assert kernel.ok("%limits").stdout.splitlines()[0] == before
    alive(kernel)


def test_an_unprintable_namespace_key_costs_no_reply(kernel: Kernel) -> None:
    kernel.ok(
        "class Key:\n"
        "    def __str__(self):\n        raise RuntimeError('no str')\n"
        "    def __repr__(self):\n        raise RuntimeError('no repr')\n"
        "k = 1"
    )
    r = kernel.interrupt_after(
        "k = 2\nglobals()[Key()] = 1\nwhile True: pass", delay=0.3, timeout=REPLY_TIMEOUT_S
    )
    assert r.status == "error" and r.content["ename"] == "Interrupted", r.content
    evalue = r.content["evalue"]
    assert "<unprintable Key> (added)" in evalue and "k (changed)" in evalue, evalue
    assert kernel.value("k") == "1"
    assert kernel.value("[type(n).__name__ for n in globals() if not isinstance(n, str)]") == "[]"
    # Left in the namespace by a completed cell: later cells still reply.
    kernel.ok("globals()[Key()] = 2")
    r = kernel.interrupt_after("k = 3\nwhile True: pass", delay=0.3, timeout=REPLY_TIMEOUT_S)
    assert r.status == "error" and "k (changed)" in r.content["evalue"]
    kernel.ok("for n in [n for n in globals() if not isinstance(n, str)]:\n    del globals()[n]")
    alive(kernel)


def test_a_broken_report_still_replies_and_names_the_culprit(kernel: Kernel) -> None:
    """The last line of defence: the library's own formatting code fails
    (monkeypatched by the cell, as a bug would); the request still gets an
    error reply that says so, and the kernel goes on."""
    kernel.ok(
        "import memprof_limits as ml\n"
        "saved = (ml.CellOutcome.interrupt_line, ml.CellOutcome.metadata)\n"
        "def broken(self):\n    raise RuntimeError('report bug')"
    )
    kernel.ok("ml.CellOutcome.interrupt_line = broken")
    r = kernel.interrupt_after("while True: pass", delay=0.3, timeout=REPLY_TIMEOUT_S)
    assert r.status == "error", r.content
    assert "report" in r.content["evalue"] and "RuntimeError: report bug" in r.content["evalue"]
    r = kernel.run("ml.CellOutcome.metadata = broken", timeout=REPLY_TIMEOUT_S)
    r = kernel.run("1 + 1", timeout=REPLY_TIMEOUT_S)
    assert r.status == "ok" and r.result == "2"
    assert "RuntimeError: report bug" in r.msg["metadata"]["memprof_limits"]["error"]
    kernel.ok("ml.CellOutcome.interrupt_line, ml.CellOutcome.metadata = saved")
    assert kernel.ok("1").figures["interrupted"] is False
    alive(kernel)


def test_a_broken_cell_setup_runs_the_cell_unprotected_and_says_so(kernel: Kernel) -> None:
    """If opening the cell fails (a bug), refusing would refuse every later
    cell too: the cell runs as in stock IPython, after a line that says so."""
    kernel.ok("ip = get_ipython()\ndef broken(limits=None):\n    raise RuntimeError('setup bug')")
    kernel.ok("ip.kernel.runner.cell = broken")
    r = kernel.run("after = 5\nafter", timeout=REPLY_TIMEOUT_S)
    assert r.status == "ok" and r.result == "5", r.content
    problem = "cell setup: RuntimeError: setup bug"
    assert f"memprof-limits: {problem}; this cell runs without limits" in r.stderr, r.outputs
    assert r.msg["metadata"]["memprof_limits"] == {"error": problem}
    r = kernel.run("del ip.kernel.runner.cell", timeout=REPLY_TIMEOUT_S)
    assert r.status == "ok", r.content
    assert kernel.ok("after").figures["interrupted"] is False
    alive(kernel)


def test_absurd_default_limits_do_not_stop_the_kernel() -> None:
    for spec in ["allocations=1e308TB", "memory=lots"]:
        k = Kernel(MESSAGE, env={**os.environ, "MEMPROF_LIMITS": spec})
        try:
            r = k.ok("1")
            assert f"MEMPROF_LIMITS={spec!r}" in r.stderr, r.outputs
            assert "the default memory limit" in r.stderr and "stays" in r.stderr, r.outputs
            # Safe by default even then: the default memory limit, nothing else.
            assert "(the default memory limit: " in k.ok("%limits").stdout
            assert k.ok("1").figures["limits"]["allocations"] is None
            assert "MEMPROF_LIMITS" not in k.ok("2").stderr  # said once
        finally:
            k.close()


# -- item 10: a completed cell is never rolled back ---------------------------------------


def test_an_interrupt_while_the_value_is_published_is_ignored(kernel: Kernel) -> None:
    """Deterministic: the display hook itself interrupts the cell just before
    it sends the value (after the last statement's task returned)."""
    kernel.ok(
        "ip = get_ipython()\n"
        "def late(*args, **kwargs):\n"
        "    ip.kernel.interrupt_cell()\n"
        "    return type(ip.displayhook).write_format_data(ip.displayhook, *args, **kwargs)\n"
        "v = 1"
    )
    kernel.ok("ip.displayhook.write_format_data = late")
    r = kernel.run("v = 2\nv * 21", timeout=REPLY_TIMEOUT_S)
    kernel.ok("del ip.displayhook.write_format_data")
    assert r.status == "ok" and r.result == "42", r.content
    assert r.figures["interrupted"] is False and r.figures["rolled_back"] is None
    assert kernel.value("v") == "2"


def test_an_interrupt_in_a_post_run_cell_hook_does_not_roll_back(kernel: Kernel) -> None:
    """The hook sets the token itself and then sleeps: the sleep is cut
    short, the cell (whose value was shown) replies ok and keeps its work."""
    kernel.ok(
        "import time\n"
        "ip = get_ipython()\n"
        "def hook(result):\n"
        "    ip.kernel.interrupt_cell()\n"
        "    time.sleep(30)\n"
        "ip.events.register('post_run_cell', hook)\n"
        "w = 1"
    )
    t0 = time.monotonic()
    r = kernel.run("w = 2\nw * 21", timeout=REPLY_TIMEOUT_S)
    took = time.monotonic() - t0
    kernel.ok("ip.events.unregister('post_run_cell', hook)")
    assert r.status == "ok" and r.result == "42", r.content
    assert took < 5, took
    assert r.figures["interrupted"] is False and r.figures["rolled_back"] is None
    assert "post_run_cell" in r.stderr and "not rolled back" in r.stderr, r.outputs
    assert kernel.value("w") == "2"


# -- item 11: everything IPython runs for a cell can be interrupted -------------------------

HOOKS = {
    # name: (code registering a callable that loops once, code unregistering it)
    "pre_run_cell": (
        "def looping(info):\n    if state.pop('loop', False):\n        while True: pass\n"
        "ip.events.register('pre_run_cell', looping)",
        "ip.events.unregister('pre_run_cell', looping)",
    ),
    "pre_execute": (
        "def looping():\n    if state.pop('loop', False):\n        while True: pass\n"
        "ip.events.register('pre_execute', looping)",
        "ip.events.unregister('pre_execute', looping)",
    ),
    "input transformer": (
        "def looping(lines):\n    if state.pop('loop', False):\n        while True: pass\n"
        "    return lines\n"
        "ip.input_transformers_post.append(looping)",
        "ip.input_transformers_post.remove(looping)",
    ),
    "ast transformer": (
        "import ast\n"
        "class Looping(ast.NodeTransformer):\n"
        "    def visit_Module(self, node):\n"
        "        if state.pop('loop', False):\n            while True: pass\n"
        "        return node\n"
        "looping = Looping()\n"
        "ip.ast_transformers.append(looping)",
        "ip.ast_transformers.remove(looping)",
    ),
}


@pytest.fixture
def hook_kernel(any_kernel: Kernel, request: pytest.FixtureRequest) -> Iterator[Kernel]:
    any_kernel.ok("ip = get_ipython()\nstate = {}\nran = 0")
    yield any_kernel


@pytest.mark.parametrize("hook", list(HOOKS), ids=list(HOOKS))
def test_a_looping_hook_before_the_cell_is_interrupted(hook_kernel: Kernel, hook: str) -> None:
    k = hook_kernel
    register, unregister = HOOKS[hook]
    k.ok(register)
    try:
        k.ok("state['loop'] = True")
        r = k.interrupt_after("ran = 1\n'shown'", delay=0.5, timeout=REPLY_TIMEOUT_S)
        assert r.status == "error" and r.content["ename"] == "Interrupted", r.content
        assert r.elapsed_s < 2.0, r.elapsed_s
        assert r.result is None
        assert k.value("ran") == "0"  # the cell's code never ran
        assert k.value("state") == "{}"  # the hook really looped (and was stopped)
    finally:
        k.ok(unregister)
    alive(k)


def test_a_looping_post_run_cell_hook_is_interrupted(hook_kernel: Kernel) -> None:
    """The hook loops after the cell's value was published: the front end's
    interrupt stops the hook, the cell replies ok and is not rolled back."""
    k = hook_kernel
    k.ok(
        "def looping(result):\n    if state.pop('loop', False):\n        while True: pass\n"
        "ip.events.register('post_run_cell', looping)"
    )
    try:
        msg_id = k.submit("ran = 2\nstate['loop'] = True\n6 * 7")
        deadline = time.monotonic() + REPLY_TIMEOUT_S
        while True:  # the value is out: the cell's code is done, the hook loops
            msg = k.kc.get_iopub_msg(timeout=max(0.01, deadline - time.monotonic()))
            if msg["parent_header"].get("msg_id") == msg_id:
                if msg["msg_type"] == "execute_result":
                    break
        time.sleep(0.3)
        with pytest.raises(queue.Empty):
            k.kc.get_shell_msg(timeout=0.01)  # still looping: no reply yet
        k.km.interrupt_kernel()
        r = k.collect(msg_id, timeout=REPLY_TIMEOUT_S)
        assert r.status == "ok", r.content
        assert r.figures["interrupted"] is False and r.figures["rolled_back"] is None
        assert "post_run_cell" in r.stderr and "not rolled back" in r.stderr, r.outputs
        assert k.value("ran") == "2"
    finally:
        k.ok("ip.events.unregister('post_run_cell', looping)")
    alive(k)


def test_user_expressions_after_the_cell_do_not_roll_it_back(kernel: Kernel) -> None:
    r = kernel.run(
        "%%limits allocations=1MB\nue = 2",
        user_expressions={"big": "[str(i) for i in range(10**6)]", "after": "ue"},
    )
    assert r.status == "ok", r.content
    exprs = r.content["user_expressions"]
    assert exprs["big"]["status"] == "error"
    assert exprs["big"]["ename"] == "AllocationLimitExceeded", exprs
    assert exprs["after"]["status"] == "error", exprs  # the budget is spent
    assert kernel.value("ue") == "2"


@pytest.mark.parametrize("runner", ["trio", "curio"])
def test_other_event_loops_are_refused_clearly(kernel: Kernel, runner: str) -> None:
    r = kernel.run(f"%autoawait {runner}", timeout=REPLY_TIMEOUT_S)
    assert r.status == "error" and r.content["ename"] == "UsageError", r.content
    assert runner in r.content["evalue"] and "asyncio" in r.content["evalue"], r.content
    r = kernel.ok("%autoawait")
    assert "set to use `asyncio`" in r.stdout, r.stdout
    assert kernel.ok("import asyncio\nawait asyncio.sleep(0)\n'still asyncio'").result == (
        "'still asyncio'"
    )


def test_another_event_loop_in_the_configuration_does_not_stop_the_kernel(
    tmp_path: Path,
) -> None:
    profile = tmp_path / "profile_default"
    profile.mkdir()
    (profile / "memprof_limits_kernel_config.py").write_text(
        "c.InteractiveShell.loop_runner = 'trio'\n"
        "c.MemprofLimitsKernel.default_limits = 'allocations=5MB'\n"
    )
    k = Kernel(MESSAGE, env={**os.environ, "IPYTHONDIR": str(tmp_path)})
    try:
        limits = k.ok("%limits").stdout
        assert "allocations=5MB" in limits, limits  # the file was read
        assert "(the default memory limit: " in limits, limits  # over the default
        assert "set to use `asyncio`" in k.ok("%autoawait").stdout
        assert k.ok("import asyncio\nawait asyncio.sleep(0)\n1").result == "1"
    finally:
        k.close()
