"""``memprof-limits run SCRIPT``: exit statuses and the one-line reason for
each limit; ``-c CODE`` and cells read from a pipe."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from memprof_limits_repl import (
    EXIT_ALLOCATIONS,
    EXIT_INTERRUPTED,
    EXIT_MEMORY,
    EXIT_USAGE,
    RunOptions,
    parse_run_args,
)
from repl_helpers import REPL, run_cli

import memprof_limits as ml
from memprof_limits._defaults import default_memory_limit

DEFAULT = default_memory_limit()

SCRIPT = textwrap.dedent(
    """\
    import sys, time
    print("name", __name__, "argv", sys.argv[1:], flush=True)
    mode = sys.argv[1] if len(sys.argv) > 1 else ""
    try:
        if mode == "allocate":
            data = [str(i) for i in range(10**7)]
        elif mode == "memory":
            data = [bytearray(2**20) for _ in range(3000)]
        elif mode == "sleep":
            print("ready", flush=True)
            time.sleep(60)
        elif mode == "raise":
            def inner():
                raise ValueError("boom")
            inner()
        elif mode == "exit":
            sys.exit(7)
    finally:
        print("finally ran", flush=True)
    print("done")
    """
)


@pytest.fixture
def script(tmp_path: Path) -> Path:
    path = tmp_path / "script.py"
    path.write_text(SCRIPT)
    return path


def one_line_reason(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


def test_a_script_that_stays_within_its_limits(script: Path, repl_env: dict[str, str]) -> None:
    proc = run_cli(
        ["run", str(script), "a", "--allocations", "1GB", "-x", "--", "--memory", "y"], repl_env
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "name __main__ argv ['a', '-x', '--memory', 'y']",
        "finally ran",
        "done",
    ]
    assert proc.stderr == ""


def test_allocation_limit_exits_3_with_a_reason(script: Path, repl_env: dict[str, str]) -> None:
    proc = run_cli(["run", str(script), "allocate", "--allocations", "10MB"], repl_env)
    assert proc.returncode == EXIT_ALLOCATIONS == 3
    assert "finally ran" in proc.stdout and "done" not in proc.stdout
    assert re.fullmatch(
        r"memprof-limits: .*script\.py stopped after [0-9.]+ s: allocation limit of 10000000 "
        r"bytes reached \(\d+ bytes allocated\)",
        one_line_reason(proc.stderr),
    ), proc.stderr


def test_memory_limit_exits_4_with_a_reason(script: Path, repl_env: dict[str, str]) -> None:
    proc = run_cli(["run", "--memory", "300MiB", str(script), "memory"], repl_env)
    assert proc.returncode == EXIT_MEMORY == 4
    assert "finally ran" in proc.stdout and "done" not in proc.stdout
    match = re.fullmatch(
        r"memprof-limits: .*script\.py stopped after [0-9.]+ s: global memory limit of "
        r"300MiB exceeded \(peak resident memory (\d+\.\d) MiB\)",
        one_line_reason(proc.stderr),
    )
    assert match, proc.stderr
    # Blocks of 1 MiB or more are checked before their pages are touched (RSS + block over
    # the limit): the peak may stay just below the limit, never far from it.
    assert 298 <= float(match.group(1)) < 400, proc.stderr


def test_sigint_exits_130_with_a_reason(script: Path, repl_env: dict[str, str]) -> None:
    """SIGINT (Ctrl+C) sets the task's token: the sleep is interrupted, the
    script's finally runs, no KeyboardInterrupt traceback."""
    proc = subprocess.Popen(
        [*REPL, "run", str(script), "sleep"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=repl_env,
    )
    assert proc.stdout is not None
    try:
        assert proc.stdout.readline().startswith("name __main__")
        assert proc.stdout.readline() == "ready\n"
        os.kill(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == EXIT_INTERRUPTED == 130
    assert "finally ran" in out
    assert re.fullmatch(
        r"memprof-limits: .*script\.py stopped after [0-9.]+ s: interrupted by SIGINT \(Ctrl\+C\)",
        one_line_reason(err),
    ), err


def test_exceptions_and_sys_exit_keep_their_python_statuses(
    script: Path, repl_env: dict[str, str]
) -> None:
    proc = run_cli(["run", str(script), "raise"], repl_env)
    assert proc.returncode == 1
    files = re.findall(r'File "([^"]+)"', proc.stderr)
    assert files and all(f.endswith("script.py") for f in files), proc.stderr  # no runpy frames
    assert proc.stderr.rstrip().endswith("ValueError: boom")
    assert run_cli(["run", str(script), "exit"], repl_env).returncode == 7


def test_report_gives_the_same_allocation_count_every_run(
    script: Path, repl_env: dict[str, str]
) -> None:
    """--report: the bytes allocated, to choose --allocations; exact, so the
    same for every run of a deterministic script."""
    reports = []
    for _ in range(2):
        proc = run_cli(["run", "--report", str(script), "a"], repl_env)
        assert proc.returncode == 0, proc.stderr
        match = re.fullmatch(
            r"memprof-limits: .*script\.py: allocated .* \((\d+) bytes\), peak RSS .*, "
            r"[0-9.]+ s",
            one_line_reason(proc.stderr),
        )
        assert match, proc.stderr
        reports.append(int(match.group(1)))
    assert reports[0] == reports[1] > 0
    exit_7 = run_cli(["run", str(script), "exit", "--report"], repl_env)
    assert exit_7.returncode == 7 and "allocated" in exit_7.stderr


def test_hash_seed_is_pinned_unless_set(script: Path, repl_env: dict[str, str]) -> None:
    """As the kernel does: hash seed 0 (re-exec) for reproducible counts,
    without exporting it (see below); a value already set (random, say) is
    kept."""
    code = "import os, sys; print(sys.flags.hash_randomization, os.environ.get('PYTHONHASHSEED'))"
    env = {k: v for k, v in repl_env.items() if k != "PYTHONHASHSEED"}
    assert run_cli(["-c", code], env).stdout == "0 None\n"
    assert run_cli(["-c", code], {**env, "PYTHONHASHSEED": "random"}).stdout == "1 random\n"
    (script.parent / "hash.py").write_text(code)
    assert run_cli(["run", str(script.parent / "hash.py")], env).stdout == "0 None\n"


def test_run_a_module_with_dash_m(tmp_path: Path, repl_env: dict[str, str]) -> None:
    (tmp_path / "mymod.py").write_text("import sys\nprint(__name__, sys.argv[1:])\n")
    proc = run_cli(["run", "-m", "mymod", "x", "--allocations", "1GB"], repl_env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "__main__ ['x']\n"


def test_usage_errors_exit_2(tmp_path: Path, repl_env: dict[str, str]) -> None:
    missing = run_cli(["run", str(tmp_path / "missing.py")], repl_env)
    assert missing.returncode == EXIT_USAGE == 2
    assert "can't open file" in missing.stderr and "missing.py" in missing.stderr
    for args in (["run"], ["run", "--bogus", "x.py"], ["run", "x.py", "--allocations", "lots"]):
        proc = run_cli(args, repl_env)
        assert proc.returncode == 2, args
        assert "memprof-limits run: error:" in proc.stderr, proc.stderr
    assert run_cli(["--allocations", "lots"], repl_env).returncode == 2
    assert run_cli(["script.py"], repl_env).returncode == 2
    helped = run_cli(["run", "--help"], repl_env)
    assert helped.returncode == 0 and "Exit status" in helped.stdout


def test_parse_run_args() -> None:
    assert parse_run_args(["--memory=2GiB", "s.py", "--seed", "3", "a", "--", "--seed"]) == (
        RunOptions("s.py", False, ["a", "--seed"], parse_limits(memory=2 * 2**30), 3, False)
    )
    assert parse_run_args(["-mpkg.mod", "--allocations", "off"]).module
    assert parse_run_args(["--", "-weird-name.py", "-v"]).target == "-weird-name.py"


def parse_limits(**kwargs: int) -> object:
    import memprof_limits as ml

    return ml.CellLimits(**kwargs)


def test_dash_c_runs_one_cell_with_exit_statuses(repl_env: dict[str, str]) -> None:
    ok = run_cli(["-c", "import sys; print(sys.argv); 6 * 7", "a", "b"], repl_env)
    assert (ok.returncode, ok.stdout) == (0, "['-c', 'a', 'b']\n42\n")
    limited = run_cli(
        ["--allocations", "10MB", "-c", "x = [str(i) for i in range(10**7)]"], repl_env
    )
    assert limited.returncode == 3
    assert re.search(
        r"AllocationLimitExceeded: .*allocation limit of 10000000 bytes reached", limited.stderr
    ), limited.stderr
    memory = run_cli(
        ["--memory", "300MiB", "-c", "x = [bytearray(2**20) for _ in range(3000)]"], repl_env
    )
    assert memory.returncode == 4
    assert re.search(r"MemoryLimitExceeded: .*memory limit of 300MiB exceeded", memory.stderr)
    failed = run_cli(["-c", "1 / 0"], repl_env)
    assert failed.returncode == 1 and "ZeroDivisionError" in failed.stderr
    assert run_cli(["-c", "raise SystemExit(9)"], repl_env).returncode == 9


def test_cells_from_a_pipe(repl_env: dict[str, str]) -> None:
    """stdin not a tty: cells end at a complete statement, an empty line, or
    an unindented line after a block; the session goes on after errors and
    interrupts."""
    stdin = textwrap.dedent(
        """\
        x = 1
        def f():
            return x + 1
        f()
        %limits allocations=10MB
        x = 2; y = [str(i) for i in range(10**7)]

        for i in range(2):
            print("loop", i)

        x
        1 / 0
        print("still here", x)
        """
    )
    proc = run_cli(["--seed", "1"], repl_env, stdin=stdin)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "2",
        f"limits: memory={ml.format_bytes(DEFAULT.bytes or 0)} (the default memory limit: "
        f"{DEFAULT.describe()}; %limits memory=off removes it) allocations=10MB; rollback on",
        "loop 0",
        "loop 1",
        "1",
        "still here 1",
    ]
    assert "rolled back: x (changed)" in proc.stderr
    assert "ZeroDivisionError" in proc.stderr


def test_sys_exit_in_a_pipe_gives_the_exit_status(repl_env: dict[str, str]) -> None:
    proc = run_cli([], repl_env, stdin="print('a')\nimport sys; sys.exit(5)\nprint('b')\n")
    assert (proc.returncode, proc.stdout) == (5, "a\n")


HASH_PROBE = (
    "import os, subprocess, sys\n"
    "child = subprocess.run([sys.executable, '-c', 'import os, sys; "
    'print(sys.flags.hash_randomization, repr(os.environ.get("PYTHONHASHSEED")))\'],'
    " capture_output=True, text=True, check=True).stdout.split()\n"
    "print(repr(os.environ.get('PYTHONHASHSEED')), sys.flags.hash_randomization,"
    " hash('memprof-limits'), *child, [k for k in os.environ if 'SAVED' in k])\n"
)


@pytest.mark.parametrize("mode", ["-c", "stdin", "run"])
def test_the_hash_seed_is_not_exported_to_children(
    tmp_path: Path, repl_env: dict[str, str], mode: str
) -> None:
    """Issue 12, item 13: our process has seed 0; the code it runs, and the
    processes that code starts, see PYTHONHASHSEED as the user had it."""
    env = {k: v for k, v in repl_env.items() if k != "PYTHONHASHSEED"}
    seed0 = subprocess.run(
        [sys.executable, "-c", "print(hash('memprof-limits'))"],
        env={**env, "PYTHONHASHSEED": "0"}, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    probe = tmp_path / "probe.py"
    probe.write_text(HASH_PROBE)
    args = {"-c": ["-c", HASH_PROBE], "stdin": [], "run": ["run", str(probe)]}[mode]
    for seed in (None, "123"):
        run_env = env if seed is None else {**env, "PYTHONHASHSEED": seed}
        proc = run_cli(args, run_env, stdin=HASH_PROBE if mode == "stdin" else None)
        assert proc.returncode == 0, proc.stderr
        seen, flag, digest, child_flag, child_seed, leaked = proc.stdout.split(maxsplit=5)
        assert seen == child_seed == repr(seed), proc.stdout
        assert leaked.strip() == "[]"
        if seed is None:
            assert (flag, digest, child_flag) == ("0", seed0, "1"), proc.stdout
        else:
            assert flag == child_flag == "1", proc.stdout


# -- issue 13: figures that mean what they say; no limit unless asked --------------------------


@pytest.mark.parametrize(
    ("argv", "quoted"),
    [
        (["run", "script.py", "--allocations", "1", "GB"], "'1 GB'"),
        (["run", "--allocations", "1", "GB", "script.py"], "'1 GB'"),
        (["run", "--memory=2", "GiB", "script.py"], "'2 GiB'"),
        (["--allocations", "1", "GB"], "'1 GB'"),
        (["--memory", "1.5", "gb", "-c", "pass"], "'1.5 gb'"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else "",
)
def test_an_unquoted_size_with_a_space_is_refused(
    argv: list[str], quoted: str, repl_env: dict[str, str]
) -> None:
    """``--allocations 1 GB`` used to be a limit of 1 byte (and ``GB`` an argument of
    the script): refused, saying how to write it."""
    proc = run_cli(argv, repl_env)
    assert proc.returncode == EXIT_USAGE, (proc.stdout, proc.stderr)
    assert "write the size as one argument" in proc.stderr, proc.stderr
    assert quoted in proc.stderr, proc.stderr


def test_a_size_and_a_script_argument_are_not_confused(repl_env: dict[str, str]) -> None:
    options = parse_run_args(["script.py", "--allocations", "1GB", "MB"])
    assert options.limits.allocations == 10**9 and options.args == ["MB"]
    options = parse_run_args(["script.py", "--allocations", "1 GB"])
    assert options.limits.allocations == 10**9 and options.limits.describe() == "allocations=1 GB"


def test_run_sets_argv0_as_given_and_file_absolute(
    tmp_path: Path, repl_env: dict[str, str]
) -> None:
    """As ``python script.py``: ``sys.argv[0]`` as typed, ``__file__`` absolute."""
    (tmp_path / "show.py").write_text(
        "import sys, os\nprint(sys.argv[0]); print(__file__); print(__name__)\n"
        "print(os.path.isabs(__file__))\n"
    )
    proc = subprocess.run(
        [*REPL, "run", "show.py", "x"], cwd=tmp_path, env=repl_env,
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    python = subprocess.run(
        [sys.executable, "show.py", "x"], cwd=tmp_path, env=repl_env,
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == "show.py"
    assert proc.stdout == python.stdout, (proc.stdout, python.stdout)


def test_run_has_no_default_limit_and_says_so(script: Path, repl_env: dict[str, str]) -> None:
    proc = run_cli(["run", "--help"], repl_env)
    assert proc.returncode == 0
    assert "No limit unless asked" in proc.stdout, proc.stdout
    proc = run_cli(["run", "--report", str(script)], repl_env)
    assert proc.returncode == 0, proc.stderr


def test_the_repl_starts_with_the_default_memory_limit(repl_env: dict[str, str]) -> None:
    env = {k: v for k, v in repl_env.items() if k != "MEMPROF_LIMITS"}
    proc = run_cli([], env, stdin="%limits\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == (
        f"limits: memory={ml.format_bytes(DEFAULT.bytes or 0)} (the default memory limit: "
        f"{DEFAULT.describe()}; %limits memory=off removes it); rollback on\n"
    ), proc.stdout
    proc = run_cli(["-c", "import sys; print(sys.flags.hash_randomization)"], env)
    assert proc.returncode == 0, proc.stderr
    for spec, shown in [
        ("memory=off", "limits: no limits; rollback on"),
        ("allocations=5MB", "allocations=5MB; rollback on"),
    ]:
        proc = run_cli([], {**env, "MEMPROF_LIMITS": spec}, stdin="%limits\n")
        assert proc.stdout.rstrip("\n").endswith(shown), (spec, proc.stdout)
    proc = run_cli(["--memory", "off"], env, stdin="%limits\n")
    assert proc.stdout == "limits: no limits; rollback on\n", proc.stdout
    proc = run_cli([], {**env, "MEMPROF_LIMITS": "memory=lots"}, stdin="%limits\n")
    assert "ignoring MEMPROF_LIMITS='memory=lots'" in proc.stderr, proc.stderr
    assert "(the default memory limit: " in proc.stdout


RUNAWAY = (
    "if True:\n"
    "    state = 'changed'\n"
    "    blocks = []\n"
    "    while len(blocks) < 8192:\n"  # 8 GiB if nothing stops it
    "        blocks.append(bytearray(2**20))\n"
    "\nprint(state, 'blocks' in globals())\nprint(sum(range(10)))\n"
)


def _runaway_is_stopped(proc: subprocess.CompletedProcess[str], limit: str) -> None:
    assert proc.returncode == 0, proc.stderr
    assert f"MemoryLimitExceeded: global memory limit of {limit} exceeded" in proc.stderr, (
        proc.stderr
    )
    assert "rolled back: blocks (added), state (changed)" in proc.stderr, proc.stderr
    assert proc.stdout.splitlines()[-2:] == ["kept False", "45"], proc.stdout


def test_a_repl_with_a_small_configured_budget_stops_a_runaway_cell(
    repl_env: dict[str, str],
) -> None:
    env = {**repl_env, "MEMPROF_LIMITS": "memory=400MB"}
    proc = run_cli([], env, stdin="state = 'kept'\n" + RUNAWAY)
    _runaway_is_stopped(proc, "400MB")


def test_a_repl_in_a_small_cgroup_stops_a_runaway_cell(repl_env: dict[str, str]) -> None:
    import importlib.util

    path = Path(__file__).parents[1] / "kernel" / "cgroup_helpers.py"
    spec = importlib.util.spec_from_file_location("_cgroup_helpers", path)
    assert spec is not None and spec.loader is not None
    helpers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(helpers)
    env = {k: v for k, v in repl_env.items() if k != "MEMPROF_LIMITS"}
    with helpers.memory_cgroup(768 * 2**20) as cgroup:
        if cgroup is None:
            pytest.skip("cannot make a memory cgroup here (not root, or no memory controller)")
        proc = subprocess.run(
            helpers.enter_command(cgroup, [*REPL]),
            input="%limits\nstate = 'kept'\n" + RUNAWAY,
            env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    assert "80% of 768.0 MiB, the cgroup limit of " in proc.stdout, proc.stdout
    _runaway_is_stopped(proc, ml.format_bytes(int(768 * 2**20 * 0.8)))
