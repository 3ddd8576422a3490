"""A small memory cgroup for a test's processes (we run as root in CI), or None.

Made under this process's own memory cgroup (v1 ``memory.limit_in_bytes``, or
v2 ``memory.max`` where the memory controller is enabled for children), so
that the default memory limit of a kernel or a REPL started in it is derived
from a cgroup limit, as in a container.  Processes enter it with
:func:`enter_command` (``sh -c 'echo $$ > cgroup.procs; exec ...'``).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

from memprof_limits._defaults import _mounts, _own_cgroups


def _make(limit: int) -> Path | None:
    for version, path in _own_cgroups("/"):
        name = "memory.limit_in_bytes" if version == "v1" else "memory.max"
        for mount_version, mount_root, mount_point in _mounts("/"):
            if mount_version != version:
                continue
            rel = os.path.relpath(path, mount_root)
            base = Path(mount_point) / ("" if rel == "." else rel)
            d = base / f"mlk-test-{os.getpid()}-{time.monotonic_ns()}"
            try:
                d.mkdir()
            except OSError:
                continue
            try:
                (d / name).write_text(str(limit))
                if int((d / name).read_text()) > 2 * limit:
                    raise OSError("limit not applied")
            except (OSError, ValueError):
                d.rmdir()
                continue
            return d
    return None


@contextlib.contextmanager
def memory_cgroup(limit: int) -> Iterator[Path | None]:
    """A fresh cgroup limited to ``limit`` bytes (None if none can be made),
    removed at the end once its processes have gone."""
    d = _make(limit)
    try:
        yield d
    finally:
        if d is not None:
            for _ in range(100):
                try:
                    d.rmdir()
                    break
                except OSError:
                    time.sleep(0.1)


def enter_command(cgroup: Path, argv: list[str]) -> list[str]:
    """``argv`` run inside ``cgroup`` (the same process: exec)."""
    procs = cgroup / "cgroup.procs"
    return ["sh", "-c", f'echo $$ > {procs} && exec "$@"', "sh", *argv]
