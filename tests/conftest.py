"""Shared fixtures: run snippets in fresh interpreters, find the repo."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


# A child's prelude: every byte sampled, and deep(n), n frames over a loop that allocates
# until its task is interrupted -- an interrupt then unwinds n + 1 frames, each adding a
# traceback entry (an allocation, hence a sample).  For run_python(PRELUDE + dedent(...)).
EVERY_BYTE_SAMPLED_DEEP = """\
import memprof_limits as ml
ml.stop()
ml.start(sampling_rate=1.0)
def deep(n):
    if n == 0:
        while True:
            bytearray(1000)
    return deep(n - 1)
"""


def run_python(
    code: str, *, timeout: float = 120, env: dict[str, str] | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter (the one running the tests)."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"exit status {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
        )
    return proc


@pytest.fixture
def python() -> object:
    return run_python
