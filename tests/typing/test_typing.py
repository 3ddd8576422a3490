"""The public API under ``mypy --strict``: the lazily loaded names keep their types."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

HERE = Path(__file__).resolve().parent


def mypy(path: Path) -> subprocess.CompletedProcess[str]:
    """mypy --strict on ``path`` alone (no project configuration), the package from ``src``
    (mypy cannot follow the editable install's import hook); only ``path``'s errors count."""
    options = ["--strict", "--no-incremental", "--cache-dir=/dev/null", "--config-file="]
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", *options, path.name],
        capture_output=True,
        text=True,
        cwd=path.parent,
        env={**os.environ, "MYPYPATH": str(HERE.parents[1] / "src")},
        timeout=600,
    )
    proc.stdout = "\n".join(line for line in proc.stdout.splitlines() if line.startswith(path.name))
    return proc


def test_the_public_api_type_checks() -> None:
    proc = mypy(HERE / "public_api.py")
    assert proc.stdout == "", proc.stdout + proc.stderr


def test_a_misuse_is_reported(tmp_path: Path) -> None:
    """The names are typed, not ``Any``: a wrong use is an error."""
    wrong = tmp_path / "wrong.py"
    wrong.write_text(
        textwrap.dedent(
            """
            import memprof_limits as ml
            r: ml.Ok[str] | ml.Error = ml.limit_allocations(lambda: 3, limit="1 MB")
            n: int = ml.format_bytes(3)
            ml.LimitScope(allocations=[1])
            """
        )
    )
    proc = mypy(wrong)
    assert proc.stdout.count("error:") == 3, proc.stdout
