"""``python -m memprof_limits_kernel [install ...]``."""

from __future__ import annotations

import sys

from memprof_limits._process import pin_hash_seed


def main(argv: list[str] | None = None) -> int:
    """Entry point: ``install ...`` installs the kernelspec; anything else
    launches the kernel (``-f CONNECTION_FILE`` and IPKernelApp options)."""
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["install"]:
        from .install import main as install_main

        return install_main(args[1:])
    # Seed 0 for this process only (reproducible counts); cells and their
    # children see PYTHONHASHSEED as the environment had it.
    pin_hash_seed()
    from .kernelapp import MemprofLimitsKernelApp

    MemprofLimitsKernelApp.launch_instance(argv=args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
