"""Fixtures of the REPL tests: a clean environment and pexpect children."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from repl_helpers import Child, Spawn


@pytest.fixture
def repl_env(tmp_path: Path) -> dict[str, str]:
    """Environment for a REPL child: no CPR queries (pexpect cannot answer
    them), history and state under tmp_path, never in the real home."""
    env = dict(os.environ)
    env.update(
        PROMPT_TOOLKIT_NO_CPR="1",
        HOME=str(tmp_path),
        XDG_STATE_HOME=str(tmp_path / "state"),
        PYTHONUNBUFFERED="1",
        TERM="xterm-256color",
    )
    env.pop("PYTHONSTARTUP", None)
    return env


@pytest.fixture
def spawn(repl_env: dict[str, str], tmp_path: Path) -> Iterator[Spawn]:
    """``spawn(*args, env=None)``: a REPL child in a pty (closed at the end)."""
    children: list[Child] = []

    def make(*args: str, env: dict[str, str] | None = None) -> Child:
        child = Child(["--history-file", str(tmp_path / "history"), *args], env or repl_env)
        children.append(child)
        return child

    yield make
    for child in children:
        child.close()
