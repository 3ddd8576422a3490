"""Issue 12, item 13: ``pin_hash_seed`` gives our own process hash seed 0 and
leaves the environment of its children as the user had it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# What a process reports: its view of the variable, its own randomisation
# flag and a string hash, what a child process sees, and any private
# variable left behind.
PROBE = """\
import os, subprocess, sys
from memprof_limits._process import pin_hash_seed
pin_hash_seed()
child = subprocess.run(
    [sys.executable, "-c",
     "import os, sys; print(sys.flags.hash_randomization, repr(os.environ.get('PYTHONHASHSEED')))"],
    capture_output=True, text=True, check=True,
).stdout.split()
leaked = [k for k in os.environ if "MEMPROF_LIMITS" in k and "SAVED" in k]
print(repr(os.environ.get("PYTHONHASHSEED")), sys.flags.hash_randomization,
      hash("memprof-limits"), *child, leaked)
"""


def env_with(seed: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONHASHSEED"}
    if seed is not None:
        env["PYTHONHASHSEED"] = seed
    return env


def hash_with_seed_0() -> str:
    code = "print(hash('memprof-limits'))"
    out = subprocess.run(
        [sys.executable, "-c", code], env=env_with("0"), capture_output=True, text=True
    )
    return out.stdout.strip()


def probe(seed: str | None) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE], env=env_with(seed), capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().split(maxsplit=5)


def test_absent_seed_is_pinned_for_us_and_absent_for_children() -> None:
    seen, flag, digest, child_flag, child_seed, leaked = probe(None)
    assert seen == "None"  # the cell/script sees the user's environment
    assert flag == "0" and digest == hash_with_seed_0()  # we run with seed 0
    assert (child_flag, child_seed) == ("1", "None")  # children randomise
    assert leaked == "[]"


def test_empty_seed_is_pinned_and_restored_empty() -> None:
    seen, flag, digest, child_flag, child_seed, leaked = probe("")
    assert seen == "''" and flag == "0" and digest == hash_with_seed_0()
    assert (child_flag, child_seed) == ("1", "''") and leaked == "[]"


@pytest.mark.parametrize("seed", ["123", "random", "0"])
def test_a_seed_the_user_chose_is_respected(seed: str) -> None:
    seen, flag, _digest, child_flag, child_seed, leaked = probe(seed)
    assert seen == child_seed == repr(seed) and leaked == "[]"
    expected_flag = "0" if seed == "0" else "1"
    assert flag == child_flag == expected_flag
