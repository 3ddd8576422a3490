"""Helpers of the REPL tests: the command line, and REPL children in a real
pseudo-terminal (pexpect) that sync on real prompts."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPL = [sys.executable, "-m", "memprof_limits_repl"]

# Each call of PromptSession.prompt() starts by enabling bracketed paste; the
# redraws while typing do not.  So this marks a *new* prompt, not the redraw
# of the current one (which also shows ">>>").
NEW_PROMPT = re.compile(re.escape("\x1b[?2004h") + r"[^>]*?>>>")


def run_cli(
    args: list[str],
    env: dict[str, str],
    *,
    stdin: str | None = None,
    cwd: Path | None = None,
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:
    """``memprof-limits ARGS`` (as ``python -m memprof_limits_repl``)."""
    return subprocess.run(
        [*REPL, *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=timeout,
    )


class Child:
    """A REPL in a real pseudo-terminal (pexpect)."""

    def __init__(self, args: list[str], env: dict[str, str], *, timeout: float = 30) -> None:
        import pexpect

        self.pexpect = pexpect
        self.proc = pexpect.spawn(
            REPL[0],
            [*REPL[1:], "-q", *args],
            env=env,
            dimensions=(30, 120),
            encoding="utf-8",
            timeout=timeout,
        )
        self.transcript: list[str] = []
        self.prompt: re.Pattern[str] = NEW_PROMPT
        self.proc.logfile_read = self  # type: ignore[assignment]

    # pexpect writes what it reads here: keep it for failure messages.
    def write(self, data: str) -> None:
        self.transcript.append(data)

    def flush(self) -> None:
        pass

    def text(self) -> str:
        return "".join(self.transcript)

    def wait_prompt(self) -> float:
        """Wait for a new prompt; returns when it came (time.monotonic())."""
        self.proc.expect(self.prompt)
        return time.monotonic()

    def run(self, line: str) -> str:
        """Type ``line`` and Enter; return what was printed up to the next prompt."""
        self.proc.send(line + "\r")
        self.proc.expect(self.prompt)
        return strip_ansi(self.proc.before or "")

    def close(self) -> None:
        if self.proc.isalive():
            self.proc.terminate(force=True)
        self.proc.close()


ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[=>]|\r")


def strip_ansi(text: str) -> str:
    return ANSI.sub("", text)


# What the `spawn` fixture returns: call it to start the REPL in a pty.
Spawn = Callable[..., Child]
