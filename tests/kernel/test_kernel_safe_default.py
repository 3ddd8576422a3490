"""Safe by default (DESIGN.md §9): a kernel started with nothing configured has a
memory limit derived from the memory it may use, and a runaway cell is stopped by it --
interrupted, rolled back, the kernel alive and usable -- instead of the OOM killer
taking the kernel.  Tested for real in a small memory cgroup (where one can be made)
and with a small configured budget (MEMPROF_LIMITS)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from cgroup_helpers import enter_command, memory_cgroup
from kernel_helpers import _ROOT, Kernel

import memprof_limits as ml

MiB = 2**20
RUNAWAY = (
    "state = 'changed'\nblocks = []\n"
    "while len(blocks) < 8192:\n"  # 8 GiB if nothing stops it
    "    blocks.append(bytearray(2**20))"
)


def _runaway_is_stopped(k: Kernel, limit: int) -> None:
    k.ok("state = 'kept'")
    r = k.run(RUNAWAY, timeout=120)
    assert r.status == "error", r.content
    assert r.content["ename"] == "MemoryLimitExceeded", r.content
    evalue = r.content["evalue"]
    assert "state (changed)" in evalue and "blocks (added)" in evalue, evalue
    assert r.figures["limits"]["memory"] == limit, r.figures
    assert r.figures["peak_rss_bytes"] < limit + 64 * MiB, r.figures
    # Alive, rolled back, usable.
    assert k.km.is_alive()
    assert k.value("state") == "'kept'"
    assert k.value("'blocks' in globals()") == "False"
    assert k.ok("sum(range(10))").result == "45"


def test_a_kernel_in_a_small_cgroup_stops_a_runaway_cell() -> None:
    cgroup_limit = 768 * MiB
    with memory_cgroup(cgroup_limit) as cgroup:
        if cgroup is None:
            pytest.skip("cannot make a memory cgroup here (not root, or no memory controller)")
        from memprof_limits_kernel.install import install

        name = f"memprof-limits-cgroup-{os.getpid()}"
        path = Path(install(prefix=str(_ROOT), kernel_name=name))
        spec = json.loads((path / "kernel.json").read_text())
        spec["argv"] = enter_command(cgroup, spec["argv"])
        (path / "kernel.json").write_text(json.dumps(spec))
        env = {k: v for k, v in os.environ.items() if k != "MEMPROF_LIMITS"}
        k = Kernel(name, env=env)
        try:
            assert k.value("open('/proc/self/cgroup').read()").find(cgroup.name) >= 0
            expected = int(cgroup_limit * 0.8)
            limits = k.ok("%limits").stdout
            assert f"memory={ml.format_bytes(expected)} (the default memory limit: 80% of " in (
                limits
            ), limits
            assert "768.0 MiB, the cgroup limit of " in limits and cgroup.name in limits, limits
            _runaway_is_stopped(k, expected)
            _runaway_is_stopped(k, expected)  # and again
        finally:
            k.close()


def test_a_kernel_with_a_small_configured_budget_stops_a_runaway_cell() -> None:
    k = Kernel(env={**os.environ, "MEMPROF_LIMITS": "memory=400MB"})
    try:
        assert k.ok("%limits").stdout.startswith("session limits: memory=400MB\n")
        _runaway_is_stopped(k, 400 * 10**6)
    finally:
        k.close()


def test_memory_off_in_the_environment_removes_the_default() -> None:
    k = Kernel(env={**os.environ, "MEMPROF_LIMITS": "memory=off"})
    try:
        assert k.ok("%limits").stdout.startswith("session limits: no limits\n")
    finally:
        k.close()
