"""A real browser: JupyterLab with our kernel, driven through headless Chromium.

JupyterLab runs on 127.0.0.1 with the memprof-limits kernelspec installed into
a temporary prefix; Playwright drives Debian's Chromium (``/usr/bin/chromium``,
no browser download).  The test opens a notebook, runs a busy loop, clicks the
toolbar's interrupt button (■), and checks that the cell's output shows the
``Interrupted`` error line with the rollback, and that the next cell sees the
value from before the interrupted cell.  It takes a screenshot into its
temporary directory; with ``MEMPROF_LIMITS_SCREENSHOTS=1`` (or when the file
is missing) it also writes ``docs/img/jupyterlab.png`` for the README.

Skipped, with the reason, only when Chromium is not installed (Debian package
``chromium``, which ``scripts/test.sh`` installs) or when JupyterLab or
Playwright are not (``pip install jupyterlab playwright``).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
pytest.importorskip("memprof_limits_kernel")

ROOT = Path(__file__).resolve().parents[2]
README_SCREENSHOT = ROOT / "docs" / "img" / "jupyterlab.png"
KERNEL_NAME = "memprof-limits"
TOKEN = "memprof-limits-browser-test"
CHROMIUM_FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-extensions",
    "--metrics-recording-only",
]


def _chromium() -> str:
    candidates = [os.environ.get("MEMPROF_LIMITS_CHROMIUM", ""), "/usr/bin/chromium"]
    candidates += [shutil.which(n) or "" for n in ("chromium", "chromium-browser")]
    for path in candidates:
        if path and os.access(path, os.X_OK):
            return path
    pytest.skip(
        "Chromium not found (/usr/bin/chromium, chromium or chromium-browser on PATH, or "
        "MEMPROF_LIMITS_CHROMIUM): install the Debian package 'chromium' "
        "(scripts/test.sh does, as root)"
    )


def _require(module: str, pip_name: str) -> None:
    try:
        __import__(module)
    except ImportError:
        pytest.skip(f"{module} is not installed: pip install {pip_name} (in [dev])")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _notebook(path: Path) -> None:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {
        "name": KERNEL_NAME,
        "display_name": "Python 3 (memprof-limits)",
        "language": "python",
    }
    nb.cells = [
        nbformat.v4.new_code_cell("x = 1\nprint('before: x =', x)"),
        nbformat.v4.new_code_cell("x = 2\nwhile True:  # press ■\n    x += 1"),
        nbformat.v4.new_code_cell("print('after the interrupt: x =', x)"),
    ]
    nbformat.write(nb, str(path))


@pytest.fixture
def jupyterlab(tmp_path: Path) -> Iterator[str]:
    """A JupyterLab server on 127.0.0.1 serving ``tmp_path/work``; yields its URL."""
    _chromium()  # skip before starting anything
    _require("playwright", "playwright")
    _require("jupyterlab", "jupyterlab")
    from memprof_limits_kernel.install import install

    work = tmp_path / "work"
    work.mkdir()
    _notebook(work / "interrupt.ipynb")
    prefix = tmp_path / "prefix"
    install(prefix=str(prefix), kernel_name=KERNEL_NAME)
    settings = tmp_path / "lab-settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    # No "get notified about official Jupyter news?" toast over the screenshot.
    (settings / "notification.jupyterlab-settings").write_text(json.dumps({"fetchNews": "false"}))
    env = dict(os.environ)
    env.update(
        JUPYTER_PATH=str(prefix / "share" / "jupyter"),
        JUPYTER_CONFIG_DIR=str(tmp_path / "config"),
        JUPYTER_DATA_DIR=str(tmp_path / "data"),
        JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"),
        JUPYTERLAB_SETTINGS_DIR=str(tmp_path / "lab-settings"),
        JUPYTERLAB_WORKSPACES_DIR=str(tmp_path / "lab-workspaces"),
        JUPYTER_PLATFORM_DIRS="1",
    )
    port = _free_port()
    log = (tmp_path / "jupyterlab.log").open("w")
    server = subprocess.Popen(
        [
            sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1",
            f"--port={port}", f"--ServerApp.token={TOKEN}", f"--ServerApp.root_dir={work}",
            "--ServerApp.allow_root=True", "--ServerApp.port_retries=0",
            "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
            "--LabApp.news_url=",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if server.poll() is not None:
                raise AssertionError(
                    f"jupyter lab exited ({server.returncode}):\n"
                    + (tmp_path / "jupyterlab.log").read_text()
                )
            try:
                with urllib.request.urlopen(f"{url}/api/status?token={TOKEN}", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise AssertionError(
                        "jupyter lab did not answer within 90 s:\n"
                        + (tmp_path / "jupyterlab.log").read_text()
                    ) from None
                time.sleep(0.3)
        yield url
    finally:
        # A clean shutdown also shuts the kernels down.
        try:
            request = urllib.request.Request(
                f"{url}/api/shutdown?token={TOKEN}", method="POST", data=b""
            )
            urllib.request.urlopen(request, timeout=5).close()
        except OSError:
            pass
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=10)
        log.close()


def test_interrupt_button_rolls_the_cell_back(jupyterlab: str, tmp_path: Path) -> None:
    chromium = _chromium()
    _require("playwright", "playwright")
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=30_000)  # the default 5 s is short on a loaded 2-core machine

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 640})
            page.set_default_timeout(60_000)
            page.goto(f"{jupyterlab}/lab/tree/interrupt.ipynb?token={TOKEN}")
            # Our kernel, started and idle.
            expect(page.locator(".jp-Notebook-ExecutionIndicator")).to_have_attribute(
                "data-status", "idle", timeout=90_000
            )
            expect(page.locator(".jp-KernelName").first).to_have_text("Python 3 (memprof-limits)")
            cells = page.locator(".jp-Notebook .jp-Cell")
            expect(cells).to_have_count(3)

            def run(i: int) -> None:
                cells.nth(i).locator(".jp-InputArea-editor").click()
                page.keyboard.press("Control+Enter")  # run, stay on the cell

            first = cells.nth(0).locator(".jp-OutputArea-output")
            run(0)
            try:  # on a loaded machine the first keystrokes can reach Lab before it is ready
                expect(first).to_have_text("before: x = 1", timeout=20_000)
            except AssertionError:
                run(0)
                expect(first).to_have_text("before: x = 1", timeout=60_000)
            run(1)
            expect(page.locator(".jp-Notebook-ExecutionIndicator")).to_have_attribute(
                "data-status", "busy"
            )
            time.sleep(1.0)  # let the loop run
            t0 = time.monotonic()
            page.locator("[data-command='notebook:interrupt-kernel']").first.click()
            error = cells.nth(1).locator(".jp-OutputArea-output")
            expect(error).to_contain_text("Interrupted", timeout=15_000)
            elapsed = time.monotonic() - t0
            expect(error).to_contain_text("rolled back: x (changed)")
            assert "KeyboardInterrupt" not in error.inner_text()
            assert elapsed < 10, f"the interrupt took {elapsed:.1f} s to show"
            expect(page.locator(".jp-Notebook-ExecutionIndicator")).to_have_attribute(
                "data-status", "idle"
            )
            run(2)
            expect(cells.nth(2).locator(".jp-OutputArea-output")).to_have_text(
                "after the interrupt: x = 1"
            )
            page.keyboard.press("Escape")  # command mode: no cursor in the picture
            page.keyboard.press("Control+b")  # hide the file browser
            page.mouse.move(1090, 630)  # no hover highlight either
            time.sleep(0.5)
            shot = tmp_path / "jupyterlab.png"
            page.screenshot(path=str(shot))
            assert shot.stat().st_size > 10_000
            update = os.environ.get("MEMPROF_LIMITS_SCREENSHOTS") == "1"
            if update or not README_SCREENSHOT.exists():
                README_SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(shot, README_SCREENSHOT)
        finally:
            browser.close()
