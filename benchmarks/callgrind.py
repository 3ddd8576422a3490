"""Instructions of one command, counted by valgrind's callgrind: a figure the shared
machine's load does not move.  Shared by the benchmarks that print instruction counts
(``from callgrind import instructions``)."""

from __future__ import annotations

import re
import subprocess
import tempfile
from collections.abc import Mapping, Sequence


def instructions(argv: Sequence[str], env: Mapping[str, str] | None = None) -> int:
    """User-space instructions ``argv`` executed (callgrind's "Collected"), start-up included."""
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={tmp}/out", *argv],
            env=None if env is None else dict(env),
            capture_output=True,
            text=True,
            timeout=1800,
        )
    found = re.findall(r"Collected\s*:\s*(\d+)", proc.stderr)
    if proc.returncode != 0 or not found:
        raise RuntimeError(f"callgrind child failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return int(found[-1])
