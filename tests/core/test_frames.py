"""The user's part of a traceback (``_frames.user_traceback``), shared by the kernel and the
REPL: the machinery's frames at the start and, for an interrupt, ours at the end go."""

from __future__ import annotations

import sys
import traceback
from types import TracebackType

from memprof_limits._frames import user_traceback

OURS = "<ours>"


def _chain() -> TracebackType:
    """A traceback of frames: <ours> run -> user cell -> user helper -> <ours> deliver."""
    namespace: dict[str, object] = {}
    exec(compile("def deliver():\n    raise KeyError('x')\n", OURS, "exec"), namespace)
    deliver = namespace["deliver"]

    def helper() -> None:
        deliver()  # type: ignore[operator]

    def cell() -> None:
        helper()

    exec(compile("def run(f):\n    f()\n", OURS, "exec"), namespace)
    try:
        namespace["run"](cell)  # type: ignore[operator]
    except KeyError:
        tb = sys.exc_info()[2]
    assert tb is not None
    return tb


def names(tb: TracebackType | None) -> list[str]:
    return [frame.f_code.co_name for frame, _ in traceback.walk_tb(tb)]


def test_the_machinerys_frames_at_the_start_go() -> None:
    tb = _chain().tb_next  # (from the machinery's frame: the test's own frame is above it)
    assert names(tb) == ["run", "cell", "helper", "deliver"]
    assert names(user_traceback(tb, lambda f: f == OURS)) == ["cell", "helper", "deliver"]


def test_from_a_given_code_object_and_without_ours_at_the_end() -> None:
    tb = _chain()
    cell = next(f.f_code for f, _ in traceback.walk_tb(tb) if f.f_code.co_name == "cell")
    kept = user_traceback(tb, lambda f: f == OURS, start=cell, trim_end=True)
    assert names(kept) == ["cell", "helper"]
    assert user_traceback(tb, lambda f: True) is None
    assert names(user_traceback(tb, lambda f: True, start=cell, trim_end=True)) == ["cell"]
