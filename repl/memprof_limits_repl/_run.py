"""``memprof-limits run``: a script or a module as one limited task.

The problem
-----------
``timeout 60 python script.py`` stops a program after a wall-clock time
that depends on the machine and its load, and kills it with a signal (no
``finally``, no flush); ``ulimit -v`` makes allocations fail anywhere with
``MemoryError``.  A test suite or a grader wants a limit that gives the same
verdict on every run and a clean stop.

The solution
------------
The script runs as one cell of a :class:`memprof_limits.CellRunner` (no
namespace to roll back): the allocation limit counts the bytes the main
thread allocates -- deterministic for a deterministic program -- and the
memory limit watches the process's resident memory.  When a limit is
reached the script is interrupted (its ``finally`` blocks and ``with``
exits run), a one-line reason goes to stderr, and the exit status names the
limit: 3 allocations, 4 memory, 130 Ctrl+C / SIGINT (which sets the task's
token instead of raising ``KeyboardInterrupt``).  Otherwise the exit status
is the script's: 0, 1 for an uncaught exception, or its ``sys.exit`` code.

Known failure cases
-------------------
- Threads started by the script are not limited (only the main thread's
  task is); the process waits for non-daemon threads at exit, as Python does.
- ``atexit`` handlers run after the task, outside the limits.
- A script stuck in a long C call that holds the GIL is interrupted only
  when the call returns.
"""

from __future__ import annotations

import builtins
import importlib.machinery
import io
import os
import re
import runpy
import sys
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import memprof_limits as ml
from memprof_limits._cells import parse_size

from ._errors import (
    EXIT_EXCEPTION,
    EXIT_OK,
    EXIT_USAGE,
    exit_status_for_reason,
    print_user_exception,
    system_exit_status,
)
from ._toolbar import format_seconds

__all__ = ["RUN_USAGE", "RunOptions", "RunUsageError", "parse_run_args", "run"]

RUN_USAGE = """\
usage: memprof-limits run [--allocations SIZE] [--memory SIZE] [--seed N] [--report]
                          (SCRIPT | -m MODULE) [ARG ...]

Run a Python script (or module) as one task under limits.  Options of
memprof-limits may come before or after SCRIPT; every other argument after
SCRIPT goes to the script, and so does everything after `--`.

No limit unless asked: unlike the REPL and the kernel, `run` has no default
memory limit (a script is run as `python` would run it); give --memory and
--allocations.

  --allocations SIZE  stop the script once its main thread has allocated
                      SIZE bytes (exact and deterministic), e.g. 1GB, 500MiB
  --memory SIZE       stop the script while the process's resident memory
                      exceeds SIZE (checked about every 80 kB allocated)
                      (SIZE is one argument: 1GB or '1 GB', not 1 GB)
  --seed N            seed of the sampler (reproducible sample positions)
  --report            at the end, one line on stderr: bytes allocated, peak
                      resident memory, time (to choose --allocations)
  -m MODULE           run a module as `python -m MODULE` does

Exit status: the script's own (0, 1 for an uncaught exception, its
sys.exit code), 2 for a usage error or a script that cannot be opened,
3 when the allocation limit is reached, 4 when the memory limit is
exceeded, 130 when interrupted by Ctrl+C / SIGINT; then one line on
stderr says why.
"""


_NUMBER = re.compile(r"[0-9][0-9_]*(?:\.[0-9_]*)?(?:[eE][+-]?[0-9]+)?\Z")
_UNIT = re.compile(r"(?i)(?:[kmgtpe]i?b?|b|bytes?)\Z")


def split_size_error(option: str, value: str, following: str | None) -> str | None:
    """The message for ``--allocations 1 GB`` (unquoted: ``1`` then ``GB``),
    or ``None``.  As given, the limit would silently be 1 byte and ``GB``
    another argument.

    >>> split_size_error("--allocations", "1", "GB")  # doctest: +ELLIPSIS
    "--allocations 1 GB: write the size as one argument (--allocations 1GB, or ..."
    >>> split_size_error("--allocations", "1GB", "script.py") is None
    True
    """
    if following is None or not _NUMBER.match(value) or not _UNIT.match(following):
        return None
    return (
        f"{option} {value} {following}: write the size as one argument ({option} "
        f"{value}{following}, or quoted: {option} '{value} {following}'); as given, the "
        f"limit would be {value} bytes and {following!r} another argument"
    )


class RunUsageError(Exception):
    """A bad ``memprof-limits run`` command line."""


class _HelpRequested(Exception):
    pass


@dataclass
class RunOptions:
    """What to run and under which limits."""

    target: str
    module: bool = False
    args: list[str] = field(default_factory=list)
    limits: ml.CellLimits = field(default_factory=ml.CellLimits)
    seed: int | None = None
    report: bool = False


def _size(option: str, value: str) -> str | None:
    """The size as written (checked), or ``None`` for ``off``."""
    if value.strip().lower() in ("off", "none"):
        return None
    try:
        parse_size(value, option)  # a ValueError whatever failed
    except ValueError as e:
        raise RunUsageError(str(e)) from None
    return value.strip()


def parse_run_args(argv: Sequence[str]) -> RunOptions:
    """Parse the arguments after ``run``; raises :class:`RunUsageError`.

    >>> parse_run_args(["script.py", "--allocations", "1GB", "-v", "--", "--memory"])
    RunOptions(target='script.py', module=False, args=['-v', '--memory'], \
limits=CellLimits(memory=None, allocations=1000000000), seed=None, report=False)
    """
    target: str | None = None
    module = False
    args: list[str] = []
    memory: str | None = None
    allocations: str | None = None
    seed: int | None = None
    report = False
    i = 0
    while i < len(argv):
        token = argv[i]
        if token == "--":
            rest = list(argv[i + 1 :])
            if target is None:
                if not rest:
                    raise RunUsageError("missing SCRIPT after --")
                target = rest.pop(0)
            args.extend(rest)
            break
        name, eq, value = token.partition("=") if token.startswith("--") else (token, "", "")
        if name in ("--allocations", "--memory", "--seed"):
            if not eq:
                i += 1
                if i >= len(argv):
                    raise RunUsageError(f"{name} expects a value")
                value = argv[i]
            if name != "--seed":
                following = argv[i + 1] if i + 1 < len(argv) else None
                problem = split_size_error(name, value, following)
                if problem is not None:
                    raise RunUsageError(problem)
            if name == "--seed":
                try:
                    seed = int(value)
                except ValueError:
                    raise RunUsageError(f"--seed: expected an integer, got {value!r}") from None
            elif name == "--memory":
                memory = _size(name, value)
            else:
                allocations = _size(name, value)
        elif token == "--report":
            report = True
        elif target is not None:
            args.append(token)
        elif token in ("-h", "--help"):
            raise _HelpRequested
        elif token == "-m" or (token.startswith("-m") and len(token) > 2):
            if token == "-m":
                i += 1
                if i >= len(argv):
                    raise RunUsageError("-m expects a module name")
                token = argv[i]
            else:
                token = token[2:]
            target, module = token, True
        elif token.startswith("-") and token != "-":
            raise RunUsageError(f"unknown option {token} (options for the script go after SCRIPT)")
        else:
            target = token
        i += 1
    if target is None:
        raise RunUsageError("missing SCRIPT (or -m MODULE)")
    limits = ml.CellLimits(memory, allocations)  # type: ignore[arg-type]  # text: kept as written
    return RunOptions(target, module, args, limits, seed, report)


def _run_file(path: str) -> dict[str, object]:
    """Run a script as ``python path`` does: ``sys.argv[0]`` as given (``runpy.run_path``
    would set it to the path it is given, and an absolute path is needed for
    ``__file__`` and tracebacks, as Python 3.9+ gives them), ``__main__`` a fresh
    module whose ``__file__`` is absolute; the previous ``__main__`` is put back after."""
    absolute = os.path.abspath(path)
    with io.open_code(absolute) as f:
        source = f.read()
    code = compile(source, absolute, "exec", dont_inherit=True)
    module = types.ModuleType("__main__")
    module.__dict__.update(
        __file__=absolute, __cached__=None, __package__=None, __spec__=None,
        __loader__=importlib.machinery.SourceFileLoader("__main__", absolute),
        __builtins__=builtins,
    )  # fmt: skip
    previous = sys.modules.get("__main__")
    sys.modules["__main__"] = module
    try:
        exec(code, module.__dict__)
    finally:
        if previous is not None:
            sys.modules["__main__"] = previous
    return module.__dict__


def _interrupt_running(runner: ml.CellRunner) -> Callable[[], None]:
    def target() -> None:
        runner.interrupt()

    return target


def run(options: RunOptions) -> int:
    """Run the script or module of ``options`` as one limited task in this
    process (it sees ``__name__ == "__main__"`` and ``sys.argv ==
    [SCRIPT, *args]``); returns the exit status."""
    if options.module:
        sys.argv = [options.target, *options.args]
        sys.path[0] = os.getcwd()
        target = options.target

        def task() -> object:
            return runpy.run_module(target, run_name="__main__", alter_sys=True)

    else:
        path = options.target
        if not os.path.exists(path):
            print(
                f"memprof-limits run: can't open file {os.path.abspath(path)!r}: "
                "[Errno 2] No such file or directory",
                file=sys.stderr,
            )
            return EXIT_USAGE
        sys.argv = [path, *options.args]
        if os.path.isfile(path):
            sys.path[0] = os.path.dirname(os.path.abspath(path))

            def task() -> object:
                return _run_file(path)

        else:  # a directory or a zip file with __main__.py

            def task() -> object:
                return runpy.run_path(path, run_name="__main__")

    if options.seed is not None:
        ml.start(seed=options.seed)
    runner = ml.CellRunner(None, limits=options.limits, rollback=False)
    status: int | None = None
    with ml.sigint_sets(_interrupt_running(runner)):
        try:
            with runner.cell() as cell:
                try:
                    cell.run(task)
                finally:
                    cell.complete()  # a late Ctrl+C does not turn a finished script into 130
        except SystemExit as e:
            status = system_exit_status(e)
        except BaseException as e:
            sys.stdout.flush()
            print_user_exception(e)
            status = EXIT_EXCEPTION
    outcome = runner.last
    assert outcome is not None
    sys.stdout.flush()
    if options.report:
        print(f"memprof-limits: {options.target}: {outcome.summary()}", file=sys.stderr)
    if status is not None:
        return status
    if not outcome.interrupted:
        return EXIT_OK
    if outcome.reason == "token":
        why = "interrupted by SIGINT (Ctrl+C)"
    elif outcome.reason == "memory" and outcome.limits.memory is not None:
        # The figures of the moment the limit was found exceeded (the
        # exception's own message may be made later, after memory was freed).
        limit = outcome.limits.memory_text or ml.format_bytes(outcome.limits.memory)
        why = (
            f"global memory limit of {limit} exceeded "
            f"(peak resident memory {ml.format_bytes(outcome.peak_rss_bytes)})"
        )
    else:
        why = outcome.message or outcome.reason or "interrupted"
    took = format_seconds(outcome.wall_time_s)
    print(f"memprof-limits: {options.target} stopped after {took}: {why}", file=sys.stderr)
    return exit_status_for_reason(outcome.reason)
