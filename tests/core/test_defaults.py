"""The safe default memory limit of the kernel and the REPL (``memprof_limits._defaults``),
on fake ``/proc`` and cgroup trees: cgroup v2 and v1, nested cgroups, "max", v1's huge
"no limit" value, garbage files, and no cgroup at all."""

from __future__ import annotations

from pathlib import Path

import pytest

from memprof_limits._defaults import (
    FRACTION,
    default_memory_limit,
    memory_the_process_may_use,
    start_limits,
)

GiB = 2**30
MEMTOTAL_KB = 16 * 2**20  # 16 GiB


def fake_root(
    tmp: Path,
    *,
    meminfo: str | None = f"MemTotal:       {MEMTOTAL_KB} kB\nMemFree: 1 kB\n",
    cgroup: str | None = "0::/\n",
    mountinfo: str | None = None,
    files: dict[str, str] | None = None,
) -> str:
    proc = tmp / "proc" / "self"
    proc.mkdir(parents=True)
    if meminfo is not None:
        (tmp / "proc" / "meminfo").write_text(meminfo)
    if cgroup is not None:
        (proc / "cgroup").write_text(cgroup)
    if mountinfo is not None:
        (proc / "mountinfo").write_text(mountinfo)
    for path, text in (files or {}).items():
        f = tmp / path.lstrip("/")
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(text)
    return str(tmp)


V2_MOUNT = "30 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw\n"
V1_MOUNT = "35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n"


def test_no_cgroup_limit_uses_physical_memory(tmp_path: Path) -> None:
    root = fake_root(tmp_path, mountinfo=V2_MOUNT)
    d = default_memory_limit(root)
    assert d.basis == 16 * GiB and d.bytes == int(16 * GiB * FRACTION)
    assert "physical memory" in d.describe() and "MemTotal" in d.describe()
    assert not d.notes


def test_cgroup_v2_limit(tmp_path: Path) -> None:
    root = fake_root(
        tmp_path,
        cgroup="0::/user.slice/job\n",
        mountinfo=V2_MOUNT,
        files={"/sys/fs/cgroup/user.slice/job/memory.max": f"{2 * GiB}\n"},
    )
    d = default_memory_limit(root)
    assert d.basis == 2 * GiB and d.bytes == int(2 * GiB * FRACTION)
    assert "cgroup" in d.describe() and "/user.slice/job" in d.describe(), d.describe()


def test_cgroup_v2_max_is_no_limit(tmp_path: Path) -> None:
    root = fake_root(
        tmp_path,
        cgroup="0::/a\n",
        mountinfo=V2_MOUNT,
        files={"/sys/fs/cgroup/a/memory.max": "max\n"},
    )
    d = default_memory_limit(root)
    assert d.basis == 16 * GiB and "physical memory" in d.describe() and not d.notes


def test_nested_cgroup_a_parent_limit_applies(tmp_path: Path) -> None:
    """The smallest limit on the way to the root is the one that binds."""
    root = fake_root(
        tmp_path,
        cgroup="0::/outer/inner/leaf\n",
        mountinfo=V2_MOUNT,
        files={
            "/sys/fs/cgroup/outer/memory.max": f"{3 * GiB}\n",
            "/sys/fs/cgroup/outer/inner/memory.max": f"{5 * GiB}\n",
            "/sys/fs/cgroup/outer/inner/leaf/memory.max": "max\n",
        },
    )
    d = default_memory_limit(root)
    assert d.basis == 3 * GiB, d
    assert "/outer" in d.describe() and "/outer/inner" not in d.describe(), d.describe()


def test_cgroup_namespace_mount_root(tmp_path: Path) -> None:
    """A container's cgroup mount whose root is the container's own cgroup."""
    mount = "30 23 0:26 /kubepods/pod1 /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n"
    root = fake_root(
        tmp_path,
        cgroup="0::/kubepods/pod1/ctr\n",
        mountinfo=mount,
        files={"/sys/fs/cgroup/ctr/memory.max": f"{GiB}\n"},
    )
    assert default_memory_limit(root).basis == GiB


def test_cgroup_v1_limit_and_huge_value(tmp_path: Path) -> None:
    v1 = "4:memory:/process_api/abc\n0::/\n"
    files = {"/sys/fs/cgroup/memory/process_api/abc/memory.limit_in_bytes": f"{GiB}\n"}
    root = fake_root(tmp_path / "a", cgroup=v1, mountinfo=V1_MOUNT, files=files)
    assert default_memory_limit(root).basis == GiB
    huge = {"/sys/fs/cgroup/memory/process_api/abc/memory.limit_in_bytes": "9223372036854771712\n"}
    root = fake_root(tmp_path / "b", cgroup=v1, mountinfo=V1_MOUNT, files=huge)
    d = default_memory_limit(root)
    assert d.basis == 16 * GiB and "physical memory" in d.describe() and not d.notes


def test_a_cgroup_limit_above_physical_memory_is_physical_memory(tmp_path: Path) -> None:
    root = fake_root(
        tmp_path,
        cgroup="0::/big\n",
        mountinfo=V2_MOUNT,
        files={"/sys/fs/cgroup/big/memory.max": f"{64 * GiB}\n"},
    )
    assert default_memory_limit(root).basis == 16 * GiB


def test_without_mountinfo_the_usual_mount_points(tmp_path: Path) -> None:
    root = fake_root(
        tmp_path,
        cgroup="0::/x\n",
        mountinfo=None,
        files={"/sys/fs/cgroup/x/memory.max": f"{GiB}\n"},
    )
    assert default_memory_limit(root).basis == GiB


def test_garbage_cgroup_file_falls_back_and_says_so(tmp_path: Path) -> None:
    root = fake_root(
        tmp_path,
        cgroup="0::/x\n",
        mountinfo=V2_MOUNT,
        files={"/sys/fs/cgroup/x/memory.max": "lots\n"},
    )
    d = default_memory_limit(root)
    assert d.basis == 16 * GiB
    assert len(d.notes) == 1 and "memory.max" in d.notes[0] and "'lots'" in d.notes[0], d.notes
    assert "physical memory" in d.describe()


@pytest.mark.parametrize(
    "cgroup", ["garbage without colons\n", "\x00\xff", "4:memory\n", ""], ids=repr
)
def test_garbage_proc_self_cgroup(tmp_path: Path, cgroup: str) -> None:
    root = fake_root(tmp_path, cgroup=cgroup, mountinfo="garbage\n")
    assert default_memory_limit(root).basis == 16 * GiB


@pytest.mark.parametrize(
    "meminfo", [None, "MemTotal: many kB\n", "nothing here\n", "MemTotal: 0 kB\n"], ids=repr
)
def test_no_readable_memory_size_means_no_default_limit(tmp_path: Path, meminfo: str) -> None:
    root = fake_root(tmp_path, meminfo=meminfo, cgroup=None)
    d = default_memory_limit(root)
    assert d.bytes is None and d.basis is None
    assert d.notes and "meminfo" in d.notes[-1], d.notes
    assert d.describe().startswith("no default memory limit"), d.describe()


def test_memory_the_process_may_use_on_this_machine() -> None:
    basis, _source, _notes = memory_the_process_may_use()
    assert basis is None or basis > 2**24


def test_start_limits_spec_overrides_the_default(tmp_path: Path) -> None:
    root = fake_root(tmp_path, mountinfo=V2_MOUNT)
    default = int(16 * GiB * FRACTION)
    s = start_limits(None, source="MEMPROF_LIMITS", root=root)
    assert s.limits.memory == default and s.limits.allocations is None and not s.warnings
    assert s.memory_is_default
    s = start_limits("allocations=1GB", source="MEMPROF_LIMITS", root=root)
    assert (s.limits.memory, s.limits.allocations) == (default, 10**9) and s.memory_is_default
    s = start_limits("memory=2GiB", source="MEMPROF_LIMITS", root=root)
    assert s.limits.memory == 2 * GiB and not s.memory_is_default
    s = start_limits("memory=off", source="MEMPROF_LIMITS", root=root)
    assert s.limits.memory is None and not s.memory_is_default
    s = start_limits("off", source="MEMPROF_LIMITS", root=root)
    assert s.limits.memory is None and s.limits.allocations is None


def test_start_limits_bad_spec_keeps_the_default_and_says_so(tmp_path: Path) -> None:
    root = fake_root(tmp_path, mountinfo=V2_MOUNT)
    s = start_limits("allocations=1e308TB", source="MEMPROF_LIMITS", root=root)
    assert s.limits.memory == int(16 * GiB * FRACTION) and s.limits.allocations is None
    (warning,) = s.warnings
    assert warning.startswith("memprof-limits: ignoring MEMPROF_LIMITS='allocations=1e308TB': ")
    assert "default" in warning and "expected" in warning, warning
