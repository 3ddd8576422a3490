"""The IPython magic: %memprof / %%memprof."""

from __future__ import annotations

import ast
import linecache
from collections.abc import Callable
from typing import Any, Final, NamedTuple

from .. import _sampler
from .._units import format_bytes
from ..stats import _inclusion_probability
from ._recorder import _CELL_PREFIX, is_tracing, tracing
from ._records import DEFAULT_MAX_FRAMES, Frame, Statistic
from ._snapshot import Snapshot

# --------------------------------------------------------------------------
# IPython magic: %memprof / %%memprof.

_last_magic_snapshot: Snapshot | None = None
_magic_counter = 0
MAGIC_DEFAULT_RATE: Final = 1 / 8000
"""The magic's default rate: 10x the engine's default, for short cells."""


def last_magic_snapshot() -> Snapshot | None:
    """The snapshot of the last ``%memprof``/``%%memprof`` run, if any."""
    return _last_magic_snapshot


def _cell_statistics(snap: Snapshot, filename: str) -> list[Statistic]:
    """Group samples by the innermost frame that is in ``filename``."""
    groups: dict[tuple[Frame, ...], list[Any]] = {}
    for s in snap.samples:
        frame = next((f for f in reversed(s.traceback) if f.filename == filename), None)
        if frame is not None:
            acc = groups.setdefault((frame,), [0, 0.0])
            acc[0] += s.n_samples
            acc[1] += 1.0 / _inclusion_probability(s.size_bytes, snap.sampling_rate)
    stats = [snap._statistic(tb, n, count) for tb, (n, count) in groups.items()]
    stats.sort(reverse=True, key=Statistic._sort_key)
    return stats


def _run_profiled(
    shell: Any, source: str, *, rate: float | None, max_frames: int, track: bool
) -> tuple[Any, Snapshot]:
    """Run ``source`` in the shell's namespace under the profiler."""
    global _magic_counter
    _magic_counter += 1
    filename = f"{_CELL_PREFIX}{_magic_counter}>"
    transformed = shell.transform_cell(source) if hasattr(shell, "transform_cell") else source
    linecache.cache[filename] = (len(transformed), None, transformed.splitlines(True), filename)
    tree = ast.parse(transformed, filename, "exec")
    last_expr = None
    if tree.body and isinstance(last := tree.body[-1], ast.Expr):
        tree.body.pop()
        last_expr = ast.Expression(last.value)
    body = compile(tree, filename, "exec")
    expr = compile(last_expr, filename, "eval") if last_expr is not None else None
    ns = shell.user_ns
    result: list[Any] = [None]

    with tracing(rate, max_frames, track) as session:
        try:
            exec(body, ns)
            if expr is not None:
                result[0] = eval(expr, ns)
        except Exception:
            shell.showtraceback()
    assert session.snapshot is not None
    return result[0], session.snapshot


def _print_report(snap: Snapshot, filename: str, top: int) -> None:
    print(
        f"memprof: ~{format_bytes(snap.total_size())} allocated, estimated from "
        f"{snap.n_samples} samples (one per {format_bytes(1 / snap.sampling_rate)} on average)"
    )
    cell = _cell_statistics(snap, filename)
    if cell:
        print("Top lines of the cell (the allocations they caused, callees included):")
        for stat in cell[:top]:
            line = stat.traceback[0].lineno
            source = linecache.getline(filename, line).strip()
            print(
                f"  line {line:>4}: {format_bytes(stat.size):>10} "
                f"(95% CI {format_bytes(stat.size_low)} .. {format_bytes(stat.size_high)}), "
                f"{stat.n_samples} samples | {source}"
            )
    sites = snap.statistics("lineno")
    if sites:
        print("Top allocation sites (innermost line):")
        for stat in sites[:top]:
            frame = stat.traceback[-1]
            where = "cell" if frame.filename == filename else frame.filename
            print(
                f"  {where}:{frame.lineno} in {snap.function_name(frame)}: "
                f"{format_bytes(stat.size)} ({stat.n_samples} samples)"
            )
    if not snap.samples:
        print("(no sample: the code allocated less than the sampling period; use -r to raise it)")


def _parse_rate(text: str) -> float:
    if "/" in text:
        num, den = text.split("/", 1)
        return float(num) / float(den)
    return float(text)


_MAGIC_VALUES: Final = {
    "-n": "top",
    "--top": "top",
    "-r": "rate",
    "--rate": "rate",
    "-f": "frames",
    "--frames": "frames",
    "--speedscope": "speedscope",
    "--collapsed": "collapsed",
}
_MAGIC_FLAGS: Final = {"--track": "track"}
_MAGIC_USAGE: Final = (
    "usage: %memprof [-n TOP] [-r RATE] [-f FRAMES] [--track] [--speedscope PATH] "
    "[--collapsed PATH] [--] statement\n"
    "   or: %%memprof [options] on the first line of a cell"
)


def _parse_magic_line(line: str) -> tuple[dict[str, str], str]:
    """Leading options of a magic line, and the rest (the statement)."""
    opts: dict[str, str] = {}
    rest = line.strip()
    while rest.startswith("-"):
        token, _, tail = rest.partition(" ")
        if token == "--":
            return opts, tail.strip()
        name, eq, value = token.partition("=")
        if name in _MAGIC_FLAGS and not eq:
            opts[_MAGIC_FLAGS[name]] = "1"
        elif name in _MAGIC_VALUES:
            if not eq:
                value, _, tail = tail.strip().partition(" ")
            if not value:
                raise ValueError(f"option {name} needs a value")
            opts[_MAGIC_VALUES[name]] = value
        else:
            raise ValueError(
                f"unknown option {name} (write -- before a statement that starts with -)"
            )
        rest = tail.strip()
    return opts, rest


class MagicOptions(NamedTuple):
    """The options of ``%memprof`` -- in the kernel's magic and the REPL's
    command alike (:func:`parse_magic_options`)."""

    statement: str
    top: int
    rate: float  # per byte
    frames: int
    track: bool
    speedscope: str | None
    collapsed: str | None

    def write_exports(self, snap: Snapshot) -> None:
        """Write the ``--speedscope`` and ``--collapsed`` files asked for."""
        if self.speedscope is not None:
            snap.to_speedscope(self.speedscope)
            print(f"speedscope profile written to {self.speedscope}")
        if self.collapsed is not None:
            snap.to_collapsed(self.collapsed)
            print(f"collapsed stacks written to {self.collapsed}")


def parse_magic_options(line: str) -> MagicOptions:
    """``[-n TOP] [-r RATE] [-f FRAMES] [--track] [--speedscope PATH]
    [--collapsed PATH] [--] statement``; ``ValueError`` says what is wrong.
    The rate defaults to :data:`MAGIC_DEFAULT_RATE`, or the engine's if higher.

    >>> parse_magic_options("-n 3 -r 1/1000 x = [0] * 10").rate
    0.001
    """
    opts, statement = _parse_magic_line(line)

    def read(name: str, option: str, convert: Callable[[str], Any]) -> Any:
        try:
            return convert(opts[name])
        except (ValueError, ZeroDivisionError):
            raise ValueError(f"{option}: cannot read {opts[name]!r}") from None

    return MagicOptions(
        statement=statement,
        top=read("top", "-n", int) if "top" in opts else 10,
        rate=read("rate", "-r", _parse_rate)
        if "rate" in opts
        else max(MAGIC_DEFAULT_RATE, _sampler.sampling_rate()),
        frames=read("frames", "-f", int) if "frames" in opts else DEFAULT_MAX_FRAMES,
        track="track" in opts,
        speedscope=opts.get("speedscope"),
        collapsed=opts.get("collapsed"),
    )


def memprof_magic(shell: Any, line: str, cell: str | None = None) -> Any:
    """``%memprof`` / ``%%memprof`` in ``shell`` (see :func:`load_ipython_extension`)."""
    global _last_magic_snapshot
    try:
        options = parse_magic_options(line)
    except ValueError as e:
        print(f"%memprof: {e}\n{_MAGIC_USAGE}")
        return None
    source = cell if cell is not None else options.statement
    if not source.strip():
        print(_MAGIC_USAGE)
        return None
    if is_tracing():
        print("%memprof: the profiler is already running (memprof.stop() it first)")
        return None
    value, snap = _run_profiled(
        shell, source, rate=options.rate, max_frames=options.frames, track=options.track
    )
    _last_magic_snapshot = snap
    _print_report(snap, f"{_CELL_PREFIX}{_magic_counter}>", options.top)
    options.write_exports(snap)
    return value


def load_ipython_extension(ipython: Any) -> None:
    """Register ``%memprof`` (line) and ``%%memprof`` (cell) in ``ipython``.

    ``%load_ext memprof_limits.memprof``, then::

        %%memprof [-n TOP] [-r RATE] [-f FRAMES] [--track] [--speedscope PATH]
                  [--collapsed PATH]
        <cell>

    runs the cell under the profiler (at ``RATE``, such as ``1/8000``;
    default 1/8000 per byte, or the engine's rate if higher) and prints the
    lines of the cell that allocated most (with what the functions they call
    allocated), then the top allocation sites.  ``%memprof statement`` does
    the same for one statement and returns its value.  The snapshot is kept
    in :func:`last_magic_snapshot`.  (IPython is not imported here: the
    magic is registered through the shell it is given.)

    >>> class FakeShell:
    ...     def register_magic_function(self, fn, magic_kind, magic_name):
    ...         print(magic_kind, magic_name)
    >>> load_ipython_extension(FakeShell())
    line_cell memprof
    """

    def magic(line: str, cell: str | None = None) -> Any:
        return memprof_magic(ipython, line, cell)

    magic.__doc__ = load_ipython_extension.__doc__
    ipython.register_magic_function(magic, magic_kind="line_cell", magic_name="memprof")
