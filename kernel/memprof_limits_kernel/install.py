"""The kernelspec: what ``kernel.json`` says, and ``python -m memprof_limits_kernel install``.

The wheel also ships ``resources/kernel.json`` and the logos as shared data
(``share/jupyter/kernels/memprof-limits/``), so that installing the package
makes the kernel visible with no further step; ``install`` writes the same
spec with this interpreter's absolute path, and options.

Two decisions live in the spec:

- ``interrupt_mode: "message"``: the ■ button sends ``interrupt_request`` on
  the control channel, which the kernel turns into the running cell's token.
  ``--interrupt-mode signal`` makes clients send SIGINT instead, which the
  kernel maps to the same token.
- No ``PYTHONHASHSEED`` in ``env``: the kernel pins its own hash seed to 0
  (``memprof_limits._process.pin_hash_seed``: a cell allocates the same
  number of bytes in every fresh kernel) without exporting it, so that the
  processes a notebook starts keep hash randomisation; ``--env
  PYTHONHASHSEED random`` opts the kernel out.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any

import memprof_limits as ml

from . import KERNEL_NAME

__all__ = ["DISPLAY_NAME", "RESOURCE_FILES", "install", "kernel_spec", "main", "write_kernel_spec"]

DISPLAY_NAME = "Python 3 (memprof-limits)"
RESOURCE_FILES = ("kernel.json", "logo-32x32.png", "logo-64x64.png", "logo-svg.svg")
INTERRUPT_MODES = ("message", "signal")


def kernel_spec(
    *,
    executable: str = "python",
    display_name: str = DISPLAY_NAME,
    interrupt_mode: str = "message",
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The contents of ``kernel.json``.

    ``executable="python"`` (the shipped spec) lets ``jupyter_client`` use
    the interpreter of the client; ``install`` writes ``sys.executable``.
    """
    if interrupt_mode not in INTERRUPT_MODES:
        raise ValueError(f"interrupt_mode: expected 'message' or 'signal', got {interrupt_mode!r}")
    return {
        "argv": [executable, "-m", "memprof_limits_kernel", "-f", "{connection_file}"],
        "display_name": display_name,
        "language": "python",
        "interrupt_mode": interrupt_mode,
        "env": dict(env or {}),
        "metadata": {"debugger": False},
        "kernel_protocol_version": "5.5",
    }


def write_kernel_spec(path: str | Path, **spec: Any) -> str:
    """Write a kernelspec directory (``kernel.json`` + logos) at ``path``;
    ``spec`` is passed to :func:`kernel_spec`.  Returns the path."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    folder = resources.files(__package__) / "resources"
    for name in RESOURCE_FILES[1:]:
        (path / name).write_bytes((folder / name).read_bytes())
    (path / "kernel.json").write_text(json.dumps(kernel_spec(**spec), indent=1) + "\n")
    return str(path)


def install(
    *,
    user: bool = False,
    prefix: str | None = None,
    kernel_name: str = KERNEL_NAME,
    display_name: str | None = None,
    interrupt_mode: str = "message",
    limits: str | None = None,
    report: bool = False,
    env: dict[str, str] | None = None,
    executable: str | None = None,
    kernel_spec_manager: Any = None,
) -> str:
    """Install the kernelspec; returns the directory it was installed to.

    Args:
        user: into the user's Jupyter data directory.
        prefix: into ``PREFIX/share/jupyter/kernels`` (``sys.prefix`` for a
            virtual environment); system-wide if neither is given.
        kernel_name: the kernelspec's name.
        display_name: the name shown by front ends.
        interrupt_mode: ``"message"`` (default) or ``"signal"``.
        limits: default limits of every cell, e.g. ``"memory=4GiB"``
            (``MEMPROF_LIMITS`` in the kernel's environment).
        report: print a one-line summary after each cell.
        env: more environment variables for the kernel.
        executable: the Python that runs the kernel (default: this one).
    """
    from jupyter_client.kernelspec import KernelSpecManager

    kernel_env = dict(env or {})
    if limits:
        ml.CellLimits.parse(limits)  # a clear ValueError now rather than at each start
        kernel_env["MEMPROF_LIMITS"] = limits
    if report:
        kernel_env["MEMPROF_LIMITS_REPORT"] = "1"
    manager = kernel_spec_manager or KernelSpecManager()
    with tempfile.TemporaryDirectory() as tmp:
        path = write_kernel_spec(
            Path(tmp) / kernel_name,
            executable=executable or sys.executable,
            display_name=display_name or DISPLAY_NAME,
            interrupt_mode=interrupt_mode,
            env=kernel_env,
        )
        dest: str = manager.install_kernel_spec(
            path, kernel_name=kernel_name, user=user, prefix=prefix
        )
    return dest


def main(argv: list[str] | None = None) -> int:
    """``python -m memprof_limits_kernel install [options]``."""
    parser = argparse.ArgumentParser(
        prog="python -m memprof_limits_kernel install",
        description="Install the memprof-limits kernelspec for Jupyter.",
    )
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--user", action="store_true", help="install for the current user")
    where.add_argument(
        "--sys-prefix",
        action="store_true",
        help=f"install into this environment ({sys.prefix})",
    )
    where.add_argument("--prefix", metavar="PREFIX", help="install into PREFIX/share/jupyter")
    parser.add_argument("--name", default=KERNEL_NAME, help=f"kernelspec name ({KERNEL_NAME})")
    parser.add_argument("--display-name", help=f"name shown by front ends ({DISPLAY_NAME!r})")
    parser.add_argument(
        "--interrupt-mode", choices=INTERRUPT_MODES, default="message", help="default: message"
    )
    parser.add_argument(
        "--limits", metavar="SPEC", help="default limits, e.g. 'memory=4GiB allocations=1GB'"
    )
    parser.add_argument("--report", action="store_true", help="one-line summary after each cell")
    parser.add_argument(
        "--env",
        nargs=2,
        action="append",
        default=[],
        metavar=("NAME", "VALUE"),
        help="environment variable for the kernel (repeatable)",
    )
    args = parser.parse_args(argv)
    try:
        dest = install(
            user=args.user,
            prefix=sys.prefix if args.sys_prefix else args.prefix,
            kernel_name=args.name,
            display_name=args.display_name,
            interrupt_mode=args.interrupt_mode,
            limits=args.limits,
            report=args.report,
            env=dict(args.env),
        )
    except (ValueError, OSError) as e:
        print(f"memprof_limits_kernel install: {e}", file=sys.stderr)
        return 1
    print(f"Installed kernelspec {args.name} in {dest}")
    return 0
