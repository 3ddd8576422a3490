"""``python -m memprof_limits_kernel [install ...]``."""

from __future__ import annotations

import os
import sys


def _fix_hash_seed() -> None:
    """Re-execute with ``PYTHONHASHSEED=0`` unless it is set.

    String hashes decide the iteration order of sets and dicts of strings, so
    with hash randomisation the same cell can take another path -- and
    allocate another number of bytes -- in each kernel.  The kernelspec sets
    the variable; this covers a kernel started by hand.  Set
    ``PYTHONHASHSEED=random`` to opt out.
    """
    if "PYTHONHASHSEED" in os.environ or not sys.flags.hash_randomization:
        return
    os.environ["PYTHONHASHSEED"] = "0"
    argv = list(getattr(sys, "orig_argv", []) or [sys.executable, "-m", "memprof_limits_kernel"])
    argv[0] = sys.executable
    os.execv(sys.executable, argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point: ``install ...`` installs the kernelspec; anything else
    launches the kernel (``-f CONNECTION_FILE`` and IPKernelApp options)."""
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["install"]:
        from .install import main as install_main

        return install_main(args[1:])
    _fix_hash_seed()
    from .kernelapp import MemprofLimitsKernelApp

    MemprofLimitsKernelApp.launch_instance(argv=args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
