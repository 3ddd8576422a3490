"""The ``memprof-limits`` command line."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import memprof_limits as ml
from memprof_limits._cells import parse_size
from memprof_limits._defaults import start_limits
from memprof_limits._process import pin_hash_seed

from ._errors import EXIT_USAGE
from ._run import (
    RUN_USAGE,
    RunUsageError,
    _HelpRequested,
    parse_run_args,
    run,
    split_size_error,
)
from ._session import Session

__all__ = ["default_history_file", "main"]

_DESCRIPTION = """\
A Python REPL in which every input is a task run under memory and allocation
limits; Ctrl+C interrupts the running cell and rolls its changes to the
namespace back.  With stdin not a terminal, cells are read from stdin (a
complete statement, or an empty line, ends a cell).

  memprof-limits run SCRIPT [ARG ...]   run a script as one limited task
                                        (memprof-limits run --help)
  memprof-limits serve [OPTIONS]        a JSON-lines server of addressable
                                        states (memprof-limits serve --help)
"""


def default_history_file() -> str:
    """``$XDG_STATE_HOME/memprof-limits/history`` (``~/.local/state/...``)."""
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(
        os.path.expanduser("~"), ".local", "state"
    )
    return os.path.join(state, "memprof-limits", "history")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("memprof-limits")
    except PackageNotFoundError:
        return "unknown"


def _size(text: str) -> str:
    """The size as written (checked), or ``off``."""
    if text.strip().lower() in ("off", "none"):
        return "off"
    try:
        parse_size(text, "size")  # a ValueError whatever failed
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text.strip()


def _with_option(limits: ml.CellLimits, name: str, text: str | None) -> ml.CellLimits:
    """``limits`` with ``--memory`` / ``--allocations`` (as written) applied."""
    if text is None:
        return limits
    if text == "off":
        return replace(limits, **{name: None, f"{name}_text": None})
    changes: dict[str, Any] = {name: parse_size(text, name), f"{name}_text": text}
    return replace(limits, **changes)


def _split_size(args: Sequence[str]) -> str | None:
    """The message for an unquoted ``--allocations 1 GB`` among the REPL's own
    options (not in what follows ``-c CODE`` or ``--``), or ``None``."""
    for i, arg in enumerate(args):
        if arg in ("-c", "--"):
            return None
        name, eq, value = arg.partition("=")
        if name not in ("--memory", "--allocations"):
            continue
        at = i if eq else i + 1
        if not eq:
            value = args[at] if at < len(args) else ""
        problem = split_size_error(name, value, args[at + 1] if at + 1 < len(args) else None)
        if problem is not None:
            return problem
    return None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="memprof-limits",
        description=_DESCRIPTION,
        epilog="exit status of -c: 0 ok, 1 exception, 3 allocation limit, 4 memory limit, "
        "130 interrupted (see docs/repl.md)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--memory",
        type=_size,
        metavar="SIZE",
        help="global memory limit (e.g. 2GiB; 'off': none).  Default: 80%% of the memory "
        "this process may use (its cgroup limit, else the physical memory); "
        "MEMPROF_LIMITS='memory=... allocations=...' also sets the limits",
    )
    p.add_argument(
        "--allocations",
        type=_size,
        metavar="SIZE",
        help="allocation limit per cell (e.g. 200MB; default: none)",
    )
    p.add_argument(
        "--no-rollback",
        action="store_true",
        help="keep the changes of an interrupted cell in the namespace",
    )
    p.add_argument(
        "--history-file",
        metavar="PATH",
        default=None,
        help=f"history file (default {default_history_file()}; '' keeps history in memory)",
    )
    p.add_argument("--seed", type=int, metavar="N", help="seed of the sampler")
    p.add_argument("-c", dest="code", metavar="CODE", help="run CODE as one cell and exit")
    p.add_argument("-q", "--quiet", action="store_true", help="no banner")
    p.add_argument(
        "--simple-prompt",
        action="store_true",
        help="read input with input() instead of prompt-toolkit (no toolbar, no highlighting)",
    )
    p.add_argument("--version", action="version", version=f"memprof-limits {_version()}")
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments for -c (sys.argv[1:])")
    return p


def _banner(session: Session) -> str:
    return (
        f"memprof-limits {_version()} on Python {sys.version.split()[0]}: each input runs as a "
        "limited task.\nCtrl+C interrupts a cell and rolls its changes back; "
        "%help for commands; Ctrl+D exits.\n" + session.describe_limits()
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``memprof-limits`` (and ``python -m memprof_limits_repl``).

    Called with no arguments (from the command line), it first pins the
    process's hash seed to 0 unless ``PYTHONHASHSEED`` is set, so that
    allocation counts are the same in every run (as the kernel does), without
    exporting it: the code run and its child processes see the variable as
    the user's environment had it (``memprof_limits._process``).

    Returns the exit status: see ``docs/repl.md`` (0 ok, 1 exception,
    2 usage, 3 allocation limit, 4 memory limit, 130 interrupted)."""
    if argv is None:
        pin_hash_seed()
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "serve":
        from ._serve import serve_main

        return serve_main(args[1:])
    if args and args[0] == "run":
        try:
            options = parse_run_args(args[1:])
        except _HelpRequested:
            print(RUN_USAGE, end="")
            return 0
        except RunUsageError as e:
            usage = RUN_USAGE.split("\n\n")[0]
            print(f"{usage}\nmemprof-limits run: error: {e}", file=sys.stderr)
            return EXIT_USAGE
        return run(options)
    parser = _parser()
    problem = _split_size(args)
    if problem is not None:
        parser.print_usage(sys.stderr)
        print(f"memprof-limits: error: {problem}", file=sys.stderr)
        return EXIT_USAGE
    try:
        ns = parser.parse_args(args)
    except SystemExit as e:  # --help, --version, usage errors
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    if ns.args and ns.code is None:
        parser.print_usage(sys.stderr)
        print(
            f"memprof-limits: error: unexpected arguments {' '.join(ns.args)!r} "
            "(to run a script: memprof-limits run SCRIPT)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    if ns.seed is not None:
        ml.start(seed=ns.seed)
    else:
        ml.start()
    # Safe by default: a memory limit derived from the machine, under
    # MEMPROF_LIMITS, under the command line's options.
    start = start_limits(os.environ.get("MEMPROF_LIMITS"), source="MEMPROF_LIMITS")
    for note in start.default.notes:
        print(f"memprof-limits: default memory limit: {note}", file=sys.stderr)
    for warning in start.warnings:
        print(warning, file=sys.stderr)
    limits = _with_option(start.limits, "memory", ns.memory)
    limits = _with_option(limits, "allocations", ns.allocations)
    session = Session(limits=limits, rollback=not ns.no_rollback, default=start.default)
    if ns.code is not None:
        sys.argv = ["-c", *ns.args]
        return session.run_code(ns.code)
    sys.argv = [""]
    if not sys.stdin.isatty():
        return session.run_stream(sys.stdin)
    banner = None if ns.quiet else _banner(session)
    history = default_history_file() if ns.history_file is None else ns.history_file
    if not ns.simple_prompt:
        try:
            from ._prompt import interact
        except ImportError as e:  # the [repl] extra is not installed
            print(
                f"memprof-limits: {e}; using a simple prompt "
                "(python3 -m pip install '.[repl]' in a checkout for the full REPL)",
                file=sys.stderr,
            )
        else:
            return interact(session, history_file=history, banner=banner)
    return session.run_simple_prompt(banner=banner)
