"""The kernel application: ``IPKernelApp`` with our kernel and output streams."""

from __future__ import annotations

from typing import Any

from ipykernel.kernelapp import IPKernelApp
from traitlets import Dict, DottedObjectName, Type

from .kernel import MemprofLimitsKernel
from .shell import MemprofLimitsShell

__all__ = ["MemprofLimitsKernelApp"]


class MemprofLimitsKernelApp(IPKernelApp):
    """Launches :class:`~memprof_limits_kernel.kernel.MemprofLimitsKernel`
    with ``sys.stdout``/``sys.stderr`` whose writes run masked."""

    name = "memprof-limits-kernel"
    kernel_class = Type(
        "memprof_limits_kernel.kernel.MemprofLimitsKernel",
        klass="ipykernel.kernelbase.Kernel",
        help="The kernel class (a MemprofLimitsKernel subclass to customise it).",
    ).tag(config=True)
    outstream_class = DottedObjectName(
        "memprof_limits_kernel.iostream.MaskedOutStream",
        help="The importstring for the OutStream factory",
        allow_none=True,
    ).tag(config=True)
    # `install` is ours (python -m memprof_limits_kernel install), not ipykernel's.
    subcommands: Any = Dict({})

    classes = [*IPKernelApp.classes, MemprofLimitsKernel, MemprofLimitsShell]
