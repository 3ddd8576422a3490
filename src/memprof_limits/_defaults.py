"""The safe default memory limit of the kernel and the REPL.

The problem
-----------
A notebook cell or a REPL input that allocates without bound gets the whole
process killed by the OOM killer (of the machine, or of its container), with
all its state -- unless a global memory limit interrupts it first.  A limit
that the user must think of setting protects nobody the first time, so the
front ends start with one (``DESIGN.md`` §9, "Safe by default"); the library
itself imposes nothing unless asked, nor does ``memprof-limits run``.

What does not work, and why
---------------------------
- The physical memory alone (``MemTotal``): in a container (Docker,
  Kubernetes, a CI job, systemd's ``MemoryMax=``), the process is killed at
  its cgroup's limit, often far below the machine's memory.
- The cgroup file of the root only (``/sys/fs/cgroup/memory.max``): the
  process's own cgroup is in ``/proc/self/cgroup``, the limit may be set on
  any ancestor of it (the smallest one binds), and the hierarchy may be
  mounted anywhere, with a mount root other than ``/`` in a cgroup namespace
  (``/proc/self/mountinfo``).
- Subtracting what other processes use now (``MemTotal - used``, or
  ``MemAvailable``): a snapshot of the moment the kernel starts; the limit
  would differ at each restart of the same notebook, for reasons the user
  cannot see, and others grow afterwards anyway.

The solution
------------
:func:`memory_the_process_may_use`: the smallest cgroup limit on the way from
the process's own cgroup to the root of its hierarchy -- v2 ``memory.max``,
v1 ``memory.limit_in_bytes`` (both are read: hybrid systems have the memory
controller on v1) -- if any, else (and at most) ``MemTotal``.  ``max`` and
v1's "no limit" (a huge page-rounded number, 2**63 - 4096) mean no limit.
:func:`default_memory_limit` takes :data:`FRACTION` (80 %) of it: the global
memory limit is checked against the *process's* resident memory, while the
cgroup (or the machine) also holds the page cache, other processes (a
Jupyter server in the same container, a shell), kernel memory, and the
interpreter's memory that is freed between the limit's checks (the sampler
overshoots by at most a few MiB: ``docs/statistical.md``); 20 % keeps those
and the process under the point where the OOM killer acts.  Deterministic:
it depends on the configuration of the machine, not on its load.

:func:`start_limits` applies a user's specification (``MEMPROF_LIMITS``, the
kernel's configuration, the command line) *over* the default: what it names
replaces the default (``memory=off`` removes it, ``off`` removes both), what
it does not name stays.  A specification that cannot be read keeps the
default and says so (a warning), never "no limit".

Known failure cases
-------------------
- A machine shared with other big processes and no cgroup: 80 % of the
  physical memory may already be taken by others; set a smaller limit.
- Swap: the limit is taken from RAM only (a process that swaps is slow
  already), so the default never lets a cell push the machine into swap.
- cgroup v2 ``memory.high`` (throttling, not killing) is not read.
- Unreadable files are not errors: each one is skipped, noted
  (:attr:`DefaultMemoryLimit.notes`), and the next source is used; with no
  readable ``MemTotal`` either, there is no default limit, and
  :meth:`DefaultMemoryLimit.describe` says why.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from ._cells import CellLimits
from ._units import format_bytes

__all__ = [
    "FRACTION",
    "DefaultMemoryLimit",
    "StartLimits",
    "default_memory_limit",
    "memory_the_process_may_use",
    "start_limits",
]

#: The default limit is this fraction of the memory the process may use.
FRACTION = 0.8

# A limit at least this large is "no limit" (cgroup v1 writes 2**63 - 4096).
_UNLIMITED = 2**60
_V2_FILE = "memory.max"
_V1_FILE = "memory.limit_in_bytes"


@dataclass(frozen=True)
class DefaultMemoryLimit:
    """The default global memory limit and where it comes from.

    ``bytes`` is the limit (``None``: none could be derived), ``basis`` the
    memory the process may use, ``source`` what ``basis`` is (``the cgroup
    limit of /a/b (memory.max)`` or ``the physical memory (MemTotal)``), and
    ``notes`` the files that could not be read on the way.
    """

    bytes: int | None
    basis: int | None
    source: str
    notes: tuple[str, ...] = ()

    def describe(self) -> str:
        """``80% of 23.5 GiB, the physical memory (MemTotal)``, or why there
        is no default."""
        if self.bytes is None or self.basis is None:
            why = "; ".join(self.notes) or "the memory size is unknown"
            return f"no default memory limit ({why})"
        return f"{round(FRACTION * 100)}% of {format_bytes(self.basis)}, {self.source}"


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read(4096)
    except (OSError, ValueError):
        return None


def _join(root: str, path: str) -> str:
    return os.path.join(root, path.lstrip("/"))


def _physical_memory(root: str) -> tuple[int | None, str | None]:
    """``MemTotal`` in bytes, or ``(None, why)``."""
    path = _join(root, "/proc/meminfo")
    text = _read(path)
    if text is None:
        return None, f"cannot read {path}"
    for line in text.splitlines():
        if line.startswith("MemTotal:"):
            words = line.split()
            try:
                kib = int(words[1])
            except (IndexError, ValueError):
                break
            if kib > 0:
                return kib * 1024, None
            break
    return None, f"no MemTotal in {path}"


def _own_cgroups(root: str) -> list[tuple[str, str]]:
    """``[(version, path)]`` of this process: ``("v2", "/a/b")`` for the
    unified hierarchy, ``("v1", ...)`` for the memory controller of v1."""
    text = _read(_join(root, "/proc/self/cgroup")) or ""
    found = []
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3 or not parts[2].startswith("/"):
            continue
        hierarchy, controllers, path = parts
        if hierarchy == "0" and controllers == "":
            found.append(("v2", path))
        elif "memory" in controllers.split(","):
            found.append(("v1", path))
    return found


def _mounts(root: str) -> list[tuple[str, str, str]]:
    """``[(version, mount root, mount point)]`` of cgroup file systems
    (v1: those with the memory controller), from ``/proc/self/mountinfo``;
    the usual mount points if it cannot be read."""
    text = _read(_join(root, "/proc/self/mountinfo"))
    if text is None:
        return [("v2", "/", "/sys/fs/cgroup"), ("v1", "/", "/sys/fs/cgroup/memory")]
    found = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        fields, rest = left.split(), right.split()
        if not sep or len(fields) < 5 or len(rest) < 3:
            continue
        mount_root, mount_point = fields[3], fields[4]
        if rest[0] == "cgroup2":
            found.append(("v2", mount_root, mount_point))
        elif rest[0] == "cgroup" and "memory" in rest[2].split(","):
            found.append(("v1", mount_root, mount_point))
    return found


def _cgroup_limit(root: str, notes: list[str]) -> tuple[int | None, str]:
    """The smallest memory limit of this process's cgroups and their
    ancestors, with the cgroup that sets it; ``(None, "")`` if none."""
    best: tuple[int, str] | None = None
    mounts = _mounts(root)
    for version, path in _own_cgroups(root):
        name = _V2_FILE if version == "v2" else _V1_FILE
        for mount_version, mount_root, mount_point in mounts:
            if mount_version != version:
                continue
            rel = os.path.relpath(path, mount_root) if mount_root != "/" else path.lstrip("/")
            if rel == "." or rel.startswith(".."):
                rel = "" if rel == "." else path.lstrip("/")
            parts = [p for p in rel.split("/") if p]
            # From the process's cgroup up to the mount point: the smallest binds.
            for depth in range(len(parts), -1, -1):
                directory = os.path.join(_join(root, mount_point), *parts[:depth])
                text = _read(os.path.join(directory, name))
                if text is None:
                    continue
                value = text.strip()
                if value == "max":
                    continue
                try:
                    limit = int(value)
                except ValueError:
                    notes.append(
                        f"cannot read {os.path.join(directory, name)}: {value[:40]!r} is "
                        "neither a number of bytes nor 'max'"
                    )
                    continue
                if limit <= 0 or limit >= _UNLIMITED:
                    continue
                cgroup = "/" + "/".join([*mount_root.strip("/").split("/"), *parts[:depth]])
                cgroup = "/" + "/".join(p for p in cgroup.split("/") if p)
                if best is None or limit < best[0]:
                    best = (limit, f"the cgroup limit of {cgroup} ({name})")
    return (None, "") if best is None else best


def memory_the_process_may_use(root: str = "/") -> tuple[int | None, str, tuple[str, ...]]:
    """``(bytes, source, notes)``: the smallest cgroup memory limit of this
    process (and its ancestor cgroups) if any and below the physical memory,
    else the physical memory; ``bytes`` is ``None`` when neither can be
    read.  ``root`` is the file system root (a fake tree in tests)."""
    notes: list[str] = []
    physical, why = _physical_memory(root)
    cgroup, source = _cgroup_limit(root, notes)
    if cgroup is not None and (physical is None or cgroup < physical):
        return cgroup, source, tuple(notes)
    if physical is None:
        notes.append(why or "cannot read the physical memory")
        return None, "", tuple(notes)
    return physical, "the physical memory (MemTotal)", tuple(notes)


def default_memory_limit(root: str = "/") -> DefaultMemoryLimit:
    """:data:`FRACTION` (80 %) of the memory this process may use: the limit
    of its cgroup (v2 ``memory.max``, v1 ``memory.limit_in_bytes``, its own
    or an ancestor's) when there is one, else the physical memory.  The
    kernel and the REPL start with it as their global memory limit; ``root``
    is where ``/proc`` and ``/sys`` are looked up (tests use fake ones).

    >>> import memprof_limits as ml
    >>> d = ml.default_memory_limit()
    >>> d.bytes is None or d.bytes == int(d.basis * 0.8)
    True
    """
    basis, source, notes = memory_the_process_may_use(root)
    if basis is None:
        return DefaultMemoryLimit(None, None, source, notes)
    return DefaultMemoryLimit(int(basis * FRACTION), basis, source, notes)


@dataclass(frozen=True)
class StartLimits:
    """The limits a front end starts with (:func:`start_limits`)."""

    limits: CellLimits
    default: DefaultMemoryLimit
    warnings: list[str] = field(default_factory=list)

    @property
    def memory_is_default(self) -> bool:
        return is_default_memory(self.limits, self.default)


def is_default_memory(limits: CellLimits, default: DefaultMemoryLimit) -> bool:
    """Whether the memory limit of ``limits`` is ``default``'s (not one a
    user wrote)."""
    return (
        default.bytes is not None and limits.memory == default.bytes and limits.memory_text is None
    )


def start_limits(spec: str | None, *, source: str, root: str = "/") -> StartLimits:
    """The limits to start a session with: ``spec`` (``memory=2GiB
    allocations=1GB``, ``memory=off``, ``off``; named ``source`` in
    warnings) over the default memory limit.  A ``spec`` that cannot be read
    is ignored with a warning (the default stays)."""
    default = default_memory_limit(root)
    base = CellLimits(memory=default.bytes)
    warnings = []
    limits = base
    if spec is not None and spec.strip():
        try:
            limits = CellLimits.parse(spec, base)
        except Exception as e:  # ValueError; anything else is reported the same
            kept = (
                f"the default memory limit ({format_bytes(default.bytes)}) stays"
                if default.bytes is not None
                else "no limits"
            )
            warnings.append(f"memprof-limits: ignoring {source}={spec!r}: {e}; {kept}")
    return StartLimits(limits, default, warnings)
