"""Draw the graphs of docs/statistical.md into docs/img/ from memprof_limits.stats.

    pip install matplotlib   # not a dependency of the library
    python docs/plots/make_plots.py

The numbers come from memprof_limits.stats alone (no native sampler is needed); the
script puts the repository's src/ first on sys.path so that it draws the checked-out code.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))

try:
    import matplotlib
except ImportError:
    sys.exit(
        "docs/plots/make_plots.py needs matplotlib, which the library does not depend on: "
        "python3 -m pip install matplotlib"
    )

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402

from memprof_limits import stats  # noqa: E402

OUT = ROOT / "docs" / "img"
KiB, MiB = 1024, 1024 * 1024
TARGETS = [(1e-9, "t = 1e-9"), (4e-15, "t = 4e-15"), (1e-50, "t = 1e-50")]
COLORS = ["tab:blue", "tab:orange", "tab:green"]


def _human(x: float, _pos: object = None) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if x >= size:
            v = x / size
            return f"{v:.0f} {unit}" if v >= 10 or v == int(v) else f"{v:.1f} {unit}"
    return f"{x:.0f} B"


def latency() -> None:
    """P[not yet interrupted] against the bytes allocated since the global limit was crossed."""
    rates = (
        (stats.DEFAULT_RATE, "-", "default rate: a sample per 80 kB"),
        (
            stats.DEFAULT_RATE * 4,
            "--",
            "4 \N{MULTIPLICATION SIGN} the default rate (a finer profiler)",
        ),
    )
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.6), layout="constrained")
    # left: the first 400 KiB, linear scale
    xs = [i * 400 * KiB / 400 for i in range(401)]
    for rate, style, label in rates:
        ax1.plot([x / KiB for x in xs], stats.p_not_interrupted(xs, rate), style, label=label)
    p80 = stats.p_not_interrupted(80 * KiB)
    ax1.plot([80], [p80], "o", color="tab:red")
    ax1.annotate(
        f"80 KiB: {p80:.2f} (64 % interrupted)",
        (80, p80),
        textcoords="offset points",
        xytext=(8, 6),
        fontsize=9,
    )
    ax1.set_xlim(0, 400)
    ax1.set_ylim(0, 1.02)
    ax1.set_xlabel("bytes allocated since the limit was crossed (KiB)")
    ax1.set_ylabel("P[task not yet interrupted]")
    ax1.set_title("The first 400 KiB")
    ax1.legend(loc="upper right", fontsize=9)
    # right: the tail, log scale
    xs = [i * 10 * MiB / 400 for i in range(401)]
    for rate, style, label in rates:
        ax2.semilogy([x / MiB for x in xs], stats.p_not_interrupted(xs, rate), style, label=label)
    for n, text, dx in (
        (1.62 * MiB, "1.62 MiB: < 1e-9", 8),
        (2.5 * MiB, "2.5 MiB: < 1e-14", 8),
        (8.8 * MiB, "8.8 MiB: < 1e-50", -100),
    ):
        p = stats.p_not_interrupted(n)
        ax2.plot([n / MiB], [p], "o", color="tab:red")
        ax2.annotate(text, (n / MiB, p), textcoords="offset points", xytext=(dx, 6), fontsize=9)
    ax2.set_xlim(0, 10)
    ax2.set_ylim(1e-60, 2)
    ax2.set_yticks([10.0**-e for e in range(0, 61, 10)])
    ax2.set_xlabel("bytes allocated since the limit was crossed (MiB)")
    ax2.set_title("The tail: exp(\N{MINUS SIGN}n · rate), log scale")
    ax2.grid(True, which="major", alpha=0.4)
    ax1.grid(True, alpha=0.4)
    fig.suptitle("Global memory limit: probability that the task is not yet interrupted")
    fig.savefig(OUT / "latency.png", dpi=150)
    plt.close(fig)


def safe_allocation() -> None:
    """Safe allocation N and inaccuracy (l - N)/N of a sampled limit l, in bytes."""
    ks = sorted({max(1, round(10 ** (i / 8))) for i in range(0, 6 * 8 + 1)})  # 1 .. 10**6
    limits = [k / stats.DEFAULT_RATE for k in ks]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.6), layout="constrained")
    ax1.loglog(limits, limits, "k:", label="exact limit (this library): N = l")
    for (t, label), color in zip(TARGETS, COLORS, strict=True):
        ns = [stats.safe_allocation(limit, t) for limit in limits]
        # N = k - 1 (fewer units than samples needed) is a degenerate answer: leave it out
        pos = [(lim, n) for lim, n, k in zip(limits, ns, ks, strict=True) if n > k - 1]
        ax1.loglog(*zip(*pos, strict=True), color=color, label=f"sampled, {label}")
        ax2.loglog(
            *zip(*[(limit, (limit - n) / n) for limit, n in pos], strict=True),
            color=color,
            label=label,
        )
    for ax in (ax1, ax2):
        ax.xaxis.set_major_formatter(FuncFormatter(_human))
        ax.grid(True, which="major", alpha=0.4)
        ax.set_xlabel("limit l (bytes; sampled: k = l · rate samples, default rate)")
    ax1.yaxis.set_major_formatter(FuncFormatter(_human))
    ax1.set_ylabel("safe allocation N (bytes)")
    ax1.set_title("Safe allocation: P[interrupted before N] ≤ t")
    ax1.legend(loc="upper left", fontsize=9)
    ax2.axhline(1.0, color="grey", lw=0.8)
    ax2.axhline(0.1, color="grey", lw=0.8)
    ax2.set_ylabel("(l \N{MINUS SIGN} N) / N")
    ax2.set_title("Inaccuracy of a sampled limit (0 for exact limits)")
    ax2.legend(loc="upper right", fontsize=9)
    fig.savefig(OUT / "safe_allocation.png", dpi=150)
    plt.close(fig)


def sampled_cdf() -> None:
    """P[limit reached within n] against n / l: sampled limits (OCaml) and exact ones (here)."""
    fig, ax = plt.subplots(figsize=(7.5, 4.5), layout="constrained")
    for k, color in ((20, "tab:blue"), (1000, "tab:orange")):
        limit = k * 80_000
        fr = [i / 200 for i in range(401)]
        ps = [stats.p_sampled_limit_reached(round(f * limit), limit) for f in fr]
        ax.plot(fr, ps, color=color, label=f"sampled, l = {_human(limit)} (k = {k})")
    ax.plot([0, 1, 1, 2], [0, 0, 1, 1], "k:", label="exact (this library), any l")
    ax.set_xlabel("bytes allocated / limit")
    ax.set_ylabel("P[limit reached]")
    ax.set_title("Allocation limits: sampled counting against exact counting")
    ax.grid(True, alpha=0.4)
    ax.legend(loc="upper left")
    fig.savefig(OUT / "sampled_vs_exact.png", dpi=150)
    plt.close(fig)


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    latency()
    safe_allocation()
    sampled_cdf()
    print(f"wrote {sorted(p.name for p in OUT.glob('*.png'))} to {OUT}")


if __name__ == "__main__":
    main()
