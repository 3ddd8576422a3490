"""Interrupts, in both interrupt modes: the running cell's token is set, the
cell replies an error within a second and its changes are rolled back."""

from __future__ import annotations

import re

import pytest
from kernel_helpers import Kernel

# Each case rebinds x (1 before the cell) and binds new names before it blocks.
CASES = {
    "busy loop": "x = 0\nnew = 'added'\nwhile True:\n    pass",
    "sleep": "import time\nx = 0\nnew = 'added'\ntime.sleep(60)",
    "socket read": ("import socket\nx = 0\na, b = socket.socketpair()\nnew = a.recv(1)"),
    "allocating loop": (
        "x = 0\nnew = []\nwhile True:\n    new.append([str(i) for i in range(100)])\n"
        "    if len(new) > 1000:\n        new.clear()"
    ),
    # Most of the time in the kernel's masked flush: the interrupt is
    # delivered as it returns, in a kernel frame that must not be shown.
    "printing loop": "x = 0\nnew = 'added'\nwhile True:\n    print('.', end='', flush=True)",
}

KERNEL_FRAMES = re.compile(r"ipykernel|IPython/core|memprof_limits/_|memprof_limits_kernel")


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_interrupt_stops_the_cell_and_rolls_back(any_kernel: Kernel, case: str) -> None:
    k = any_kernel
    k.ok("x = 1\nnew = None\ndel new")
    r = k.interrupt_after(CASES[case], delay=0.3)
    assert r.status == "error", r.content
    assert r.content["ename"] == "Interrupted"
    assert r.elapsed_s < 1.0, f"interrupt -> reply took {r.elapsed_s:.3f} s"
    evalue = r.content["evalue"]
    assert "rolled back:" in evalue and "x (changed)" in evalue, evalue
    # One error output, the same as the reply; no traceback from kernel internals.
    assert len(r.errors) == 1 and r.errors[0]["evalue"] == evalue
    tb = "\n".join(r.content["traceback"])
    assert "KeyboardInterrupt" not in tb
    assert not KERNEL_FRAMES.search(re.sub(r"\x1b\[[0-9;]*m", "", tb)), tb
    figures = r.figures
    assert figures["interrupted"] is True and figures["reason"] == "token"
    assert "x" in figures["rolled_back"]["changed"]
    # The next cell sees the namespace as it was before the interrupted cell.
    assert k.value("x") == "1"
    assert k.value("'new' in globals()") == "False"


def test_interrupt_while_idle_does_not_affect_the_next_cell(any_kernel: Kernel) -> None:
    k = any_kernel
    k.ok("pass")
    k.interrupt_and_wait()
    k.interrupt_and_wait()
    r = k.ok("import time\ntime.sleep(0.3)\ny = 2")
    assert r.figures["interrupted"] is False
    assert k.value("y") == "2"


def test_interrupted_async_cell(any_kernel: Kernel) -> None:
    k = any_kernel
    k.ok("z = 1")
    r = k.interrupt_after("import asyncio\nz = 0\nawait asyncio.sleep(60)", delay=0.3)
    assert r.status == "error" and r.content["ename"] == "Interrupted", r.content
    assert r.elapsed_s < 1.0
    assert k.value("z") == "1"
    assert k.value("'asyncio' in globals()") == "False"
    assert k.ok("import asyncio\nawait asyncio.sleep(0.01)\n40 + 2").result == "42"
