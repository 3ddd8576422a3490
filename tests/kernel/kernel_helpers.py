"""Real kernel processes for the kernel tests (helpers; fixtures in conftest.py).

The kernelspecs are installed into a temporary prefix with the package's own
installer (``memprof_limits_kernel.install.install``) and found through
``JUPYTER_PATH``, so the tests do not depend on how the package was
installed (an editable install does not ship the wheel's shared data).
Two specs: ``memprof-limits`` (interrupt_mode "message", the default) and
``memprof-limits-signal`` (interrupt_mode "signal").
"""

from __future__ import annotations

import atexit
import os
import queue
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("ipykernel")
pytest.importorskip("jupyter_client")

from jupyter_client.blocking.client import BlockingKernelClient
from jupyter_client.manager import KernelManager, start_new_kernel

MESSAGE = "memprof-limits"
SIGNAL = "memprof-limits-signal"
KERNELS = {MESSAGE: "message", SIGNAL: "signal"}


def _install_specs(root: Path) -> Path:
    from memprof_limits_kernel.install import install

    for name, mode in KERNELS.items():
        install(prefix=str(root), kernel_name=name, interrupt_mode=mode)
    return root / "share" / "jupyter"


# Installed at import time (before jupyter_kernel_test's setUpClass, which
# starts its kernel outside pytest fixtures), and put first on JUPYTER_PATH
# (other entries are kept for other tests).
_ROOT = Path(tempfile.gettempdir()) / f"mlk-specs-{os.getpid()}"
os.environ["JUPYTER_PATH"] = os.pathsep.join(
    p for p in (str(_install_specs(_ROOT)), os.environ.get("JUPYTER_PATH")) if p
)
os.environ.setdefault("JUPYTER_PLATFORM_DIRS", "1")
atexit.register(lambda: remove_specs())


def remove_specs() -> None:
    import shutil

    shutil.rmtree(_ROOT, ignore_errors=True)


@dataclass
class Reply:
    """An execute_reply and the iopub messages of its request."""

    msg: dict[str, Any]
    outputs: list[dict[str, Any]] = field(default_factory=list)
    elapsed_s: float = 0.0

    @property
    def content(self) -> dict[str, Any]:
        return self.msg["content"]  # type: ignore[no-any-return]

    @property
    def status(self) -> str:
        return self.content["status"]  # type: ignore[no-any-return]

    @property
    def figures(self) -> dict[str, Any]:
        """What the kernel says about the cell (reply metadata)."""
        return self.msg["metadata"]["memprof_limits"]  # type: ignore[no-any-return]

    @property
    def stdout(self) -> str:
        return "".join(
            m["content"]["text"]
            for m in self.outputs
            if m["msg_type"] == "stream" and m["content"]["name"] == "stdout"
        )

    @property
    def stderr(self) -> str:
        return "".join(
            m["content"]["text"]
            for m in self.outputs
            if m["msg_type"] == "stream" and m["content"]["name"] == "stderr"
        )

    @property
    def result(self) -> str | None:
        for m in self.outputs:
            if m["msg_type"] == "execute_result":
                return m["content"]["data"]["text/plain"]  # type: ignore[no-any-return]
        return None

    @property
    def errors(self) -> list[dict[str, Any]]:
        return [m["content"] for m in self.outputs if m["msg_type"] == "error"]


class Kernel:
    """A running kernel and a blocking client, with helpers."""

    def __init__(self, name: str = MESSAGE, **kwargs: Any) -> None:
        """Start kernel ``name``; ``kwargs`` go to ``KernelManager.start_kernel``
        (``env=``, ``stderr=``...)."""
        self.name = name
        self.km: KernelManager
        self.kc: BlockingKernelClient
        self.km, self.kc = start_new_kernel(kernel_name=name, startup_timeout=60, **kwargs)
        #: iopub messages of a request read by wait_for_output, for collect.
        self._held: list[dict[str, Any]] = []

    def close(self) -> None:
        self.kc.stop_channels()
        self.km.shutdown_kernel(now=True)

    def submit(self, code: str, **kwargs: Any) -> str:
        return self.kc.execute(code, **kwargs)  # type: ignore[no-any-return]

    def collect(self, msg_id: str, timeout: float = 30.0) -> Reply:
        """Wait for the reply of ``msg_id`` and its outputs (until idle)."""
        deadline = time.monotonic() + timeout
        reply: dict[str, Any] | None = None
        outputs: list[dict[str, Any]] = []
        idle = False
        while reply is None:
            msg = self.kc.get_shell_msg(timeout=max(0.01, deadline - time.monotonic()))
            if msg["parent_header"].get("msg_id") == msg_id:
                reply = msg
        held, self._held = self._held, []
        while not idle:
            if held:
                msg = held.pop(0)
            else:
                try:
                    msg = self.kc.get_iopub_msg(timeout=max(0.01, deadline - time.monotonic()))
                except queue.Empty:
                    raise TimeoutError(f"no idle status for {msg_id}") from None
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            if msg["msg_type"] == "status":
                idle = msg["content"]["execution_state"] == "idle"
            elif msg["msg_type"] != "execute_input":
                outputs.append(msg)
        return Reply(reply, outputs)

    def wait_for_output(self, msg_id: str, text: str, timeout: float = 30.0) -> bool:
        """Wait until ``msg_id`` has printed ``text`` on stdout (True), or has
        ended without printing it (False).  Its messages read on the way are
        kept for :meth:`collect`; other requests' are dropped."""
        deadline = time.monotonic() + timeout
        while True:
            msg = self.kc.get_iopub_msg(timeout=max(0.01, deadline - time.monotonic()))
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            self._held.append(msg)
            if msg["msg_type"] == "stream" and text in msg["content"]["text"]:
                return True
            if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                return False

    def run(self, code: str, timeout: float = 30.0, **kwargs: Any) -> Reply:
        return self.collect(self.submit(code, **kwargs), timeout)

    def ok(self, code: str, timeout: float = 30.0) -> Reply:
        """Run ``code``, which must succeed."""
        r = self.run(code, timeout)
        assert r.status == "ok", (code, r.content, r.errors)
        return r

    def value(self, expr: str) -> str:
        """``repr`` of an expression, evaluated in the kernel."""
        r = self.ok(f"print(repr({expr}), end='')")
        return r.stdout

    def interrupt_and_wait(self, timeout: float = 10.0) -> None:
        """Interrupt and return once the kernel has handled it: the
        interrupt_reply in message mode; SIGINT is synchronous."""
        if KERNELS[self.name] == "signal":
            self.km.interrupt_kernel()
            return
        msg = self.kc.session.msg("interrupt_request", {})
        self.kc.control_channel.send(msg)
        deadline = time.monotonic() + timeout
        while True:
            reply = self.kc.get_control_msg(timeout=max(0.01, deadline - time.monotonic()))
            if reply["parent_header"].get("msg_id") == msg["header"]["msg_id"]:
                assert reply["content"]["status"] == "ok", reply["content"]
                return

    def interrupt_after(self, code: str, delay: float, timeout: float = 30.0) -> Reply:
        """Run ``code``, interrupt it after ``delay`` s; ``elapsed_s`` is the
        time from the interrupt to the reply."""
        msg_id = self.submit(code)
        time.sleep(delay)
        t0 = time.monotonic()
        self.km.interrupt_kernel()
        deadline = time.monotonic() + timeout
        while True:
            msg = self.kc.get_shell_msg(timeout=max(0.01, deadline - time.monotonic()))
            if msg["parent_header"].get("msg_id") == msg_id:
                break
        elapsed = time.monotonic() - t0
        rest = self._drain(msg_id, deadline)
        return Reply(msg, rest, elapsed)

    def _drain(self, msg_id: str, deadline: float) -> list[dict[str, Any]]:
        outputs: list[dict[str, Any]] = []
        while True:
            msg = self.kc.get_iopub_msg(timeout=max(0.01, deadline - time.monotonic()))
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            if msg["msg_type"] == "status":
                if msg["content"]["execution_state"] == "idle":
                    return outputs
            elif msg["msg_type"] != "execute_input":
                outputs.append(msg)
