"""``memprof-limits serve``: addressable Python states behind a JSON-lines
protocol (the Lean REPL's, for Python), every step run under the library's
limits.  The protocol is in ``docs/serve.md``.

The problem
-----------
Proof checkers, solvers and search agents drive an interpreter step by step
and branch: any earlier state is the starting point of the next step
(backtracking, tree search).  The Lean REPL gives each state an integer
``env``; it has no timeout, no memory limit and no way to free a state, so
its users kill and respawn the process on a timeout or an OOM and lose every
state.  A step must be stoppable without losing anything, and a state must
be exactly what the step that made it left, whatever later steps did.

What does not work, and why
---------------------------
- Shallow snapshots of the namespace (what rollback does in the kernel): a
  later step from the same env that mutates an object in place
  (``x.append``, a NumPy array, an attribute) changes the earlier state too.
- Deep copies (``copy.deepcopy``, pickling every state): slow for big
  states, wrong for objects that refuse to be copied (locks, generators,
  open files, C objects), and they double the memory of every env.
- Running the steps in the server's process: a segfault in an extension or
  ``os._exit`` ends every state; the server's stdout is the protocol.

The solution
------------
One process per env, frozen after its step: ``fork`` copies it on write,
exact for any object, sharing the unchanged pages.

- The server forks a *root* process (an empty ``__main__``, the engine
  started, stdin/stdout/stderr on ``/dev/null``) and then runs no user code.
- Each env process waits on its own Unix socket to the server.  A step on
  env *k* sends env *k* a new socket (``SCM_RIGHTS``); env *k* forks, and
  the child runs the step on the new socket, as a cell of a
  :class:`memprof_limits.CellRunner` (allocation budget, global memory
  limit, a token set by a timer for the timeout), with its output captured.
  If the step succeeds, the child (or, if the step left a thread running, a
  single-threaded fork of it: the thread cannot change the state
  afterwards) is the new env and waits on that socket; otherwise the
  child's process group is killed, and env *k* is unchanged (it never ran
  the step).  The messages are JSON: a step can
  write on its socket, and nothing it writes may run in the server.
- A child that dies before replying (a segfault, ``os._exit``, the OOM
  killer) is a ``crashed`` step; its parent env reaps it and says how it
  died.  A step that does not stop within its timeout plus a grace period
  (a long C call) is killed: nothing is lost but that step.
- ``discard`` ends env processes: their memory goes back to the system.
  The server is a *child subreaper*, so an env whose parent was discarded
  is reaped by the server.  EOF on stdin (or SIGTERM) kills every process.
- ``pickleTo`` pickles a state in a fork of its env (a ``__reduce__`` with
  side effects cannot change the env); names that cannot be pickled are
  reported, not dropped silently.  ``unpickleEnvFrom`` loads one in a fork
  of the root, under the server's limits.

Known failure cases
-------------------
- Threads are not part of a state: the env made from a step is a fork of
  its process (a single-threaded copy, frozen at the step's end).  Objects
  held by a thread of the step, and locks it held, are copied as they were.
- Memory shared across fork (``mmap`` of anonymous memory,
  ``multiprocessing.Value``) is shared between the branches too.
- Open files and sockets are shared with the envs forked later (the same
  file offset), as after any ``fork``.
- Memory is counted per process: the memory limit applies to the resident
  memory of the process running the step, which includes the pages it
  shares with its env.  A server with many big envs can still exhaust the
  machine: ``discard`` what is no longer needed.
- A step stuck in a C call that never returns, with no timeout, blocks the
  server (as the Lean REPL would): give a timeout.
- Linux only (``fork``, ``memfd``, ``prctl``).
"""

from __future__ import annotations

import builtins
import contextlib
import ctypes
import fcntl
import functools
import io
import json
import math
import os
import pickle
import select
import signal
import socket
import stat
import struct
import sys
import threading
import time
import traceback
import types
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import IO, Any, NoReturn

import memprof_limits as ml
from memprof_limits import _delivery
from memprof_limits._cells import parse_size

from ._errors import print_interrupt, print_user_exception
from ._source import CellCompiler, execute_compiled, remember_source

__all__ = ["SERVE_USAGE", "ServerLimits", "serve"]

SERVE_USAGE = """\
usage: memprof-limits serve [--allocations SIZE] [--memory SIZE] [--timeout SECONDS] [--seed N]

Read requests, one JSON object per line, on stdin; write one JSON reply per
line on stdout.  Every state (env) is a process; a step runs in a fork of its
env under the limits (defaults here, overridable per request).  See
docs/serve.md for the protocol.

  --allocations SIZE   allocation limit per step (e.g. 50MB; default: none)
  --memory SIZE        global memory limit of a step's process (e.g. 2GiB; 'off';
                       default: 80% of the memory this process may use)
  --timeout SECONDS    wall-clock limit per step (default: none)
  --seed N             seed of the sampler
"""

#: Most of a step's stdout, stderr or value kept in its reply (characters).
OUTPUT_CAP = 1 << 20
#: A step that has not stopped this long after its timeout (and at least a
#: second) is killed.
GRACE_FACTOR = 1.0
_PROTOCOL_KEYS = {
    "cmd": {"cmd", "env", "limits"},
    "discard": {"discard"},
    "pickleTo": {"pickleTo", "env"},
    "unpickleEnvFrom": {"unpickleEnvFrom", "limits"},
}
_PICKLE_FORMAT = "memprof-limits-env/1"
STATUSES = ("ok", "error", "interrupted", "crashed")


class RequestError(ValueError):
    """A request that cannot be run: its message says what was expected."""


@dataclass(frozen=True)
class ServerLimits:
    """The limits of one step: the cell limits (bytes) and a timeout (s)."""

    cell: ml.CellLimits = field(default_factory=ml.CellLimits)
    timeout_s: float | None = None

    def override(self, spec: object) -> ServerLimits:
        """These limits with a request's ``"limits"`` object over them:
        ``{"allocations": "50MB", "memory": "2GiB", "timeout": 2.5}``; a key
        set to ``null`` or ``"off"`` removes that limit."""
        if spec is None:
            return self
        if not isinstance(spec, dict):
            raise RequestError(
                f'"limits" must be an object like {{"allocations": "50MB", "memory": "2GiB", '
                f'"timeout": 2.5}}, not {_json_type(spec)}'
            )
        unknown = sorted(set(spec) - {"allocations", "memory", "timeout"})
        if unknown:
            raise RequestError(
                f'unknown key {unknown[0]!r} in "limits": expected "allocations", '
                '"memory" or "timeout"'
            )
        cell, timeout = self.cell, self.timeout_s
        for name in ("allocations", "memory"):
            if name in spec:
                value = spec[name]
                changes: dict[str, Any] = {
                    name: _size_or_off(value, name),
                    f"{name}_text": value.strip() if isinstance(value, str) else None,
                }
                cell = replace(cell, **changes)
        if "timeout" in spec:
            timeout = parse_timeout(spec["timeout"])
        return ServerLimits(cell, timeout)

    def to_json(self) -> dict[str, Any]:
        c = self.cell
        return {
            "memory": [c.memory, c.memory_text],
            "allocations": [c.allocations, c.allocations_text],
            "timeout": self.timeout_s,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ServerLimits:
        (memory, memory_text), (allocations, allocations_text) = data["memory"], data["allocations"]
        cell = ml.CellLimits(memory=memory, allocations=allocations)
        cell = replace(cell, memory_text=memory_text, allocations_text=allocations_text)
        return cls(cell, data["timeout"])


def _size_or_off(value: object, name: str) -> int | None:
    if value is None or (isinstance(value, str) and value.strip().lower() in ("off", "none")):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise RequestError(
            f'"{name}" must be a size: a number of bytes or a string like "50MB", or null / '
            f'"off" for no limit, not {_json_type(value)}'
        )
    try:
        return parse_size(value, f"{name} limit")
    except ValueError as e:
        raise RequestError(f'"{name}": {e}') from None


def parse_timeout(value: object) -> float | None:
    """A timeout in seconds: a positive number, or ``None`` / ``"off"``."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("off", "none")):
        return None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(
            f'"timeout" must be a number of seconds (or null / "off"), not {_json_type(value)}'
        )
    if not (math.isfinite(value) and 0 < value <= 10**7):
        raise RequestError(f'"timeout" must be more than 0 and at most 1e7 seconds, not {value}')
    return float(value)


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({json.dumps(value)})"
    if isinstance(value, (int, float)):
        return f"a number ({value!r})"
    if isinstance(value, str):
        return f"a string ({_clip(repr(value))})"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _clip(text: str, width: int = 60) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


# What the processes call to talk to each other, bound when the module is imported: a step
# that replaces os.fork, json.dumps, len, socket methods... in its env does not break it.
_fork, _waitpid, _exit, _setpgid = os.fork, os.waitpid, os._exit, os.setpgid
_len, _int, _type = builtins.len, builtins.int, builtins.type
_dumps, _loads = json.JSONEncoder(default=lambda _o: None).encode, json.JSONDecoder().decode
_header = struct.Struct("!I")
_send_fds, _recv_fds = socket.send_fds, socket.recv_fds
_sendall, _sock_recv = socket.socket.sendall, socket.socket.recv
_select = select.select
#: How long the server waits for an env process to answer a control message
#: (forked, waited) before it gives the env up (a thread of the env holding
#: the interpreter in C, say).
ANSWER_TIMEOUT_S = 60.0
#: The largest message a process may send (bytes): a step's reply is capped
#: far below (OUTPUT_CAP per field); a bigger length is a forged frame.
MAX_MESSAGE = 64 << 20

# ---- messages between the server and the env processes -------------------------------
# A message: 4 bytes of length, then JSON -- never pickle: a step can write on its socket
# (it finds it in /proc/self/fd), and what it writes must not run code in the server.
# A socket given to a process travels with the first bytes of its message.


class _BadMessage(Exception):
    """A message that is not one of ours (forged by a step), or too slow."""


def _send(sock: socket.socket, message: object, fds: Iterable[int] = ()) -> None:
    data = _dumps(message).encode()
    frame = _header.pack(_len(data)) + data
    fds = list(fds)
    if fds:
        sent = _send_fds(sock, [frame], fds)
        frame = frame[sent:]
    if frame:
        _sendall(sock, frame)


def _recv(sock: socket.socket, deadline: float | None = None) -> tuple[Any, list[int]] | None:
    """The next message and the descriptors sent with it; ``None`` at EOF.
    Raises :class:`_BadMessage` if it is not a message of ours, or if
    ``deadline`` (``time.monotonic()``) passes while it is incomplete."""
    _wait_readable(sock, deadline)
    header, fds, _flags, _addr = _recv_fds(sock, 4, 4)
    fds = [_above_std(fd) for fd in fds]
    if not header:
        return None
    rest = _recv_exact(sock, 4 - _len(header), deadline)
    if rest is None:
        return None
    (length,) = _header.unpack(header + rest)
    if length > MAX_MESSAGE:
        raise _BadMessage(f"a message of {length} bytes")
    data = _recv_exact(sock, length, deadline)
    if data is None:
        return None
    try:
        return _loads(data.decode()), fds
    except ValueError as e:
        raise _BadMessage(str(e)) from None


def _recv_exact(sock: socket.socket, length: int, deadline: float | None) -> bytes | None:
    chunks = []
    while length:
        _wait_readable(sock, deadline)
        chunk = _sock_recv(sock, min(length, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        length -= _len(chunk)
    return b"".join(chunks)


def _wait_readable(sock: socket.socket, deadline: float | None) -> None:
    if deadline is not None:
        ready, _, _ = _select([sock], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            raise _BadMessage("no complete message in time")


def _above_std(fd: int) -> int:
    """A received descriptor, moved above 0-2 (a step may have closed those,
    and they get dup2'ed over for capture) and not inherited by a program a
    step runs (received descriptors are inheritable)."""
    if fd > 2:
        os.set_inheritable(fd, False)
        return fd
    moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)
    os.close(fd)
    return moved


# ---- env processes ---------------------------------------------------------------------


class _State:
    """What an env process holds: its ``__main__`` and its compiler."""

    def __init__(self) -> None:
        self.module = types.ModuleType("__main__")
        self.module.__dict__["__builtins__"] = builtins
        self.compiler = CellCompiler()
        sys.modules["__main__"] = self.module

    @property
    def namespace(self) -> dict[str, Any]:
        return self.module.__dict__


# The channel of this process to the server.  A process forked by this one
# (a step's child, a step's own os.fork or multiprocessing worker) closes its
# copy at once (os.register_at_fork, in _start_root): only the process the
# server knows can answer on it, and its death is seen (EOF) even while
# something it forked lives on.
_channel: socket.socket | None = None


def _close_channel_in_child() -> None:
    global _channel
    if _channel is not None:
        _channel.close()
        _channel = None


def _env_loop(channel: socket.socket, state: _State) -> NoReturn:
    """Serve the server's requests on ``channel`` until EOF or ``exit``."""
    global _channel
    _channel = channel
    while True:
        try:
            got = _recv(channel)
        except OSError:
            got = None
        if got is None:
            _exit(0)
        (op, arg), fds = got
        if op == "exit":
            _exit(0)
        try:
            if op == "wait":
                try:
                    answer: tuple[str, Any] = ("waited", _waitpid(arg, 0)[1])
                except ChildProcessError:
                    answer = ("waited", None)
                _send(channel, answer)
                continue
            # "step", "pickle", "unpickle": in a fork, on the socket that came with it.
            child_channel = socket.socket(fileno=fds[0])
            for extra in fds[1:]:
                os.close(extra)
            try:
                pid = _fork()
            except OSError as e:
                child_channel.close()
                _send(channel, ("fork failed", str(e)))
                continue
            if pid == 0:  # (our channel is closed already: _close_channel_in_child)
                _child(op, arg, child_channel, state)
            child_channel.close()
            _send(channel, ("forked", pid))
        except Exception as e:  # what a step left in this env broke a request: say so
            try:
                _send(channel, ("failed", f"{type(e).__name__}: {e}"))
            except OSError:
                _exit(0)


def _child(op: str, arg: dict[str, Any], channel: socket.socket, state: _State) -> NoReturn:
    """A fork of an env: run ``op``, reply, and either become an env (a step
    that succeeded) or exit.

    In a process group of its own: a step's ``os.kill(0, ...)`` or
    ``os.killpg`` reaches its own processes only, not the server and the
    other envs.  Killed if its env dies (the server gone: PR_SET_PDEATHSIG).
    A step that succeeded and left a thread running forks once more, and
    that single-threaded copy is the env: the thread cannot change the state
    afterwards or keep the env from answering.  Otherwise this process is
    the env, its timers cleared (as a fork would)."""
    global _channel
    _channel = channel
    me, env_pid = os.getpid(), os.getppid()
    try:
        _setpgid(0, 0)
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != env_pid:  # the env died before that: nobody waits for us
            _exit(0)
        arg["limits"] = ServerLimits.from_json(arg["limits"])
        if op == "step":
            result = _step(state, arg)
        elif op == "pickle":
            result = _pickle_state(state, arg)
        else:
            result = _unpickle_state(state, arg)
        if os.getpid() != me:  # a fork made by the step returned through here
            _exit(0)
        if result["status"] == "ok" and op != "pickle":
            if _other_threads():
                _channel = None  # (the fork below keeps it)
                if _fork() != 0:
                    _exit(0)  # the step's process ends, with every thread of the step
                _channel = channel
            else:  # the cheap way to the same state: no thread, no timer left
                for timer in (signal.ITIMER_REAL, signal.ITIMER_VIRTUAL, signal.ITIMER_PROF):
                    signal.setitimer(timer, 0)
                _prctl(_PR_SET_PDEATHSIG, 0)  # an env outlives the env it came from
            result["pid"] = os.getpid()
            _send(channel, ("result", result))
            _env_loop(channel, state)
        _send(channel, ("result", result))
    except BaseException:  # our own failure: said, and the step fails
        try:
            if os.getpid() == me:
                message = {
                    "severity": "error",
                    "data": "memprof-limits serve: " + traceback.format_exc(),
                }
                _send(channel, ("result", {"status": "error", "messages": [message]}))
        except BaseException:
            pass
    _exit(0)


_PR_SET_PDEATHSIG = 1


def _other_threads() -> bool:
    """Whether this process runs a thread other than the main one and the
    library's watchdog (a thread of the step, Python's or a C library's)."""
    ours = {os.getpid()}
    watchdog = _delivery._watchdog
    if watchdog is not None and watchdog.native_id is not None:
        ours.add(watchdog.native_id)
    try:
        return any(int(tid) not in ours for tid in os.listdir("/proc/self/task"))
    except OSError:
        return True


def _prctl(option: int, value: int) -> None:
    with contextlib.suppress(OSError, AttributeError):
        _libc().prctl(option, value, 0, 0, 0)


@functools.cache
def _libc() -> Any:
    return ctypes.CDLL(None, use_errno=True)


# The captured streams of the steps this process ran, kept alive for good.
# CPython's print() holds sys.stdout by a borrowed reference while it calls
# write(): a thread a step left printing would use a freed stream once the
# step's end put the server's stream back and dropped the last reference
# (seen: "'_CappedText' object has no attribute 'kept'", then a segfault).
_RETIRED: list[object] = []


class _CappedText(io.TextIOBase):
    """A text stream that keeps its first :data:`OUTPUT_CAP` characters;
    once retired, it keeps nothing."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.kept = 0
        self.dropped = 0
        self.retired = False

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        if not isinstance(s, str):
            raise TypeError(f"write() argument must be str, not {type(s).__name__}")
        if self.retired:
            return len(s)
        room = OUTPUT_CAP - self.kept
        if len(s) <= room:
            self.parts.append(s)
            self.kept += len(s)
        else:
            self.parts.append(s[:room])
            self.kept += room
            self.dropped += len(s) - room
        return len(s)

    def retire(self) -> str:
        """What was written; later writes are dropped."""
        self.retired = True
        text = "".join(self.parts)
        if self.dropped:
            text += f"\n[memprof-limits serve: {self.dropped} more characters not kept]\n"
        self.parts = []
        return text


class _Captured:
    """The step's ``sys.stdout``/``sys.stderr`` (Python's writes), and file
    descriptors 1 and 2 (what C code writes) in memory files."""

    def __enter__(self) -> _Captured:
        self.out, self.err = _CappedText(), _CappedText()
        self.fd_out = os.memfd_create("stdout", os.MFD_CLOEXEC)
        self.fd_err = os.memfd_create("stderr", os.MFD_CLOEXEC)
        os.dup2(self.fd_out, 1)
        os.dup2(self.fd_err, 2)
        self.saved = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = self.out, self.err
        return self

    def __exit__(self, *exc: object) -> None:
        # Ours and whatever the step put in their place stay alive: see _RETIRED.
        _RETIRED.extend((self.out, self.err, sys.stdout, sys.stderr))
        sys.stdout, sys.stderr = self.saved
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)
        os.dup2(null, 2)
        os.close(null)
        for fd, stream in ((self.fd_out, self.out), (self.fd_err, self.err)):
            data = os.pread(fd, OUTPUT_CAP, 0)
            os.close(fd)
            if data:
                stream.write(data.decode("utf-8", "backslashreplace"))


def _run_limited(
    fn: Callable[[], Any], limits: ServerLimits, namespace: dict[str, Any] | None
) -> tuple[ml.CellOutcome, Any, bool]:
    """Run ``fn`` as one cell under ``limits``; returns (outcome, result,
    timed_out) where result is :class:`ml.Ok` or :class:`ml.Error`, or the
    exception ``fn`` raised."""
    runner = ml.CellRunner(namespace, limits=limits.cell, rollback=False)
    timed_out = threading.Event()
    result: Any = None
    # Same collector state before every step of an env, whatever the env did
    # between forks: the same step, the same count.
    with runner.cell(canonical=True) as cell:
        timer = None
        if limits.timeout_s is not None:

            def fire() -> None:
                timed_out.set()
                cell.token.set()

            timer = threading.Timer(limits.timeout_s, fire)
            timer.start()
        try:
            result = cell.run(fn)
        except BaseException as e:
            result = e
        finally:
            cell.complete()
            if timer is not None:
                timer.cancel()
                timer.join()
    return cell.outcome, result, timed_out.is_set()


def _step(state: _State, request: dict[str, Any]) -> dict[str, Any]:
    code: str = request["code"]
    filename = request["filename"]
    limits: ServerLimits = request["limits"]
    reply: dict[str, Any] = {"status": "ok", "reason": None, "value": None, "messages": []}
    outcome = None
    with _Captured() as captured:
        remember_source(filename, code)
        try:
            compiled = state.compiler.compile(code, filename)
        except (SyntaxError, ValueError, OverflowError, RecursionError, MemoryError) as e:
            reply.update(status="error", messages=[_message(e, limits, filename, frames=False)])
        else:

            def task() -> str | None:
                value = execute_compiled(compiled, state.namespace)
                return None if value is None else _plain(repr(value))

            outcome, result, timed_out = _run_limited(task, limits, state.namespace)
            if outcome.interrupted:
                reason = "timeout" if timed_out and outcome.reason == "token" else outcome.reason
                if reason == "timeout":
                    outcome.message = f"timeout of {limits.timeout_s:g} s reached"
                message = _message(outcome.exception, limits, filename, outcome=outcome)
                reply.update(status="interrupted", reason=reason, messages=[message])
            elif isinstance(result, BaseException):
                reply.update(status="error", messages=[_message(result, limits, filename)])
            elif isinstance(result, ml.Ok):
                reply["value"] = result.value
                reply["messages"] = [
                    {"severity": "warning", "data": f.describe()} for f in outcome.failures
                ]
    reply["stdout"] = captured.out.retire()
    reply["stderr"] = captured.err.retire()
    if outcome is not None:
        reply["fuel"] = {
            "allocated_bytes": outcome.allocated_bytes,
            "peak_rss_bytes": outcome.peak_rss_bytes,
            "wall_time_s": round(outcome.wall_time_s, 6),
        }
    return reply


def _message(
    exc: BaseException | None,
    limits: ServerLimits,
    filename: str,
    *,
    frames: bool = True,
    outcome: ml.CellOutcome | None = None,
) -> dict[str, Any]:
    """The error message of a step: its traceback (user frames only) or, for
    an interrupt, where it stopped and why.  Formatting calls the step's own
    code (``__str__`` of its exception): under the step's limits too."""

    def describe() -> tuple[str, int | None]:
        text = io.StringIO()
        if outcome is not None:
            print_interrupt(outcome, file=text)
        elif exc is not None:
            print_user_exception(exc, text, frames=frames)
        line = exc.lineno if isinstance(exc, SyntaxError) else _line_of(exc, filename)
        return _plain(text.getvalue()), line if _type(line) is _int else None

    _outcome, result, _timed_out = _run_limited(describe, limits, None)
    if isinstance(result, ml.Ok):
        data, line = result.value
    else:
        name = _type(exc).__name__ if exc is not None else "Interrupted"
        data, line = (
            f"{name} (its message could not be shown: it reached a limit or raised)\n",
            None,
        )
    return {"severity": "error", "data": data, "line": line}


def _plain(text: str) -> str:
    """``text`` as an exact ``str`` of at most :data:`OUTPUT_CAP` characters
    (a ``__repr__`` may return a ``str`` subclass with methods of its own)."""
    text = str.__str__(text)
    if _len(text) > OUTPUT_CAP:
        text = (
            text[:OUTPUT_CAP]
            + f"\n[memprof-limits serve: {_len(text) - OUTPUT_CAP} more characters not kept]\n"
        )
    return text


def _line_of(exc: BaseException | None, filename: str) -> int | None:
    """The line of the command where ``exc`` was raised (its innermost frame
    in the command's own code), or ``None``."""
    line = None
    tb = exc.__traceback__ if exc is not None else None
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == filename:
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


def _pickle_state(state: _State, request: dict[str, Any]) -> dict[str, Any]:
    """Pickle the namespace, name by name, to ``request["path"]``."""
    values: dict[str, bytes] = {}
    modules: dict[str, str] = {}
    unpicklable: dict[str, str] = {}

    def task() -> None:
        for name, value in list(state.namespace.items()):
            if name.startswith("__") and name.endswith("__"):
                continue
            if isinstance(value, types.ModuleType):
                modules[name] = value.__name__
                continue
            if getattr(value, "__module__", None) == "__main__" and isinstance(
                value, (type, types.FunctionType)
            ):
                unpicklable[name] = (
                    "defined by a command: pickle stores functions and classes by "
                    "reference to their module"
                )
                continue
            try:
                values[name] = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
            except ml.Interrupted:
                raise  # a limit: the whole save stops
            except BaseException as e:  # SystemExit from a __reduce__ is that name's failure
                unpicklable[name] = _describe(e)

    outcome, result, timed_out = _run_limited(task, request["limits"], None)
    if outcome.interrupted:
        why = "timeout" if timed_out else outcome.reason
        return {"status": "error", "error": f"pickling was interrupted ({why}): {outcome.message}"}
    if isinstance(result, BaseException):
        return {"status": "error", "error": f"pickling failed: {_describe(result)}"}
    data = {"format": _PICKLE_FORMAT, "values": values, "modules": modules}
    path = request["path"]
    try:
        # Written whole, then renamed over the path: a reader never sees half
        # a file.  Only a regular file (or nothing) is replaced: not a device,
        # a FIFO, a symbolic link.
        with contextlib.suppress(FileNotFoundError):
            if not stat.S_ISREG(os.lstat(path).st_mode):
                return {"status": "error", "error": f"cannot write {path!r}: not a regular file"}
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "wb") as f:
            pickle.dump(data, f, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(tmp, path)
    except (OSError, ValueError) as e:
        cause = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        return {"status": "error", "error": f"cannot write {path!r}: {cause}"}
    return {"status": "ok", "names": sorted([*values, *modules]), "unpicklable": unpicklable}


def _unpickle_state(state: _State, request: dict[str, Any]) -> dict[str, Any]:
    """Load a file written by :func:`_pickle_state` into the (fresh) namespace."""
    path = request["path"]
    failed: dict[str, str] = {}
    loaded: list[str] = []

    def task() -> None:
        with open(path, "rb") as f:
            data = pickle.load(f)
        if not (isinstance(data, dict) and data.get("format") == _PICKLE_FORMAT):
            raise ValueError(f"{path!r} is not a state written by pickleTo")
        for name, module in data["modules"].items():
            try:
                state.namespace[name] = __import__(module, fromlist=["_"])
                loaded.append(name)
            except Exception as e:
                failed[name] = f"import {module}: {_describe(e)}"
        for name, blob in data["values"].items():
            try:
                state.namespace[name] = pickle.loads(blob)
                loaded.append(name)
            except Exception as e:
                failed[name] = _describe(e)

    outcome, result, timed_out = _run_limited(task, request["limits"], None)
    if outcome.interrupted:
        why = "timeout" if timed_out else outcome.reason
        return {
            "status": "error",
            "error": f"unpickling was interrupted ({why}): {outcome.message}",
        }
    if isinstance(result, BaseException):
        if isinstance(result, OSError):
            return {
                "status": "error",
                "error": f"cannot read {path!r}: {result.strerror or result}",
            }
        return {"status": "error", "error": f"cannot load {path!r}: {_describe(result)}"}
    return {"status": "ok", "names": sorted(loaded), "failed": failed}


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {_clip(str(e), 200)}" if str(e) else type(e).__name__


# ---- the server ---------------------------------------------------------------------------


@dataclass(eq=False)
class _Env:
    id: int | None  # None: the root (the empty state)
    pid: int
    channel: socket.socket
    parent: _Env | None  # the process that reaps this one (None: the server)
    pgid: int = 0  # its process group (0: none of its own, the server's)
    alive: bool = True


class Server:
    """The server's side: env ids, their processes, and the requests."""

    def __init__(self, limits: ServerLimits, seed: int = 0) -> None:
        self.limits = limits
        self.envs: dict[int, _Env] = {}
        self.discarded: set[int] = set()
        self.next_id = 0
        self.commands = 0
        self.seed = seed
        _become_subreaper()
        self.root = self.new_root()

    def new_root(self) -> _Env:
        """Fork the root process (the server runs no thread: a safe fork)."""
        ours, theirs = socket.socketpair()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            ours.close()
            _start_root(theirs, self.seed)
        theirs.close()
        return _Env(None, pid, ours, None)

    # -- requests --------------------------------------------------------------------------

    def handle_line(self, line: bytes) -> dict[str, Any]:
        """The reply to one line of input."""
        try:
            request = json.loads(line)
        except (ValueError, UnicodeDecodeError) as e:
            return {"error": f"expected one JSON object per line: {_clip(str(e), 200)}"}
        except RecursionError:
            return {"error": "expected one JSON object per line: nested too deeply"}
        try:
            return self.handle(request)
        except RequestError as e:
            return {"error": str(e)}

    def handle(self, request: object) -> dict[str, Any]:
        if not isinstance(request, dict):
            raise RequestError(
                'expected a JSON object: {"cmd": ...}, {"discard": [...]}, {"pickleTo": ...} '
                f'or {{"unpickleEnvFrom": ...}}, not {_json_type(request)}'
            )
        kinds = [key for key in _PROTOCOL_KEYS if key in request]
        if len(kinds) != 1:
            raise RequestError(
                'expected exactly one of "cmd", "discard", "pickleTo", "unpickleEnvFrom" '
                f"in a request, found {', '.join(map(repr, kinds)) if kinds else 'none'}"
            )
        kind = kinds[0]
        unknown = sorted(set(request) - _PROTOCOL_KEYS[kind])
        if unknown:
            allowed = ", ".join(f'"{k}"' for k in sorted(_PROTOCOL_KEYS[kind]))
            raise RequestError(
                f'unknown key "{unknown[0]}" in a "{kind}" request: expected {allowed}'
            )
        self.reap_orphans()
        if kind == "cmd":
            return self.command(request)
        if kind == "discard":
            return self.discard(request["discard"])
        if kind == "pickleTo":
            return self.pickle_to(request)
        return self.unpickle_from(request)

    def env(self, value: object, *, optional: bool = False, gone_ok: bool = False) -> _Env:
        if value is None and optional:
            return self.root
        if isinstance(value, bool) or not isinstance(value, int):
            raise RequestError(f'"env" must be an env id (an integer), not {_json_type(value)}')
        env = self.envs.get(value)
        if env is None:
            why = "discarded" if value in self.discarded else "unknown"
            known = f"envs 0..{self.next_id - 1}" if self.next_id else "no env yet"
            raise RequestError(f"{why} env {value} ({known}; {len(self.envs)} live)")
        if not env.alive and not gone_ok:
            raise RequestError(f"env {value} is gone: its process died (discard it)")
        return env

    def command(self, request: dict[str, Any]) -> dict[str, Any]:
        code = request["cmd"]
        if not isinstance(code, str):
            raise RequestError(f'"cmd" must be Python source (a string), not {_json_type(code)}')
        env = self.env(request.get("env"), optional=True)
        limits = self.limits.override(request.get("limits"))
        self.commands += 1
        work = {"code": code, "filename": f"<cmd {self.commands}>", "limits": limits.to_json()}
        result = self.fork(env, "step", work, limits.timeout_s)
        fuel = result.get("fuel") or {}
        return {
            "env": result["env"],
            "status": result["status"],
            "reason": result.get("reason"),
            "value": result.get("value"),
            "stdout": result.get("stdout", ""),
            "stderr": result.get("stderr", ""),
            "messages": result.get("messages", []),
            # null: not known (the step's process died, or nothing ran).
            "fuel": {
                "allocated_bytes": fuel.get("allocated_bytes"),
                "peak_rss_bytes": fuel.get("peak_rss_bytes"),
                "wall_time_s": fuel.get("wall_time_s", result.get("wall_time_s")),
            },
        }

    def pickle_to(self, request: dict[str, Any]) -> dict[str, Any]:
        path = request["pickleTo"]
        if not isinstance(path, str) or not path:
            raise RequestError(f'"pickleTo" must be a file path (a string), not {_json_type(path)}')
        if "env" not in request:
            raise RequestError('a "pickleTo" request needs the "env" to pickle')
        env = self.env(request["env"])
        work = {"path": path, "limits": self.limits.to_json()}
        result = self.fork(env, "pickle", work, self.limits.timeout_s, keep=False)
        if result["status"] != "ok":
            return {"error": result.get("error") or _first_message(result)}
        return {
            "env": env.id,
            "pickleTo": path,
            "names": result["names"],
            "unpicklable": result["unpicklable"],
        }

    def unpickle_from(self, request: dict[str, Any]) -> dict[str, Any]:
        path = request["unpickleEnvFrom"]
        if not isinstance(path, str) or not path:
            raise RequestError(
                f'"unpickleEnvFrom" must be a file path (a string), not {_json_type(path)}'
            )
        limits = self.limits.override(request.get("limits"))
        work = {"path": path, "limits": limits.to_json()}
        result = self.fork(self.root, "unpickle", work, limits.timeout_s)
        if result["status"] != "ok":
            return {"error": result.get("error") or _first_message(result)}
        return {"env": result["env"], "names": result["names"], "failed": result["failed"]}

    def discard(self, ids: object) -> dict[str, Any]:
        if not isinstance(ids, list):
            raise RequestError(f'"discard" must be an array of env ids, not {_json_type(ids)}')
        # All or nothing: an unknown id discards none.  An env whose process
        # died (killed from outside) can be discarded.
        envs = {i: self.env(i, gone_ok=True) for i in ids}
        for i, env in envs.items():
            self.end(env)
            del self.envs[i]
            self.discarded.add(i)
        return {"discarded": sorted(envs)}

    # -- processes ---------------------------------------------------------------------------

    def fork(
        self,
        env: _Env,
        op: str,
        work: dict[str, Any],
        timeout_s: float | None,
        *,
        keep: bool = True,
    ) -> dict[str, Any]:
        """Run ``op`` in a fork of ``env``; the result, with ``env`` set to
        the new env id (a successful step, ``keep``) or to ``env``'s."""
        start = time.monotonic()
        for _attempt in range(2):
            ours, theirs = socket.socketpair()
            try:
                answer = self.ask(env, (op, work), [theirs.fileno()])
            finally:
                theirs.close()
            if answer is not None or env is not self.root:
                break
            ours.close()
            # The root holds no state: a step that killed it gets a new one.
            self.root = env = self.new_root()
        if answer is None:
            ours.close()
            raise RequestError(f"env {env.id} is gone: its process died or stopped answering")
        what, pid = answer
        if what != "forked":
            ours.close()
            return {"env": env.id, "status": "error", "error": f"cannot fork env {env.id}: {pid}"}
        deadline = None
        if timeout_s is not None:
            deadline = start + timeout_s + max(1.0, GRACE_FACTOR * timeout_s)
        result = self.wait_result(ours, deadline)
        elapsed = round(time.monotonic() - start, 6)
        if result == "late":
            _kill_group(pid)
            self.reap(env, pid)
            ours.close()
            return {
                "env": env.id,
                "status": "interrupted",
                "reason": "timeout",
                "messages": [
                    {
                        "severity": "error",
                        "data": f"timeout of {timeout_s:g} s reached, and the step did not stop "
                        f"within {max(1.0, GRACE_FACTOR * (timeout_s or 0)):g} s more "
                        "(a long call in C?): its process was killed",
                    }
                ],
                "wall_time_s": elapsed,
            }
        if result is None:
            # Dead, or alive with its channel closed (by the step): useless either way.
            _kill_group(pid)
            status = self.reap(env, pid)
            ours.close()
            return {
                "env": env.id,
                "status": "crashed",
                "messages": [
                    {
                        "severity": "error",
                        "data": f"the process running the step died: {_describe_status(status)}; "
                        "every env is as it was",
                    }
                ],
                "wall_time_s": elapsed,
            }
        if result["status"] == "ok" and keep:
            # The env is the step's process, or a fork of it if the step left a
            # thread running (see _child): then the step's process exits, and the
            # env is the server's (subreaper), in the step's process group.
            env_pid = result.pop("pid", None)
            if _type(env_pid) is not _int:
                ours.close()
                _kill_group(pid)
                self.reap(env, pid)
                return {"env": env.id, "status": "error", "error": "the step's reply was forged"}
            parent: _Env | None = env
            if env_pid != pid:
                self.reap(env, pid)
                parent = None
            new = _Env(self.next_id, env_pid, ours, parent, pgid=pid)
            self.envs[self.next_id] = new
            self.next_id += 1
            return {**result, "env": new.id}
        ours.close()
        _kill_group(pid)  # what the step started and left running goes with it
        self.reap(env, pid)
        return {**result, "env": env.id}

    @staticmethod
    def wait_result(channel: socket.socket, deadline: float | None) -> Any:
        """The step's result; ``None`` if its process died first (or wrote
        something else on its channel: it is then killed as crashed);
        ``"late"`` if ``deadline`` passed first."""
        wait = None if deadline is None else max(0.0, deadline - time.monotonic())
        ready, _, _ = select.select([channel], [], [], wait)
        if not ready:
            return "late"
        try:  # (a step that stops in the middle of a message has this long to finish it)
            got = _recv(channel, deadline or time.monotonic() + ANSWER_TIMEOUT_S)
        except (OSError, _BadMessage):
            return None
        message = got[0] if got is not None else None
        if isinstance(message, list) and _len(message) == 2 and message[0] == "result":
            result = message[1]
            if isinstance(result, dict) and result.get("status") in STATUSES:
                return result
        return None

    def reap(self, parent: _Env, pid: int) -> int | None:
        """Wait for ``pid``, a child of ``parent`` (or of the server if that
        process is gone); its wait status, or ``None`` if unknown."""
        if parent.alive:
            answer = self.ask(parent, ("wait", pid))
            if answer is not None:
                return answer[1] if answer[0] == "waited" else None  # type: ignore[no-any-return]
        try:  # a child of the server now (subreaper; killed already by every caller)
            return os.waitpid(pid, 0)[1]
        except ChildProcessError:  # not ours (yet): reap_orphans() will
            return None

    def ask(self, env: _Env, message: object, fds: Iterable[int] = ()) -> Any:
        """Send ``message`` to ``env``'s process and return its answer;
        ``None`` if the process is gone, or has not answered within
        :data:`ANSWER_TIMEOUT_S` (then it is killed: its answer would come
        too late, to the next question)."""
        try:
            _send(env.channel, message, fds)
            got = _recv(env.channel, time.monotonic() + ANSWER_TIMEOUT_S)
        except (OSError, _BadMessage):
            _kill_env(env)
            got = None
        if got is None or not (isinstance(got[0], list) and _len(got[0]) == 2):
            self.lost(env)
            return None
        return got[0]

    def lost(self, env: _Env) -> None:
        """``env``'s process is gone (killed from outside)."""
        if env.alive:
            env.alive = False
            env.channel.close()
            if env.parent is not None and env.parent.alive:
                self.reap(env.parent, env.pid)

    def end(self, env: _Env) -> None:
        """End ``env``'s process and wait for it.  Killed, not asked: it may
        be busy (a thread a step left running), and nothing in it needs to
        run (its pid stays its own until its parent reaps it)."""
        if not env.alive:
            return
        env.alive = False
        env.channel.close()
        _kill_env(env)
        if env.parent is None:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(env.pid, 0)
        else:
            self.reap(env.parent, env.pid)

    @staticmethod
    def reap_orphans() -> None:
        """Reap the processes reparented to the server (subreaper) that ended."""
        while True:
            try:
                pid, _status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return

    def close(self) -> None:
        """Kill every process the server started -- the envs, what their
        steps left running -- and reap them."""
        for env in [*self.envs.values(), self.root]:
            if env.alive:
                env.alive = False
                env.channel.close()
                _kill_env(env)
        self.envs.clear()
        # What is left comes to us (subreaper): kill and reap until nothing is.
        # Never a blocking wait: a process not killed yet would block it.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            for pid in _children():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            try:
                while os.waitpid(-1, os.WNOHANG)[0]:
                    pass
            except ChildProcessError:
                break
            time.sleep(0.005)


def _kill_env(env: _Env) -> None:
    """SIGKILL an env's process and what its step left running (its group)."""
    if env.pgid:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(env.pgid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        os.kill(env.pid, signal.SIGKILL)


def _kill_group(pid: int) -> None:
    """SIGKILL the process group of ``pid`` (a step's or an env's: its own,
    see _child), or ``pid`` alone if it has none yet.  Only for a pid that is
    ours and not reaped yet (a zombie keeps its pid from being reused)."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _children() -> list[int]:
    """The server's child processes (its envs' orphans included)."""
    me, found = str(os.getpid()), []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if f.read().rsplit(") ", 1)[1].split()[1] == me:
                        found.append(int(entry))
            except (OSError, IndexError):
                pass
    return found


def _first_message(result: dict[str, Any]) -> str:
    messages = result.get("messages") or [{}]
    return str(messages[0].get("data", "failed")).strip()


def _describe_status(status: int | None) -> str:
    if status is None:
        return "how is unknown"
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = f"signal {number}"
        return f"killed by signal {number} ({name})"
    if os.WIFEXITED(status):
        return f"exit status {os.WEXITSTATUS(status)}"
    return f"wait status {status}"


def _become_subreaper() -> None:
    """Orphaned env processes are reparented to the server (Linux)."""
    _prctl(36, 1)  # PR_SET_CHILD_SUBREAPER (not Linux: init reaps them)


def _start_root(channel: socket.socket, seed: int) -> NoReturn:
    """The root process: an empty state; every fresh step is a fork of it."""
    try:
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.close(null)
        sys.stdin = open(os.devnull)  # the process's stdin for good
        sys.stdout = sys.stderr = open(os.devnull, "w")
        # Ctrl+C at the terminal reaches the whole process group: it is the
        # server's to handle (it ends everything), not each state's.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.register_at_fork(after_in_child=_close_channel_in_child)
        # Not the working directory on sys.path (python -m puts it there): a
        # file written there changes what an import allocates (the import
        # system lists the directory again), and so the same step's count.
        cwd = os.getcwd()
        sys.path[:] = [p for p in sys.path if p not in ("", ".", cwd)]
        ml.start(seed=seed)
        state = _State()
    except BaseException:
        os._exit(1)
    _env_loop(channel, state)


def serve(
    limits: ServerLimits,
    *,
    seed: int = 0,
    stdin: IO[bytes] | None = None,
    stdout: IO[str] | None = None,
) -> int:
    """Run the server until EOF on ``stdin``; returns the exit status."""
    stdin = stdin or sys.stdin.buffer
    stdout = stdout or sys.stdout
    server = Server(limits, seed)

    def terminate(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        for line in stdin:
            if not line.strip():
                continue
            try:
                reply = server.handle_line(line)
            except Exception as e:  # the server's own bug: said, and the server goes on
                reply = {"error": f"memprof-limits serve: internal error: {_describe(e)}"}
                traceback.print_exc()
            stdout.write(json.dumps(reply) + "\n")
            stdout.flush()
        return 0
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)
        server.close()


def serve_main(args: list[str]) -> int:
    """``memprof-limits serve ARGS``: parse the options, start the server."""
    import argparse

    from memprof_limits._defaults import start_limits

    parser = argparse.ArgumentParser(prog="memprof-limits serve", add_help=False)
    parser.add_argument("--allocations")
    parser.add_argument("--memory")
    parser.add_argument("--timeout")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-h", "--help", action="store_true")
    usage = SERVE_USAGE.split("\n\n")[0]
    try:
        ns = parser.parse_args(args)
    except SystemExit:
        print(
            f"{usage}\nmemprof-limits serve: error: bad arguments {' '.join(args)!r}",
            file=sys.stderr,
        )
        return 2
    if ns.help:
        print(SERVE_USAGE, end="")
        return 0
    start = start_limits(os.environ.get("MEMPROF_LIMITS"), source="MEMPROF_LIMITS")
    for message in [*(f"default memory limit: {n}" for n in start.default.notes), *start.warnings]:
        print(f"memprof-limits serve: {message}", file=sys.stderr)
    spec = {
        key: value
        for key, value in (
            ("allocations", ns.allocations),
            ("memory", ns.memory),
            ("timeout", ns.timeout),
        )
        if value is not None
    }
    try:
        limits = ServerLimits(start.limits).override(spec)
    except RequestError as e:
        print(f"{usage}\nmemprof-limits serve: error: {e}", file=sys.stderr)
        return 2
    return serve(limits, seed=ns.seed)
