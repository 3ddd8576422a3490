"""Issue 12, item 13 (kernel): the kernel runs with hash seed 0 (reproducible
allocation counts), but its cells and their child processes see
``PYTHONHASHSEED`` as the environment that started the kernel had it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from kernel_helpers import MESSAGE, Kernel

PROBE = (
    "import os, subprocess, sys\n"
    "child = subprocess.run([sys.executable, '-c', 'import os, sys; "
    'print(sys.flags.hash_randomization, repr(os.environ.get("PYTHONHASHSEED")))\'],'
    " capture_output=True, text=True, check=True).stdout.split()\n"
    "shell = subprocess.run('echo \"[$PYTHONHASHSEED]\"', shell=True, capture_output=True,"
    " text=True).stdout.strip()\n"
    "print(repr(os.environ.get('PYTHONHASHSEED')), sys.flags.hash_randomization,"
    " hash('memprof-limits'), *child, shell,"
    " [k for k in os.environ if 'SAVED' in k and 'MEMPROF' in k])"
)


def hash_with_seed_0() -> str:
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    code = "print(hash('memprof-limits'))"
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True
    ).stdout.strip()


@pytest.mark.parametrize("seed", [None, "123"], ids=["absent", "user-value"])
def test_cells_and_children_see_the_users_seed(seed: str | None) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONHASHSEED"}
    if seed is not None:
        env["PYTHONHASHSEED"] = seed
    k = Kernel(MESSAGE, env=env)
    try:
        seen, flag, digest, child_flag, child_seed, shell, leaked = k.ok(PROBE).stdout.split(
            maxsplit=6
        )
    finally:
        k.close()
    assert seen == child_seed == repr(seed)
    assert shell == f"[{seed or ''}]"  # os.system / shells: the C environment too
    assert leaked.strip() == "[]"
    if seed is None:
        assert flag == "0" and digest == hash_with_seed_0()  # the kernel itself: seed 0
        assert child_flag == "1"  # children: randomised, as the user's environment says
    else:
        assert flag == child_flag == "1"  # a seed the user chose is respected
