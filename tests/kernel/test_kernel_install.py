"""The kernelspec: the shipped kernel.json, ``python -m memprof_limits_kernel
install``, default limits from the spec, the fixed hash seed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from importlib import resources
from pathlib import Path

import pytest
from kernel_helpers import MESSAGE, Kernel
from memprof_limits_kernel import KERNEL_NAME
from memprof_limits_kernel.install import RESOURCE_FILES, kernel_spec, main

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = resources.files("memprof_limits_kernel") / "resources"


def test_shipped_spec_is_the_generated_one() -> None:
    shipped = json.loads((SHIPPED / "kernel.json").read_text())
    assert shipped == kernel_spec()
    assert shipped["argv"][:3] == ["python", "-m", "memprof_limits_kernel"]
    assert shipped["interrupt_mode"] == "message"
    assert shipped["env"] == {}  # no PYTHONHASHSEED: children would inherit it
    for name in RESOURCE_FILES:
        assert (SHIPPED / name).read_bytes()


def test_wheel_ships_the_spec_as_shared_data() -> None:
    """pyproject.toml must install resources/ into share/jupyter/kernels/memprof-limits
    (see kernel/README.md); until it does, this is skipped."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    data_files = config.get("tool", {}).get("setuptools", {}).get("data-files", {})
    target = f"share/jupyter/kernels/{KERNEL_NAME}"
    if target not in data_files:
        pytest.skip(f"pyproject.toml has no [tool.setuptools.data-files] entry for {target}")
    shipped = sorted(Path(p).name for p in data_files[target])
    assert shipped == sorted(RESOURCE_FILES)
    for path in data_files[target]:
        assert (ROOT / path).read_bytes() == (SHIPPED / Path(path).name).read_bytes()


def _spec(root: Path, name: str = KERNEL_NAME) -> dict[str, object]:
    path = root / "share" / "jupyter" / "kernels" / name
    assert sorted(p.name for p in path.iterdir()) == sorted(RESOURCE_FILES)
    return json.loads((path / "kernel.json").read_text())  # type: ignore[no-any-return]


def test_install_prefix(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--prefix", str(tmp_path)]) == 0
    assert "Installed kernelspec memprof-limits" in capsys.readouterr().out
    spec = _spec(tmp_path)
    assert spec["argv"] == [
        sys.executable,
        "-m",
        "memprof_limits_kernel",
        "-f",
        "{connection_file}",
    ]
    assert spec["interrupt_mode"] == "message" and spec["language"] == "python"
    from jupyter_client.kernelspec import KernelSpecManager

    ksm = KernelSpecManager(kernel_dirs=[str(tmp_path / "share" / "jupyter" / "kernels")])
    assert ksm.get_kernel_spec(KERNEL_NAME).display_name == "Python 3 (memprof-limits)"


def test_install_options(tmp_path: Path) -> None:
    argv = [
        "--prefix", str(tmp_path), "--name", "ml-sig", "--display-name", "Limited",
        "--interrupt-mode", "signal", "--limits", "memory=4GiB allocations=1GB", "--report",
        "--env", "FOO", "bar",
    ]  # fmt: skip
    assert main(argv) == 0
    spec = _spec(tmp_path, "ml-sig")
    assert spec["display_name"] == "Limited" and spec["interrupt_mode"] == "signal"
    assert spec["env"] == {
        "FOO": "bar",
        "MEMPROF_LIMITS": "memory=4GiB allocations=1GB",
        "MEMPROF_LIMITS_REPORT": "1",
    }


def test_install_user_and_sys_prefix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JUPYTER_DATA_DIR", str(tmp_path / "user"))
    assert main(["--user"]) == 0
    assert (tmp_path / "user" / "kernels" / KERNEL_NAME / "kernel.json").is_file()
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "env"))
    assert main(["--sys-prefix"]) == 0
    assert _spec(tmp_path / "env")["interrupt_mode"] == "message"


def test_install_refuses_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--prefix", str(tmp_path), "--limits", "memory=lots"]) == 1
    assert "memory" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--user", "--prefix", str(tmp_path)])  # mutually exclusive
    with pytest.raises(SystemExit):
        main(["--interrupt-mode", "carrier-pigeon"])


def test_module_entry_point_installs(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "memprof_limits_kernel", "install", "--prefix", str(tmp_path)],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    assert "Installed kernelspec" in out.stdout
    assert _spec(tmp_path)["argv"][0] == sys.executable


def test_launcher_pins_the_hash_seed_without_exporting_it() -> None:
    """A kernel re-executes itself with hash seed 0 and gives the cells the
    environment it was started with; an explicit setting is kept."""
    code = (
        "import os, sys\n"
        "from memprof_limits_kernel.__main__ import main\n"
        "import memprof_limits_kernel.kernelapp as app\n"
        "app.MemprofLimitsKernelApp.launch_instance = lambda argv: None\n"
        "main([])\n"
        "print(os.environ.get('PYTHONHASHSEED'), sys.flags.hash_randomization)"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONHASHSEED"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.split() == ["None", "0"], out.stderr
    env["PYTHONHASHSEED"] = "random"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.split() == ["random", "1"], out.stderr


def test_default_limits_from_the_environment() -> None:
    env = {**os.environ, "MEMPROF_LIMITS": "allocations=5MB", "MEMPROF_LIMITS_REPORT": "1"}
    k = Kernel(MESSAGE, env=env)
    try:
        r = k.ok("%limits")
        assert "allocations=5MB" in r.stdout and "report after each cell: on" in r.stdout
        r = k.run("data = [str(i) for i in range(10**6)]")
        assert r.status == "error" and r.content["ename"] == "AllocationLimitExceeded"
        assert "[memprof-limits] allocated" in r.stdout
    finally:
        k.close()
