#!/usr/bin/env python3
"""Run CPython's own regression tests with the memprof-limits engine started for the whole run.

Run it with the interpreter under test (a venv in which memprof-limits is installed):

    .venvs/3.11/bin/python scripts/cpython_regrtest.py              # with the engine
    .venvs/3.11/bin/python scripts/cpython_regrtest.py --baseline   # without it

With the engine, a temporary ``sitecustomize.py`` on PYTHONPATH starts the engine in every
Python process of the run that reads the environment: the regrtest main process, each worker
process (one per test file with ``-j``) and the children that tests spawn without ``-I``/``-E``.
The sitecustomize appends a line to a marker file for every process in which it started the
engine (or failed to), and the script checks afterwards that the worker of every test file ran
with the engine: an engine that failed to start cannot make the run pass silently (``site``
only prints a warning when a sitecustomize raises).

``--baseline`` runs the same tests without the engine, to find the tests that fail anyway on
this machine. Such a test may be excluded by name in ``scripts/regrtest_exclusions.txt``, with
the reason; a test that fails only with the engine is a bug of the engine and is never
excluded. When the run with the engine fails, the failing tests are re-run once without the
engine to tell the two cases apart (``--no-diagnose`` skips that).

Exit status: 0 when everything passed, 1 when a test failed or the engine check failed, 2 when
the engine could not be started at all (or on a usage error).
"""

from __future__ import annotations

import argparse
import ast
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

DEFAULT_TESTS = (
    "test_threading",
    "test_gc",
    "test_dict",
    "test_list",
    "test_weakref",
    "test_sys",
    "test_tracemalloc",
)
HERE = Path(__file__).resolve().parent
DEFAULT_EXCLUSIONS = HERE / "regrtest_exclusions.txt"
VERSION = f"{sys.version_info.major}.{sys.version_info.minor}"
MARKER_ENV = "MEMPROF_LIMITS_REGRTEST_MARKER"

# Started in every process that reads PYTHONPATH. Kept free of imports beyond os/sys/atexit
# (and the engine itself) so that it disturbs the tests as little as possible.
SITECUSTOMIZE = textwrap.dedent(
    """\
    # Written by scripts/cpython_regrtest.py: starts the memprof-limits engine for the whole
    # CPython regression-test run and records it in the marker file.
    import os as _mpl_os
    import sys as _mpl_sys


    def _mpl_note(event, detail=""):
        path = _mpl_os.environ.get("MEMPROF_LIMITS_REGRTEST_MARKER")
        if not path:
            return
        argv = list(getattr(_mpl_sys, "argv", []))
        line = "%d\\t%s\\t%r\\t%s\\n" % (_mpl_os.getpid(), event, argv, detail.replace("\\n", " "))
        fd = _mpl_os.open(path, _mpl_os.O_WRONLY | _mpl_os.O_APPEND | _mpl_os.O_CREAT, 0o644)
        try:
            _mpl_os.write(fd, line.encode("utf-8", "backslashreplace"))
        finally:
            _mpl_os.close(fd)


    def _mpl_in_subinterpreter():
        # The hooks are process-wide: the main interpreter has started the engine, and a
        # subinterpreter (test_sys, test_threading create some; they import site too) cannot
        # load the cffi module. Only looked at when the start fails, to import nothing more.
        for name in ("_interpreters", "_xxsubinterpreters"):
            try:
                mod = __import__(name)
                cur, main = mod.get_current(), mod.get_main()
            except Exception:
                continue
            cur = cur[0] if isinstance(cur, tuple) else cur
            main = main[0] if isinstance(main, tuple) else main
            return int(cur) != int(main)
        return False


    try:
        import memprof_limits as _mpl

        _mpl_rate = _mpl_os.environ.get("MEMPROF_LIMITS_REGRTEST_RATE")
        if _mpl_rate:
            _mpl.start(sampling_rate=float(_mpl_rate))
        else:
            _mpl.start()
        _mpl.set_global_memory_limit(None)
        if not _mpl.is_started():
            raise RuntimeError("memprof_limits.is_started() is False right after start()")
    except BaseException as _mpl_exc:
        if _mpl_in_subinterpreter():
            _mpl_note("subinterpreter", repr(_mpl_exc))
        else:
            _mpl_note("error", repr(_mpl_exc))
            raise
    else:
        _mpl_note("started")

        def _mpl_at_exit():
            # Still started, and the hooks still count this thread's allocations (a hook
            # installed below ours and removed later, e.g. `-X tracemalloc` then
            # tracemalloc.stop(), would take ours out of the chain).
            try:
                before = _mpl.allocated_bytes()
                data = bytearray(1 << 16)
                counted = _mpl.allocated_bytes() - before >= len(data)
                detail = "is_started=%r counting=%r" % (_mpl.is_started(), counted)
            except BaseException as exc:
                detail = "at-exit check raised %r" % (exc,)
            _mpl_note("exit", detail)

        import atexit as _mpl_atexit

        _mpl_atexit.register(_mpl_at_exit)
    """
)


# --------------------------------------------------------------------------------------------
# Exclusions
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Exclusion:
    versions: tuple[str, ...]  # ("all",) or ("3.11", "3.12")
    pattern: str  # a full test id or a regrtest --ignore glob
    reason: str
    line: int

    def applies_to(self, version: str) -> bool:
        return "all" in self.versions or version in self.versions


def parse_exclusions(path: Path) -> list[Exclusion]:
    """Parse the exclusions file; every entry needs the comment block above it as reason."""
    entries: list[Exclusion] = []
    comment: list[str] = []
    errors: list[str] = []
    for lineno, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line:
            comment = []
            continue
        if line.startswith("#"):
            comment.append(line.lstrip("#").strip())
            continue
        fields = line.split("#", 1)[0].split()
        if len(fields) != 2:
            errors.append(f"{path}:{lineno}: expected '<versions> <test id>', got {raw!r}")
            continue
        versions = tuple(v.strip() for v in fields[0].split(",") if v.strip())
        bad = [v for v in versions if v != "all" and not _is_xy(v)]
        if bad or not versions:
            errors.append(f"{path}:{lineno}: bad version list {fields[0]!r} (use 'all' or 3.X,3.Y)")
            continue
        reason = " ".join(c for c in comment if c).strip()
        if "#" in line:
            reason = (reason + " " + line.split("#", 1)[1].strip()).strip()
        if not reason:
            errors.append(f"{path}:{lineno}: entry {fields[1]!r} has no reason (comment above it)")
            continue
        entries.append(Exclusion(versions, fields[1], reason, lineno))
    if errors:
        raise SystemExit("invalid exclusions file:\n  " + "\n  ".join(errors))
    return entries


def _is_xy(v: str) -> bool:
    parts = v.split(".")
    return len(parts) == 2 and all(p.isdigit() for p in parts)


# --------------------------------------------------------------------------------------------
# Running regrtest
# --------------------------------------------------------------------------------------------


@dataclass
class JUnitResult:
    tests: int = 0
    failures: int = 0
    errors: int = 0
    skipped: int = 0
    failed_ids: tuple[str, ...] = ()
    ran_ids: frozenset[str] = frozenset()


def parse_junit(path: Path) -> JUnitResult | None:
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    res = JUnitResult()
    failed: list[str] = []
    ran: set[str] = set()
    for case in root.iter("testcase"):
        name = case.get("name", "?")
        res.tests += 1
        ran.add(name)
        kinds = {child.tag for child in case}
        if "failure" in kinds:
            res.failures += 1
            failed.append(name)
        elif "error" in kinds:
            res.errors += 1
            failed.append(name)
        elif "skipped" in kinds:
            res.skipped += 1
    res.failed_ids = tuple(failed)
    res.ran_ids = frozenset(ran)
    return res


def run_regrtest(
    tests: list[str],
    *,
    env: dict[str, str],
    cwd: Path,
    jobs: int,
    timeout: float,
    overall_timeout: float,
    junit: Path,
    ignorefile: Path | None,
    matchfile: Path | None,
    extra: list[str],
    output: list[str],
) -> int:
    """Run regrtest; its output is printed and appended to ``output``."""
    cmd = [
        sys.executable,
        "-m",
        "test",
        *tests,
        f"--timeout={timeout:g}",
        "--junit-xml",
        str(junit),
    ]
    if jobs > 1:
        cmd.append(f"-j{jobs}")
    if ignorefile is not None:
        cmd += ["--ignorefile", str(ignorefile)]
    if matchfile is not None:
        cmd += ["--matchfile", str(matchfile)]
    cmd += extra
    print("+ " + " ".join(cmd), flush=True)
    # A session of its own: a Ctrl+C at the terminal reaches only this script, which then
    # stops regrtest and its workers (which have sessions of their own too) itself.
    # The output is echoed line by line and kept, to look for exceptions the library let
    # escape into CPython's unraisable hook (they do not fail a test).
    proc = subprocess.Popen(
        cmd,
        env=env,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        start_new_session=True,
    )

    def echo() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            output.append(line)
            sys.stdout.write(line)
            sys.stdout.flush()

    reader = threading.Thread(target=echo, daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout=overall_timeout)
        reader.join(60)
        return rc
    except subprocess.TimeoutExpired:
        print(f"!! regrtest still running after {overall_timeout:g}s: stopping it", flush=True)
        _stop_tree(proc)
        return 124
    except KeyboardInterrupt:
        _stop_tree(proc)
        raise


def unraisable_from_library(output: list[str]) -> list[str]:
    """The "Exception ignored in" reports (CPython's unraisable hook) whose object or
    traceback is the library's: each is a bug of the engine even when every test passed."""
    found: list[str] = []
    for i, line in enumerate(output):
        if not line.startswith("Exception ignored"):
            continue
        block = [line]
        for nxt in output[i + 1 : i + 40]:
            if nxt.startswith(("Exception ignored", "Warning --", "0:", "== ", "-- ")):
                break
            block.append(nxt)
        if any("memprof_limits" in b or "after_fork_child" in b or "gc_first" in b for b in block):
            found.append("".join(block).rstrip())
    return found


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _stop_tree(proc: subprocess.Popen[bytes]) -> None:
    """SIGINT to regrtest (it then stops its workers), then SIGKILL to whatever is left."""
    tree = _descendants(proc.pid)
    try:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        pass
    for pid in [proc.pid, *tree, *_descendants(proc.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    proc.wait()


def base_env() -> dict[str, str]:
    env = dict(os.environ)
    for var in (
        "PYTHONMALLOC",
        "PYTHONTRACEMALLOC",
        "PYTHONDEVMODE",
        MARKER_ENV,
        "MEMPROF_LIMITS_REGRTEST_RATE",
    ):
        env.pop(var, None)
    return env


def engine_env(site_dir: Path, marker: Path) -> dict[str, str]:
    env = base_env()
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(site_dir), env.get("PYTHONPATH")) if p)
    env[MARKER_ENV] = str(marker)
    return env


@dataclass
class MarkerLine:
    pid: int
    event: str
    argv: list[str]
    detail: str


def read_marker(path: Path) -> list[MarkerLine]:
    out: list[MarkerLine] = []
    if not path.exists():
        return out
    for raw in path.read_text(errors="replace").splitlines():
        parts = raw.split("\t", 3)
        if len(parts) < 3:
            continue
        try:
            argv = ast.literal_eval(parts[2])
        except (ValueError, SyntaxError):
            argv = [parts[2]]
        out.append(
            MarkerLine(int(parts[0]), parts[1], list(argv), parts[3] if len(parts) > 3 else "")
        )
    return out


def preflight(env: dict[str, str], cwd: Path, marker: Path) -> str | None:
    """Start one child with the sitecustomize; return an error message or None."""
    code = "import memprof_limits, sys; sys.exit(0 if memprof_limits.is_started() else 3)"
    proc = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = read_marker(marker)
    marker.unlink(missing_ok=True)
    errors = [m.detail for m in lines if m.event == "error"]
    if errors:
        return "the sitecustomize could not start the engine: " + "; ".join(errors)
    if proc.returncode != 0 or not any(m.event == "started" for m in lines):
        return (
            f"a child with the sitecustomize did not report a started engine "
            f"(exit {proc.returncode})\n{proc.stdout}{proc.stderr}"
        )
    return None


def check_markers(lines: list[MarkerLine], tests: list[str], jobs: int) -> list[str]:
    """Problems with the engine's coverage of the run (empty list: fine)."""
    problems: list[str] = []
    for m in [m for m in lines if m.event == "error"][:10]:
        problems.append(f"engine failed to start in pid {m.pid} {m.argv[:3]}: {m.detail}")
    started = [m for m in lines if m.event == "started"]
    if not any(_is_main(m.argv, tests) for m in started):
        problems.append("no 'started' record for the regrtest main process")
    if jobs > 1:
        # Each test file runs in a worker process of its own, whose argv names the test in JSON
        # (3.11: `-m test.regrtest --worker-args '[{...}, "test_x"]'`; 3.12+:
        # `-m test.libregrtest.worker '{"tests": ["test_x"], ...}'`).
        workers = [" ".join(m.argv) for m in started if _is_worker(m.argv)]
        for test in tests:
            if not any(f'"{test}"' in w for w in workers):
                problems.append(f"no worker process of {test} reported a started engine")
    return problems


def _is_worker(argv: list[str]) -> bool:
    joined = " ".join(argv)
    return "--worker-args" in joined or '{"tests": [' in joined


def _is_main(argv: list[str], tests: list[str]) -> bool:
    return not _is_worker(argv) and all(t in argv for t in tests)


def fmt_counts(res: JUnitResult | None) -> str:
    if res is None:
        return "no JUnit report"
    return f"{res.tests} tests, {res.failures} failures, {res.errors} errors, {res.skipped} skipped"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Arguments after '--' go to `python -m test` unchanged.",
    )
    ap.add_argument("--baseline", action="store_true", help="run without the engine")
    ap.add_argument("--tests", nargs="+", default=list(DEFAULT_TESTS), metavar="TEST")
    ap.add_argument("-j", "--jobs", type=int, default=2, help="regrtest -j (default 2)")
    ap.add_argument(
        "--timeout",
        type=float,
        default=300,
        help="regrtest --timeout per test file, in seconds (default 300)",
    )
    ap.add_argument(
        "--overall-timeout",
        type=float,
        default=600,
        help="kill the whole regrtest run after this many seconds (default 600: CI's budget)",
    )
    ap.add_argument(
        "--sampling-rate",
        type=float,
        default=None,
        help="start the engine with this sampling rate (default: the library's default); a "
        "high rate such as 0.01 exercises the slow path far more often",
    )
    ap.add_argument("--exclusions", type=Path, default=DEFAULT_EXCLUSIONS)
    ap.add_argument(
        "--no-exclusions",
        action="store_true",
        help="apply no exclusions (default in --baseline mode unless --with-exclusions)",
    )
    ap.add_argument("--with-exclusions", action="store_true", help="apply them in --baseline")
    ap.add_argument(
        "--no-diagnose",
        action="store_true",
        help="on failure, do not re-run the failing tests without the engine",
    )
    ap.add_argument("--keep-temp", action="store_true", help="keep the temporary directory")
    args, extra = ap.parse_known_args(argv)
    # SIGTERM (scripts/test.sh's time budget) ends the run like Ctrl+C: regrtest, in a session
    # of its own, is killed with its workers instead of being left behind.
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    if extra and extra[0] == "--":
        extra = extra[1:]

    exclusions = parse_exclusions(args.exclusions) if args.exclusions.exists() else []
    apply_exclusions = not args.no_exclusions and (not args.baseline or args.with_exclusions)
    mine = [e for e in exclusions if e.applies_to(VERSION)]
    mode = "baseline (no engine)" if args.baseline else "with the memprof-limits engine"
    print(f"== CPython {sys.version.split()[0]} regression tests, {mode}", flush=True)
    print(f"   interpreter: {sys.executable}")
    print(f"   tests: {' '.join(args.tests)}")
    if args.sampling_rate is not None and not args.baseline:
        print(f"   sampling rate: {args.sampling_rate:g} per byte")
    if apply_exclusions and mine:
        print(f"   excluded on {VERSION} ({args.exclusions.name}):")
        for e in mine:
            print(f"     - {e.pattern}: {e.reason}")

    tmp = Path(tempfile.mkdtemp(prefix="memprof-limits-regrtest-"))
    t0 = time.monotonic()
    try:
        site_dir = tmp / "site"
        site_dir.mkdir()
        work = tmp / "work"  # cwd of regrtest: nothing of the repo shadows the stdlib's `test`
        work.mkdir()
        marker = tmp / "engine-marker.tsv"
        junit = tmp / "junit.xml"
        ignorefile = None
        if apply_exclusions and mine:
            ignorefile = tmp / "ignore.txt"
            ignorefile.write_text("".join(e.pattern + "\n" for e in mine))

        if args.baseline:
            env = base_env()
        else:
            (site_dir / "sitecustomize.py").write_text(SITECUSTOMIZE)
            env = engine_env(site_dir, marker)
            if args.sampling_rate is not None:
                env["MEMPROF_LIMITS_REGRTEST_RATE"] = repr(args.sampling_rate)
            err = preflight(env, work, marker)
            if err is not None:
                print(f"!! engine unavailable on {VERSION}: {err}", flush=True)
                return 2
            print("   preflight: a child process with the sitecustomize has the engine started")

        output: list[str] = []
        rc = run_regrtest(
            args.tests,
            env=env,
            cwd=work,
            jobs=args.jobs,
            timeout=args.timeout,
            overall_timeout=args.overall_timeout,
            junit=junit,
            ignorefile=ignorefile,
            matchfile=None,
            extra=extra,
            output=output,
        )
        res = parse_junit(junit)
        elapsed = time.monotonic() - t0
        ok = rc == 0
        print(f"-- regrtest exit status {rc}; {fmt_counts(res)}", flush=True)
        ignored = unraisable_from_library(output)
        if ignored and not args.baseline:
            print(f"!! {len(ignored)} exceptions of the library went to the unraisable hook:")
            print(ignored[0])
            ok = False

        if res is not None and apply_exclusions:
            leaked = [e.pattern for e in mine if e.pattern in res.ran_ids]
            for p in leaked:
                print(f"!! excluded test {p} ran anyway: the --ignorefile had no effect")
                ok = False

        if not args.baseline:
            lines = read_marker(marker)
            problems = check_markers(lines, args.tests, args.jobs)
            started = [m for m in lines if m.event == "started"]
            stopped = [
                m
                for m in lines
                if m.event == "exit" and "is_started=True counting=True" not in m.detail
            ]
            subinterps = [m for m in lines if m.event == "subinterpreter"]
            print(
                f"-- engine: started in {len({m.pid for m in started})} processes "
                f"({len({m.pid for m in started if _is_worker(m.argv)})} regrtest workers); "
                f"{len(stopped)} exited with the engine no longer started or counting; "
                f"{len(subinterps)} subinterpreters left alone"
            )
            for m in stopped[:5]:
                print(f"   note: pid {m.pid} {' '.join(m.argv)[:120]}: {m.detail}")
            for p in problems:
                print(f"!! {p}")
            if problems:
                ok = False

        failed = list(res.failed_ids) if res is not None else []
        if failed:
            print("-- failing tests:")
            for f in failed:
                print(f"     {f}")
        if args.baseline:
            _report_baseline(failed, mine, apply_exclusions)
        elif failed and not args.no_diagnose:
            _diagnose(failed, work, tmp, args)

        verdict = "OK" if ok else "FAILED"
        print(
            f"== regrtest {VERSION} {'baseline' if args.baseline else 'engine'}: {verdict} "
            f"({fmt_counts(res)}; {len(mine) if apply_exclusions else 0} excluded) "
            f"in {elapsed:.0f}s",
            flush=True,
        )
        return 0 if ok else 1
    finally:
        if args.keep_temp:
            print(f"   kept {tmp}")
        else:
            _rmtree(tmp)


def _report_baseline(failed: list[str], mine: list[Exclusion], applied: bool) -> None:
    if failed:
        print(
            "-- these fail WITHOUT the engine on this machine; if they fail with it too, they "
            "may be excluded in scripts/regrtest_exclusions.txt with the reason:"
        )
        for f in failed:
            print(f"     # <why it fails on this machine without the engine>\n     {VERSION} {f}")
    if not applied:
        stale = [e for e in mine if e.pattern not in failed and "*" not in e.pattern]
        for e in stale:
            print(
                f"   note: exclusion {e.pattern} (line {e.line}) passes without the engine on "
                f"{VERSION}: it should not be excluded here"
            )


def _diagnose(failed: list[str], work: Path, tmp: Path, args: argparse.Namespace) -> None:
    """Re-run the failing tests once without the engine to tell engine bugs from the rest."""
    print("-- diagnosis: re-running the failing tests once WITHOUT the engine", flush=True)
    matchfile = tmp / "diagnose-match.txt"
    matchfile.write_text("".join(f + "\n" for f in failed))
    modules = sorted({f.split(".")[1] for f in failed if f.count(".") >= 2})
    junit = tmp / "diagnose.xml"
    run_regrtest(
        modules or args.tests,
        env=base_env(),
        cwd=work,
        jobs=args.jobs,
        timeout=args.timeout,
        overall_timeout=args.overall_timeout,
        junit=junit,
        ignorefile=None,
        matchfile=matchfile,
        extra=[],
        output=[],
    )
    res = parse_junit(junit)
    again = set(res.failed_ids) if res is not None else set()
    for f in failed:
        if res is not None and f in res.ran_ids and f not in again:
            print(f"   ENGINE-ONLY failure (passes without the engine): {f}")
        elif f in again:
            print(f"   fails without the engine too (environment or flaky): {f}")
        else:
            print(f"   not re-run: {f}")


def _raise_keyboard_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("!! interrupted: regrtest and its workers were stopped", flush=True)
        sys.exit(130)
