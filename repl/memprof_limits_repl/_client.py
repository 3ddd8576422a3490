"""A Python client of ``memprof-limits serve`` (``docs/serve.md``).

The server runs in a child process; each call sends one request and reads
its reply.  A reply that is an error (``{"error": ...}``) raises
:class:`ServeError`; a step that fails, is interrupted or crashes is a
:class:`StepReply` that says so (its ``env`` is the input env).
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ServeClient", "ServeError", "StepReply"]


class ServeError(RuntimeError):
    """The server refused a request (its ``error`` reply), or is gone."""


@dataclass(frozen=True)
class StepReply:
    """The reply to a ``cmd`` request: see ``docs/serve.md``.  Sizes in
    bytes, times in seconds; a figure is ``None`` when it is not known."""

    env: int | None
    status: str
    reason: str | None = None
    value: str | None = None
    stdout: str = ""
    stderr: str = ""
    messages: list[dict[str, Any]] = field(default_factory=list)
    fuel: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def allocated_bytes(self) -> int | None:
        return self.fuel.get("allocated_bytes")  # type: ignore[no-any-return]


class ServeClient:
    """A ``memprof-limits serve`` process and its protocol.

    Args:
        allocations, memory, timeout_s: the server's default limits per step
            (``"50MB"``, ``"2GiB"``, seconds; ``memory=None`` keeps the
            server's default memory limit, ``"off"`` removes it).
        python: the interpreter that runs the server.

    >>> with ServeClient(allocations="10MB", timeout_s=5) as server:
    ...     base = server.run("xs = [1, 2]")
    ...     left = server.run("xs.append(3); xs", env=base.env)
    ...     right = server.run("xs", env=base.env)
    ...     hog = server.run("ys = [str(i) for i in range(10**6)]", env=base.env)
    >>> left.value, right.value
    ('[1, 2, 3]', '[1, 2]')
    >>> hog.status, hog.reason, hog.env == base.env
    ('interrupted', 'allocations', True)
    """

    def __init__(
        self,
        *,
        allocations: str | int | None = None,
        memory: str | int | None = None,
        timeout_s: float | None = None,
        python: str = sys.executable,
    ) -> None:
        args = [python, "-m", "memprof_limits_repl", "serve"]
        for option, value in (("--allocations", allocations), ("--memory", memory)):
            if value is not None:
                args += [option, str(value)]
        if timeout_s is not None:
            args += ["--timeout", repr(float(timeout_s))]
        self.process = subprocess.Popen(
            args,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            encoding="utf-8",
            bufsize=1,
        )

    def request(self, request: dict[str, Any]) -> dict[str, Any]:
        """Send one request (a JSON object) and return its reply; an
        ``{"error": ...}`` reply raises :class:`ServeError`."""
        stdin, stdout = self.process.stdin, self.process.stdout
        assert stdin is not None and stdout is not None
        try:
            stdin.write(json.dumps(request) + "\n")
            stdin.flush()
            line = stdout.readline()
        except (BrokenPipeError, ValueError):
            line = ""
        if not line:
            status = self.process.wait()
            raise ServeError(f"the server is gone (exit status {status})")
        reply: dict[str, Any] = json.loads(line)
        if "error" in reply:
            raise ServeError(reply["error"])
        return reply

    def run(
        self, cmd: str, env: int | None = None, limits: dict[str, Any] | None = None
    ) -> StepReply:
        """Run ``cmd`` in a copy of ``env`` (``None``: an empty state) under
        the server's limits with ``limits`` over them (``{"allocations":
        "50MB", "memory": "2GiB", "timeout": 2.5}``)."""
        request: dict[str, Any] = {"cmd": cmd}
        if env is not None:
            request["env"] = env
        if limits is not None:
            request["limits"] = limits
        return StepReply(**self.request(request))

    def discard(self, *envs: int) -> list[int]:
        """End these states (all or none: an unknown id raises)."""
        return self.request({"discard": list(envs)})["discarded"]  # type: ignore[no-any-return]

    def pickle_to(self, path: str, env: int) -> dict[str, Any]:
        """Save ``env`` to ``path``; the reply names what was saved and what
        could not be (``unpicklable``: name -> why)."""
        return self.request({"pickleTo": path, "env": env})

    def unpickle_from(self, path: str) -> dict[str, Any]:
        """Load a state saved by :meth:`pickle_to` as a new env (``env``),
        with the names that could not be loaded (``failed``)."""
        return self.request({"unpickleEnvFrom": path})

    def close(self) -> int:
        """End the server (EOF on its stdin: every state ends); its exit
        status."""
        if self.process.stdin is not None and not self.process.stdin.closed:
            try:
                self.process.stdin.close()
            except BrokenPipeError:
                pass
        status = self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()
        return status

    def __enter__(self) -> ServeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
