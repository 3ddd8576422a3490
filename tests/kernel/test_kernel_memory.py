"""A cell that exceeds the memory limit is interrupted, rolled back, its memory
is released, and the kernel answers the next cell with its state."""

from __future__ import annotations

import pytest
from kernel_helpers import MESSAGE, Kernel

RSS = "int(open('/proc/self/statm').read().split()[1]) * __import__('os').sysconf('SC_PAGE_SIZE')"


@pytest.fixture(scope="module")
def kernel() -> Kernel:
    k = Kernel(MESSAGE)
    yield k  # type: ignore[misc]
    k.close()


def test_memory_limit_interrupts_and_the_kernel_survives(kernel: Kernel) -> None:
    kernel.ok("state = 'kept'\nbaseline = " + RSS)
    baseline = int(kernel.value("baseline"))
    limit = baseline + 200 * 2**20
    kernel.ok(f"%limits memory={limit}")
    # Grow a list of 1 MiB blocks towards 4x the limit.
    r = kernel.run(
        "state = 'changed'\nblocks = []\n"
        f"while len(blocks) < 4 * {limit} // 2**20:\n"
        "    blocks.append(bytearray(2**20))",
        timeout=60,
    )
    assert r.status == "error", r.content
    assert r.content["ename"] == "MemoryLimitExceeded"
    evalue = r.content["evalue"]
    assert evalue.startswith("global memory limit of"), evalue
    assert "state (changed)" in evalue and "blocks (added)" in evalue, evalue
    assert "freed " in evalue, evalue
    f = r.figures
    assert f["reason"] == "memory" and f["limits"]["memory"] == limit
    # Interrupted near the limit, not at 4x it.  A block of 1 MiB or more is checked before
    # its pages are touched (RSS + block over the limit): the peak may stay just below it.
    assert limit - 2 * 2**20 < f["peak_rss_bytes"] < limit + 100 * 2**20, f
    assert f["freed_bytes"] > 100 * 2**20, f
    # The kernel answers, with its state, and the memory is back.
    assert kernel.value("state") == "'kept'"
    assert kernel.value("'blocks' in globals()") == "False"
    assert int(kernel.value(RSS)) < baseline + 100 * 2**20
    assert kernel.km.is_alive()
    kernel.ok("%limits off")
