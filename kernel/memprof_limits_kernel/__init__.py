"""memprof_limits_kernel: a Jupyter kernel in which every cell is a limited task.

Each cell runs under the session's limits (``%limits``, ``%%limits``): the
global memory limit and an allocation budget of ``memprof_limits``.  An
interrupt -- the ■ button, ``interrupt_request`` or SIGINT -- sets the running
cell's cancellation token; an interrupted cell replies ``status: "error"``
and the user namespace is rolled back to what it was before the cell.

Launch: ``python -m memprof_limits_kernel -f CONNECTION_FILE`` (what the
kernelspec does).  Install the kernelspec: ``python -m memprof_limits_kernel
install [--user | --sys-prefix | --prefix PREFIX]``.  See docs/kernel.md.
"""

from __future__ import annotations

__version__ = "0.1.0"

KERNEL_NAME = "memprof-limits"
"""Name of the kernelspec (``jupyter kernelspec list``)."""

__all__ = ["KERNEL_NAME", "__version__"]
