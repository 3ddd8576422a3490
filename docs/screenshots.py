"""Make the screenshots of the README: docs/img/repl.png and docs/img/jupyterlab.png.

    python docs/screenshots.py            # both
    python docs/screenshots.py repl       # only the REPL

The REPL one is real: ``memprof-limits`` runs in tmux, keys are sent with
``send-keys`` (Ctrl+C included), and the screen is read back with
``capture-pane -e``, converted to HTML by ``aha`` and photographed by headless
Chromium through Playwright.  The JupyterLab one is taken by the real-browser
test (``tests/notebooks/test_browser.py``), run here with
``MEMPROF_LIMITS_SCREENSHOTS=1``.

Needs the Debian packages tmux, aha and chromium, and ``pip install playwright``.
"""

from __future__ import annotations

import html
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMG = ROOT / "docs" / "img"
CHROMIUM = os.environ.get("MEMPROF_LIMITS_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip

# (keys, seconds to wait after them); "C-c" is Ctrl+C.
SESSION: list[tuple[list[str], float]] = [
    (["import time", "Enter"], 0.5),
    (["x = 1", "Enter"], 0.5),
    (["x = 2; words = [str(i) * 10 for i in range(10**8)]", "Enter"], 4.0),
    (["x", "Enter"], 0.5),
    (["x = 3; time.sleep(3600)", "Enter"], 1.5),
    (["C-c"], 1.0),
    (["x", "Enter"], 1.0),
]
COLUMNS, ROWS = 120, 20


class Tmux:
    def __init__(self) -> None:
        self.socket = f"memprof-limits-shot-{uuid.uuid4().hex[:8]}"

    def __call__(self, *args: str) -> str:
        return subprocess.run(
            ["tmux", "-L", self.socket, "-f", "/dev/null", *args],
            check=True,
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True, timeout=30)


def repl_screen(home: Path) -> str:
    """Run the session in the REPL; the final screen, with its colours (ANSI)."""
    repl = shutil.which("memprof-limits", path=str(Path(sys.executable).parent)) or shutil.which(
        "memprof-limits"
    )
    argv = [repl] if repl else [sys.executable, "-m", "memprof_limits_repl"]
    command = shlex.join(
        ["env", f"HOME={home}", f"XDG_STATE_HOME={home}/state", "TERM=xterm-256color", *argv,
         "--memory", "2GiB", "--allocations", "500MB", "--history-file", ""]
    )  # fmt: skip
    tmux = Tmux()
    try:
        tmux("new-session", "-d", "-s", "repl", "-x", str(COLUMNS), "-y", str(ROWS), command)
        deadline = time.monotonic() + 30
        while ">>>" not in tmux("capture-pane", "-t", "repl", "-p"):
            if time.monotonic() > deadline:
                raise RuntimeError("the REPL did not show its prompt within 30 s")
            time.sleep(0.2)
        for keys, pause in SESSION:
            tmux("send-keys", "-t", "repl", *keys)
            time.sleep(pause)
        return tmux("capture-pane", "-t", "repl", "-p", "-e")
    finally:
        tmux.close()


def ansi_to_png(ansi: str, out: Path) -> None:
    body = subprocess.run(
        ["aha", "--black", "--no-header"], input=ansi, capture_output=True, text=True, check=True
    ).stdout
    page = f"""<!doctype html><meta charset="utf-8"><title>{html.escape(out.name)}</title>
<style>
  body {{ margin: 0; background: #1e1e1e; }}
  pre {{ margin: 0; padding: 14px 18px; color: #e6e6e6; background: #1e1e1e;
         font: 15px/1.3 "DejaVu Sans Mono", monospace; display: inline-block; }}
</style>
<pre id="screen">{body}</pre>"""
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "screen.html"
        path.write_text(page)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
            try:
                tab = browser.new_page(viewport={"width": 1200, "height": 800})
                tab.goto(path.as_uri())
                tab.locator("#screen").screenshot(path=str(out))
            finally:
                browser.close()


def repl() -> None:
    with tempfile.TemporaryDirectory() as home:
        screen = repl_screen(Path(home))
    out = IMG / "repl.png"
    ansi_to_png(screen, out)
    print(f"wrote {out.relative_to(ROOT)}")


def jupyterlab() -> None:
    env = dict(os.environ, MEMPROF_LIMITS_SCREENSHOTS="1")
    subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         str(ROOT / "tests" / "notebooks" / "test_browser.py")],
        check=True, env=env, cwd=ROOT,
    )  # fmt: skip
    print(f"wrote {(IMG / 'jupyterlab.png').relative_to(ROOT)}")


def main(argv: list[str]) -> int:
    which = argv or ["repl", "jupyterlab"]
    needed = {"repl": ["tmux", "aha"], "jupyterlab": ["chromium"]}
    missing = sorted({p for n in which for p in needed.get(n, []) if shutil.which(p) is None})
    if missing:
        sys.exit(
            f"docs/screenshots.py needs the programs {', '.join(missing)}: on Debian, "
            f"apt-get install {' '.join(missing)} (and python3 -m pip install playwright)"
        )
    IMG.mkdir(parents=True, exist_ok=True)
    for name in which:
        {"repl": repl, "jupyterlab": jupyterlab}[name]()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
