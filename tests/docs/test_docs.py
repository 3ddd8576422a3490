"""The documentation is current and its links work.

* ``docs/api.md`` is what ``docs/build_api.py`` generates from the docstrings
  of this checkout (edit the docstrings, then run the script);
* every relative link and image of the README and of ``docs/*.md`` points to
  a file that exists, and every ``#anchor`` into ``docs/api.md`` to an entry.
"""

from __future__ import annotations

import importlib.util
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")])
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def _load(path: Path, name: str) -> Any:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_api_reference_is_generated_from_the_docstrings() -> None:
    build_api = _load(ROOT / "docs" / "build_api.py", "docs_build_api")
    expected = build_api.build()
    current = (ROOT / "docs" / "api.md").read_text()
    assert current == expected, "docs/api.md is out of date: run python docs/build_api.py"


def test_api_reference_covers_every_export() -> None:
    import memprof_limits as ml
    from memprof_limits import stats

    text = (ROOT / "docs" / "api.md").read_text()
    for name in [*ml.__all__, *stats.__all__]:
        assert f'<a id="{name.lower()}"></a>' in text, name


def _links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # not in code blocks
    return [m.group(1) for m in LINK.finditer(text)]


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_relative_links_resolve(page: Path) -> None:
    api = (ROOT / "docs" / "api.md").read_text()
    broken = []
    for target in _links(page):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            broken.append(target)
        elif anchor and resolved.name == "api.md" and f'<a id="{anchor}"></a>' not in api:
            broken.append(target)
    assert not broken, f"{page.relative_to(ROOT)}: broken links {broken}"


# -- examples of the docs, executed -----------------------------------------------------------

_SESSION = re.compile(
    r"```text\n(In \[1\]: .*?)```", re.S
)  # an IPython-like transcript: In [n]: cells, their output lines, Out [n]: values


def _transcript(block: str) -> list[tuple[str, list[str]]]:
    """``[(cell source, expected output lines)]`` of an ``In [n]:`` transcript."""
    cells: list[tuple[str, list[str]]] = []
    for line in block.splitlines():
        m = re.match(r"In \[\d+\]: (.*)", line)
        if m:
            cells.append((m.group(1), []))
        elif line.startswith("        ") and cells and not cells[-1][1]:
            cells[-1] = (cells[-1][0] + "\n" + line[8:], [])
        elif line.strip():
            cells[-1][1].append(re.sub(r"^Out\[\d+\]: ", "", line))
    return cells


def _check_in_kernel(
    tmp_path: Path, cells: list[tuple[str, list[str]]], pattern: Callable[[str], str]
) -> None:
    """Run ``cells`` in our kernel (a spec for this interpreter, whatever
    kernelspecs are installed); each line shown must match ``pattern(line
    expected)``."""
    from jupyter_client import KernelManager
    from jupyter_client.kernelspec import KernelSpecManager
    from memprof_limits_kernel.install import write_kernel_spec

    write_kernel_spec(tmp_path / "memprof-limits", executable=sys.executable)
    specs = KernelSpecManager(kernel_dirs=[str(tmp_path)])
    km = KernelManager(kernel_name="memprof-limits", kernel_spec_manager=specs)
    km.start_kernel()
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=60)
        for source, expected in cells:
            msg_id = kc.execute(source)
            shown: list[str] = []
            while True:
                msg = kc.get_iopub_msg(timeout=60)
                if msg["parent_header"].get("msg_id") != msg_id:
                    continue
                kind, content = msg["msg_type"], msg["content"]
                if kind == "error":
                    shown.append(f"{content['ename']}: {content['evalue']}")
                elif kind == "execute_result":
                    shown.append(content["data"]["text/plain"])
                elif kind == "stream":
                    shown += content["text"].splitlines()
                elif kind == "status" and content["execution_state"] == "idle":
                    break
            assert len(shown) == len(expected), (source, shown, expected)
            for got, want in zip(shown, expected, strict=True):
                assert re.fullmatch(pattern(want), got), (source, got, want)
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def test_the_opening_example_of_kernel_md_runs_as_shown(tmp_path: Path) -> None:
    pytest.importorskip("ipykernel")

    m = _SESSION.search((ROOT / "docs" / "kernel.md").read_text())
    assert m, "docs/kernel.md: no In [1]: transcript"
    cells = _transcript(m.group(1))
    assert len(cells) == 3, cells
    # The exact count of bytes allocated may differ a little between versions.
    _check_in_kernel(
        tmp_path, cells, lambda want: re.escape(want).replace(r"\(10326908\ bytes", r"\(\d+\ bytes")
    )


# -- %%count_allocations and %undo, in docs/kernel.md and docs/repl.md -------------------------

_COUNTS = re.compile(r"(allocated \d+ bytes \([\d.]+ MB\)|\(\d+ bytes allocated\))")


_SPREAD = [
    (
        re.escape("allocated ") + r"\d+" + re.escape(" bytes ("),
        r"allocated \d+(?: to \d+)? bytes \(",
    ),
    (re.escape("in each of "), "(?:in each of |in )"),
    (
        re.escape(" runs from the same state (spread 0)"),
        re.escape(" runs from the same state (spread ") + r"(?:0|\d{1,3} bytes, [\d.e-]+%)\)",
    ),
]


def _loose(want: str) -> str:
    """A pattern for a line of output: as written, but for the exact byte counts
    (``allocated 2267490 bytes (2.27 MB)``, ``(2001051 bytes allocated)``), which
    differ between Python versions."""
    parts = _COUNTS.split(want)
    pattern = "".join(
        re.sub(r"\d+", r"\\d+", re.escape(part)) if i % 2 else re.escape(part)
        for i, part in enumerate(parts)
    )
    # A count shown with no spread may show a few bytes of it on a loaded machine (the
    # library's watchdog and CPython's free lists: docs/serve.md, "Limits").
    for exact, loose in _SPREAD:
        pattern = pattern.replace(exact, loose)
    return pattern


def test_the_count_allocations_example_of_kernel_md_runs_as_shown(tmp_path: Path) -> None:
    pytest.importorskip("ipykernel")

    page = (ROOT / "docs" / "kernel.md").read_text()
    section = page.split("## How much does a cell allocate? `%%count_allocations`", 1)[1]
    m = _SESSION.search(section)
    assert m, "docs/kernel.md: no In [1]: transcript under %%count_allocations"
    cells = _transcript(m.group(1))
    assert cells[2][0].startswith("%%count_allocations 5"), cells
    _check_in_kernel(tmp_path, cells, _loose)


def test_the_count_allocations_example_of_repl_md_runs_as_shown(tmp_path: Path) -> None:
    import os
    import subprocess

    page = (ROOT / "docs" / "repl.md").read_text()
    m = re.search(r"```text\n(>>> %limits memory=4GiB allocations=1MB\n.*?)```", page, re.S)
    assert m, "docs/repl.md: no transcript of %%count_allocations"
    inputs, expected = [], []
    for line in m.group(1).splitlines():
        if line.startswith((">>> ", "... ")):
            inputs.append(line[4:])
        else:
            expected.append(line)
    assert any(line.startswith("%%count_allocations") for line in inputs)
    env = {**os.environ, "HOME": str(tmp_path), "XDG_STATE_HOME": str(tmp_path / "state")}
    proc = subprocess.run(
        [sys.executable, "-m", "memprof_limits_repl", "-q"],
        input="\n".join(inputs) + "\n",
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=120,
        check=True,
    )
    shown = proc.stdout.splitlines()
    assert proc.stderr == "", proc.stderr
    assert len(shown) == len(expected), (shown, expected)
    for got, want in zip(shown, expected, strict=True):
        assert re.fullmatch(_loose(want), got), (got, want)


# -- docs/serve.md ------------------------------------------------------------------------------

_FIGURES = re.compile(r'"(allocated_bytes|peak_rss_bytes|wall_time_s)": [0-9.]+')


def _normalized(replies: str) -> list[str]:
    """Replies with the figures that vary between runs and versions made equal."""
    text = _FIGURES.sub(r'"\1": N', replies)
    return re.sub(r"\(\d+ bytes allocated", "(N bytes allocated", text).splitlines()


def test_the_transcript_of_serve_md_is_real(tmp_path: Path) -> None:
    import subprocess

    page = (ROOT / "docs" / "serve.md").read_text()
    requests, replies = re.findall(r"```jsonl\n(.*?)```", page, re.S)[:2]
    command = "memprof-limits serve --allocations 50MB --timeout 5 < requests.jsonl"
    assert f"`{command}`" in page
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "memprof_limits_repl",
            "serve",
            "--allocations",
            "50MB",
            "--timeout",
            "5",
        ],
        input=requests,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
        check=True,
    )
    assert _normalized(proc.stdout) == _normalized(replies)


def test_the_search_of_serve_md_runs_as_shown(tmp_path: Path) -> None:
    import subprocess

    page = (ROOT / "docs" / "serve.md").read_text()
    code = re.search(r"```python\n(.*?)```", page, re.S)
    shown = re.search(r"prints\n\n```text\n(.*?)```", page, re.S)
    assert code and shown
    proc = subprocess.run(
        [sys.executable, "-c", code.group(1)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
        check=True,
    )
    assert proc.stdout == shown.group(1)


def _digits_equal(text: str) -> list[str]:
    """Byte counts differ from run to run (free lists, docs/dask.md "Determinism")."""
    return re.sub(r"\b\d{4,}\b", "N", text).splitlines()


def test_the_example_of_dask_md_runs_as_shown(tmp_path: Path) -> None:
    import subprocess

    pytest.importorskip("distributed")
    page = (ROOT / "docs" / "dask.md").read_text()
    code = re.search(r"## On one machine\n\n```python\n(.*?)```", page, re.S)
    shown = re.search(r"prints \(CPython [^)]*\)\n\n```text\n(.*?)```", page, re.S)
    assert code and shown
    script = tmp_path / "example.py"  # a file: the workers (spawned) import __main__ from it
    script.write_text(code.group(1))
    proc = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, cwd=tmp_path, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _digits_equal(proc.stdout) == _digits_equal(shown.group(1)), proc.stdout


def test_the_commands_of_dask_md_for_several_machines_work(tmp_path: Path) -> None:
    """The scheduler and worker commands as written (on this machine, on a free port)."""
    import shlex
    import socket
    import subprocess

    pytest.importorskip("distributed")
    page = (ROOT / "docs" / "dask.md").read_text()
    section = page.split("## On several machines", 1)[1].split("\n## ", 1)[0]
    commands = re.search(r"```sh\n(.*?)```", section, re.S)
    client_code = re.search(r"```python\n(.*?)```", section, re.S)
    assert commands and client_code
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    def local(text: str) -> str:
        return text.replace("SCHEDULER", "127.0.0.1").replace("8786", str(port))

    bin_dir = Path(sys.executable).parent
    procs = []
    try:
        for line in commands.group(1).strip().splitlines():
            argv = shlex.split(local(line))
            argv[0] = str(bin_dir / argv[0])  # the dask of this interpreter
            procs.append(
                subprocess.Popen(
                    argv, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
                )
            )
            time.sleep(2 if len(procs) == 1 else 0)  # the scheduler listens first
        code = local(client_code.group(1)) + (
            "\nclient.wait_for_workers(2, timeout=60)"
            "\nfrom memprof_limits import get_global_memory_limit"
            "\nprint(sorted(client.run(get_global_memory_limit).values()))"
        )
        proc = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        # 45, then the limit the plugin set in both worker processes: 90 % of 4 GB.
        assert proc.stdout.splitlines() == ["45", "[3600000000, 3600000000]"], proc.stdout
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in reversed(procs):
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
