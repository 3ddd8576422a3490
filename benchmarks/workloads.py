"""Allocation-heavy pure-Python workloads for the overhead benchmarks.

Each workload is a function of no arguments that takes roughly 30-150 ms on
CPython 3.11-3.13 on the reference machine (2 vCPU VM) and returns a small
value derived from its work (so that nothing is optimised away and results
can be compared across modes).  They are deterministic: the same workload
allocates the same bytes on every run (modulo CPython's free lists).

The first five are the prototype's (docs: cpython-internals notes, section 4);
the others are written here in the style of pyperformance benchmarks (nbody,
float, richards, unpack_sequence, generators, pidigits...), sized down.

``WORKLOADS`` maps a name to the function, in a stable order.  Importable
(``from workloads import WORKLOADS``) by the other benchmarks.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator

__all__ = ["WORKLOADS"]


# ---------------------------------------------------------------------------
# The prototype's five workloads.


def list_of_tuples() -> int:
    """Lists of 3-tuples holding two ints and a str (the classic small-object case)."""
    n = 0
    for _ in range(2):
        data = [(i, i * 2, str(i)) for i in range(100_000)]
        n += len(data)
    return n


def dict_churn() -> int:
    """Insert 50k keys built with %-formatting, each mapping to a 1-list; delete half."""
    total = 0
    for _ in range(3):
        d: dict[str, list[int]] = {}
        for i in range(50_000):
            d["k%d" % i] = [i]  # noqa: UP031 - %-formatting on purpose
        for i in range(0, 50_000, 2):
            del d["k%d" % i]  # noqa: UP031
        total += len(d)
    return total


class _Node:
    __slots__ = ("left", "right", "value")

    def __init__(self, left: _Node | None, right: _Node | None, value: int) -> None:
        self.left = left
        self.right = right
        self.value = value


def _make_tree(depth: int) -> _Node:
    if depth == 0:
        return _Node(None, None, 0)
    return _Node(_make_tree(depth - 1), _make_tree(depth - 1), depth)


def _check_tree(node: _Node) -> int:
    if node.left is None:
        return 1
    assert node.right is not None
    return 1 + _check_tree(node.left) + _check_tree(node.right)


def tree_build() -> int:
    """Recursive binary trees of ``__slots__`` nodes (binary-trees style), built and walked."""
    total = 0
    for _ in range(3):
        total += _check_tree(_make_tree(14))
    return total


_DOC = [
    {
        "id": i,
        "name": f"user{i}",
        "email": f"user{i}@example.com",
        "score": i * 0.5,
        "tags": ["a", "b", str(i % 7)],
        "active": i % 3 == 0,
        "address": {"street": f"{i} Main St", "zip": "%05d" % i},  # noqa: UP031
    }
    for i in range(2000)
]


def json_roundtrip() -> int:
    """``json.loads(json.dumps(doc))`` of 2000 nested records (C encoder and decoder)."""
    n = 0
    for _ in range(4):
        text = json.dumps(_DOC)
        n += len(json.loads(text))
    return n


def fstrings_join() -> int:
    """String building: f-strings, ``.upper()`` and ``join``."""
    parts = []
    for i in range(120_000):
        s = f"item-{i}:{i * 3}:{i % 17}"
        parts.append(s.upper())
    return len("|".join(parts))


# ---------------------------------------------------------------------------
# pyperformance-style workloads, written locally and sized down.

_SOLAR_MASS = 4 * math.pi * math.pi
_DAYS_PER_YEAR = 365.24


def _bodies() -> list[tuple[list[float], list[float], float]]:
    return [
        ([0.0, 0.0, 0.0], [0.0, 0.0, 0.0], _SOLAR_MASS),
        (
            [4.84143144246472090e00, -1.16032004402742839e00, -1.03622044471123109e-01],
            [
                1.66007664274403694e-03 * _DAYS_PER_YEAR,
                7.69901118419740425e-03 * _DAYS_PER_YEAR,
                -6.90460016972063023e-05 * _DAYS_PER_YEAR,
            ],
            9.54791938424326609e-04 * _SOLAR_MASS,
        ),
        (
            [8.34336671824457987e00, 4.12479856412430479e00, -4.03523417114321381e-01],
            [
                -2.76742510726862411e-03 * _DAYS_PER_YEAR,
                4.99852801234917238e-03 * _DAYS_PER_YEAR,
                2.30417297573763929e-05 * _DAYS_PER_YEAR,
            ],
            2.85885980666130812e-04 * _SOLAR_MASS,
        ),
        (
            [1.28943695621391310e01, -1.51111514016986312e01, -2.23307578892655734e-01],
            [
                2.96460137564761618e-03 * _DAYS_PER_YEAR,
                2.37847173959480950e-03 * _DAYS_PER_YEAR,
                -2.96589568540237556e-05 * _DAYS_PER_YEAR,
            ],
            4.36624404335156298e-05 * _SOLAR_MASS,
        ),
        (
            [1.53796971148509165e01, -2.59193146099879641e01, 1.79258772950371181e-01],
            [
                2.68067772490389322e-03 * _DAYS_PER_YEAR,
                1.62824170038242295e-03 * _DAYS_PER_YEAR,
                -9.51592254519715870e-05 * _DAYS_PER_YEAR,
            ],
            5.15138902046611451e-05 * _SOLAR_MASS,
        ),
    ]


def nbody() -> float:
    """The n-body float loop (pyperformance ``nbody``): floats come from the free list,
    so this is the low-allocation control."""
    bodies = _bodies()
    pairs = [(bodies[i], bodies[j]) for i in range(len(bodies)) for j in range(i + 1, len(bodies))]
    dt = 0.01
    for _ in range(8_000):
        for ([x1, y1, z1], v1, m1), ([x2, y2, z2], v2, m2) in pairs:
            dx, dy, dz = x1 - x2, y1 - y2, z1 - z2
            mag = dt * ((dx * dx + dy * dy + dz * dz) ** -1.5)
            b1m, b2m = m1 * mag, m2 * mag
            v1[0] -= dx * b2m
            v1[1] -= dy * b2m
            v1[2] -= dz * b2m
            v2[0] += dx * b1m
            v2[1] += dy * b1m
            v2[2] += dz * b1m
        for r, [vx, vy, vz], _m in bodies:
            r[0] += dt * vx
            r[1] += dt * vy
            r[2] += dt * vz
    return bodies[0][0][0]


class _Point:
    # No __slots__: each instance gets its own attribute dict, as in pyperformance ``float``.
    def __init__(self, i: float) -> None:
        self.x = x = math.sin(i)
        self.y = math.cos(i) * 3
        self.z = (x * x) / 2

    def normalize(self) -> None:
        norm = math.sqrt(self.x * self.x + self.y * self.y + self.z * self.z)
        self.x /= norm
        self.y /= norm
        self.z /= norm

    def maximize(self, other: _Point) -> _Point:
        self.x = max(self.x, other.x)
        self.y = max(self.y, other.y)
        self.z = max(self.z, other.z)
        return self


def float_points() -> float:
    """Create, normalise and fold 60k point objects (pyperformance ``float``)."""
    points = [_Point(i) for i in range(60_000)]
    for p in points:
        p.normalize()
    acc = points[0]
    for p in points[1:]:
        acc = acc.maximize(p)
    return acc.x + acc.y + acc.z


# A richards-like scheduler: tasks exchange packets through queues; objects,
# method calls and attribute traffic, with a steady stream of new packets.


class _Packet:
    __slots__ = ("data", "kind", "link", "owner")

    def __init__(self, link: _Packet | None, owner: int, kind: int) -> None:
        self.link = link
        self.owner = owner
        self.kind = kind
        self.data = [0, 0, 0, 0]

    def append_to(self, queue: _Packet | None) -> _Packet:
        self.link = None
        if queue is None:
            return self
        p = queue
        while p.link is not None:
            p = p.link
        p.link = self
        return queue


class _Task:
    def __init__(self, ident: int, priority: int, sched: _Scheduler) -> None:
        self.ident = ident
        self.priority = priority
        self.sched = sched
        self.queue: _Packet | None = None
        self.count = 0

    def receive(self, packet: _Packet) -> None:
        self.queue = packet.append_to(self.queue)

    def step(self) -> None:
        packet = self.queue
        if packet is None:
            return
        self.queue = packet.link
        self.count += 1
        packet.data[self.count % 4] += self.ident
        if packet.kind == 0:
            if self.count % 3 == 0:
                # A "device" packet spawns a fresh work packet (allocation).
                self.sched.send(_Packet(None, self.ident, 1), (self.ident + 1) % self.sched.ntasks)
        elif self.count % 2 == 0:
            return  # a work packet is consumed
        self.sched.send(packet, (self.ident + packet.kind + 1) % self.sched.ntasks)


class _Scheduler:
    def __init__(self, ntasks: int) -> None:
        self.ntasks = ntasks
        self.tasks = [_Task(i, i % 4, self) for i in range(ntasks)]
        self.sent = 0

    def send(self, packet: _Packet, dest: int) -> None:
        self.sent += 1
        if self.sent % 50 == 0:
            packet = _Packet(None, dest, packet.kind)  # recycle: drop the old packet
        self.tasks[dest].receive(packet)

    def run(self, steps: int) -> int:
        for _ in range(steps):
            for task in self.tasks:
                task.step()
        return self.sent


def richards_like() -> int:
    """A richards-style packet scheduler: objects, method calls, linked queues."""
    sched = _Scheduler(10)
    for i in range(40):
        sched.tasks[i % 10].receive(_Packet(None, i % 10, i % 2))
    return sched.run(6_000)


_TEXT = " ".join(
    f'def f{i}(x, y={i}):\n    return (x + y) * {i % 13} - "s{i}" if x >= y else [x, y]\n'
    for i in range(2500)
)


def tokenizer() -> int:
    """A hand-written (regex-free) tokenizer over generated Python-like source."""
    tokens: list[tuple[str, str]] = []
    text = _TEXT
    n = len(text)
    i = 0
    while i < n:
        c = text[i]
        if c.isspace():
            i += 1
        elif c.isalpha() or c == "_":
            j = i + 1
            while j < n and (text[j].isalnum() or text[j] == "_"):
                j += 1
            tokens.append(("name", text[i:j]))
            i = j
        elif c.isdigit():
            j = i + 1
            while j < n and text[j].isdigit():
                j += 1
            tokens.append(("number", text[i:j]))
            i = j
        elif c == '"':
            j = text.index('"', i + 1)
            tokens.append(("string", text[i : j + 1]))
            i = j + 1
        elif text.startswith(">=", i) or text.startswith("==", i):
            tokens.append(("op", text[i : i + 2]))
            i += 2
        else:
            tokens.append(("op", c))
            i += 1
    return len(tokens)


def unpack_sequence() -> int:
    """Tuple/list packing and unpacking (pyperformance ``unpack_sequence``), plus
    swaps through fresh tuples: mostly free-list traffic."""
    total = 0
    t = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10)
    lst = list(t)
    for i in range(200_000):
        a, b, c, d, e, f, g, h, k, m = t
        a, b, c, d, e, f, g, h, k, m = lst
        t = (b, a, d, c, f, e, h, g, m, k)
        total += a + m + i
    return total


def _gen_numbers(n: int) -> Iterator[int]:
    yield from range(n)


def _gen_pairs(it: Iterator[int]) -> Iterator[tuple[int, str]]:
    for x in it:
        yield x, str(x)


def generators() -> int:
    """A generator pipeline with a str per item (pyperformance ``generators`` style)."""
    total = 0
    for _ in range(2):
        for x, s in _gen_pairs(_gen_numbers(150_000)):
            total += x + len(s)
    return total


def pidigits() -> int:
    """Spigot algorithm for pi digits: big-int arithmetic (blocks > 512 B, RAW domain)."""
    digits = 0
    q, r, t, k, m, x = 1, 0, 1, 1, 3, 3
    result = []
    while digits < 900:
        if 4 * q + r - t < m * t:
            result.append(m)
            digits += 1
            q, r, m = 10 * q, 10 * (r - m * t), (10 * (3 * q + r)) // t - 10 * m
        else:
            q, r, t, k, m, x = (
                q * k,
                (2 * q + r) * x,
                t * x,
                k + 1,
                (q * (7 * k + 2) + r * x) // (t * x),
                x + 2,
            )
    return sum(result)


def dict_of_objects() -> int:
    """Objects with per-instance ``__dict__`` grouped in dicts of lists (ORM-like rows)."""

    class Row:
        def __init__(self, i: int) -> None:
            self.id = i
            self.name = "row%d" % i  # noqa: UP031
            self.group = i % 97
            self.values = [i, i + 1]

    groups: dict[int, list[Row]] = {}
    for i in range(60_000):
        row = Row(i)
        groups.setdefault(row.group, []).append(row)
    return sum(len(v) for v in groups.values())


WORKLOADS: dict[str, Callable[[], object]] = {
    "list_of_tuples": list_of_tuples,
    "dict_churn": dict_churn,
    "tree_build": tree_build,
    "json_roundtrip": json_roundtrip,
    "fstrings_join": fstrings_join,
    "nbody": nbody,
    "float_points": float_points,
    "richards_like": richards_like,
    "tokenizer": tokenizer,
    "unpack_sequence": unpack_sequence,
    "generators": generators,
    "pidigits": pidigits,
    "dict_of_objects": dict_of_objects,
}


if __name__ == "__main__":
    import gc
    import statistics
    import time

    for name, fn in WORKLOADS.items():
        times = []
        for _ in range(5):
            gc.collect()
            t0 = time.perf_counter()
            result = fn()
            times.append((time.perf_counter() - t0) * 1e3)
        print(f"{name:16s} {statistics.median(times):7.1f} ms  -> {result!r:.40}")
