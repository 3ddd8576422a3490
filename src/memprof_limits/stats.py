"""Formulas of the statistical analysis of memprof-limits, in bytes.

This module gives the numbers behind the guarantees of ``docs/statistical.md``. It is
pure Python (standard library only) and does not need the native sampler.

The model
---------
The sampler splits the stream of bytes that a thread requests from the Python allocators
into gaps with a geometric distribution of mean ``1 / rate`` bytes, and takes a *sample* at
the end of each gap. Equivalently, every byte is sampled independently with probability
``1 - exp(-rate)`` (≈ ``rate``). The default ``rate`` is ``DEFAULT_RATE`` = 1/80 000 per
byte, which is OCaml memprof-limits' 1e-4 per 8-byte word.

Two things follow, and this module has the formulas for both.

* **Latency of a sampled check** (global memory limit; re-delivery of a sticky interrupt).
  The check runs at samples only. Gaps are memoryless, so once the limit has been crossed
  the task still runs for an Exp(rate)-distributed number of its own bytes before its next
  sample: ``P[not interrupted after n more bytes] = exp(-n * rate)``
  (:func:`p_not_interrupted`, :func:`bytes_until_probability`).
* **Sampled counting** (OCaml memprof-limits' allocation limits; any counter that only
  sees samples). A limit of ``l`` units is reached after ``k = max(1, ceil(l * rate))``
  samples, and the number of samples in ``n`` units is ``Binomial(n, rate)``, so
  ``P[interrupted within n units] = P[Bin(n, rate) >= k]`` (:func:`binomial_tail`,
  :func:`p_sampled_limit_reached`, :func:`safe_allocation`, :func:`min_sampling_rate`).

**Our allocation limits are not sampled.** The native sampler counts every byte requested
through PyMem/PyObject exactly, and its countdown also stops at the exact end of the
allocation budget. For ``limit_allocations(task, limit=l)`` the safe allocation is ``l``
itself, with probability 1. The binomial functions describe the OCaml library (and other
sampled mechanisms); they reproduce its published tables, and they say what exact counting
buys.

The binomial functions have no unit: pass a limit in words and a per-word rate, and you
get words back (this is how the OCaml tables are reproduced). Functions that take bytes
say so in their parameter names.
"""

from __future__ import annotations

import decimal
import math
import numbers
import statistics as _statistics
from collections.abc import Callable, Sequence
from fractions import Fraction
from functools import lru_cache
from typing import overload

__all__ = [
    "DEFAULT_RATE",
    "OCAML_RATE_PER_WORD",
    "WORD_BYTES",
    "binomial_tail",
    "bytes_until_probability",
    "log_binomial_tail",
    "min_sampling_rate",
    "p_not_interrupted",
    "p_sampled_limit_reached",
    "safe_allocation",
    "samples_to_limit",
]

WORD_BYTES: int = 8
"""Bytes in an OCaml word on 64-bit platforms, the unit of the OCaml figures."""

OCAML_RATE_PER_WORD: float = 1e-4
"""OCaml memprof-limits' sampling rate, in samples per word."""

DEFAULT_RATE: float = 1 / 80_000
"""Default sampling rate, in samples per byte: 1e-4 per 8-byte word, a sample every 80 kB."""

_LN_2PI = math.log(2 * math.pi)
_EPS = 1e-17  # relative size of the neglected tail of a sum; below the float resolution


# -- input validation -------------------------------------------------------------------------


def _real(name: str, value: object, ok: Callable[[float], bool], what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be {what}, got {type(value).__name__} {value!r}")
    if not ok(float(value)):  # NaN fails every comparison
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return float(value)


def _rate(rate: object) -> float:
    return _real("rate", rate, lambda x: 0 < x <= 1, "a rate in samples per unit, 0 < rate <= 1")


def _target(target: object) -> float:
    return _real("target", target, lambda x: 0 < x < 1, "a probability, 0 < target < 1")


def _amount(name: str, value: object) -> float:
    return _real(name, value, lambda x: x >= 0, "a number of bytes (or units) >= 0")


def _count(name: str, value: object, *, nonneg: bool = True) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    n = int(value)
    if nonneg and n < 0:
        raise ValueError(f"{name} must be an int >= 0, got {n}")
    return n


# -- latency of a sampled check ---------------------------------------------------------------


def _p_not_interrupted(n: object, r: float) -> float:
    return math.exp(-_amount("n_bytes", n) * r)


@overload
def p_not_interrupted(n_bytes: float, rate: float = DEFAULT_RATE) -> float: ...
@overload
def p_not_interrupted(n_bytes: Sequence[float], rate: float = DEFAULT_RATE) -> list[float]: ...
def p_not_interrupted(
    n_bytes: float | Sequence[float], rate: float = DEFAULT_RATE
) -> float | list[float]:
    """Probability that a task is still not interrupted ``n_bytes`` after a sampled check fails.

    This is ``exp(-n_bytes * rate)``: the task is interrupted at its first sample after the
    global memory limit has been exceeded, and the gap to that sample is Exp(rate). It is
    exact for this library's sampler and an upper bound for OCaml's (``(1-p)**n``).
    ``n_bytes`` may be a number or a sequence of numbers (then a list is returned).

    >>> round(1 - p_not_interrupted(80 * 1024), 3)  # interrupted within 80 KiB
    0.641
    >>> [f"{p:.1e}" for p in p_not_interrupted([1.62 * 2**20, 2.5 * 2**20, 8.8 * 2**20])]
    ['6.0e-10', '5.9e-15', '8.1e-51']
    """
    r = _rate(rate)
    if isinstance(n_bytes, (str, bytes)) or not isinstance(n_bytes, (numbers.Real, Sequence)):
        raise TypeError(
            f"n_bytes must be a number of bytes >= 0 or a sequence of them, "
            f"got {type(n_bytes).__name__}"
        )
    if isinstance(n_bytes, Sequence):
        return [_p_not_interrupted(n, r) for n in n_bytes]
    return _p_not_interrupted(n_bytes, r)


def bytes_until_probability(target: float, rate: float = DEFAULT_RATE) -> float:
    """Bytes after which the probability of not being interrupted falls under ``target``.

    The solution ``-ln(target) / rate`` of ``exp(-n * rate) = target``: after more bytes
    than this, :func:`p_not_interrupted` is below ``target``.

    >>> round(bytes_until_probability(1e-9) / 2**20, 2)  # MiB
    1.58
    """
    return -math.log(_target(target)) / _rate(rate)


# -- binomial model of sampled counting -------------------------------------------------------


def _stirlerr_table() -> list[float]:
    with decimal.localcontext() as ctx:
        ctx.prec = 40
        half_ln_2pi = decimal.Decimal("0.918938533204672741780329736405617639861")
        return [
            float(
                decimal.Decimal(math.factorial(n)).ln()
                - (n + decimal.Decimal("0.5")) * decimal.Decimal(n).ln()
                + n
                - half_ln_2pi
            )
            for n in range(1, 16)
        ]


_STIRLERR = _stirlerr_table()  # for n = 1..15, where the series below does not converge


def _stirlerr(n: int) -> float:
    """log(n!) - log(sqrt(2 pi n) (n/e)**n) with full relative accuracy (Loader 2000)."""
    if n <= 15:
        return _STIRLERR[n - 1]
    nn = float(n) * n
    return (1 / 12 - (1 / 360 - (1 / 1260 - (1 / 1680 - 1 / 1188 / nn) / nn) / nn) / nn) / n


def _bd0(x: float, m: float) -> float:
    """x log(x/m) + m - x without cancellation (Loader 2000)."""
    if abs(x - m) < 0.1 * (x + m):
        v = (x - m) / (x + m)
        s = (x - m) * v
        ej = 2.0 * x * v
        v *= v
        j = 1
        while True:
            ej *= v
            s1 = s + ej / (2 * j + 1)
            if s1 == s:
                return s1
            s = s1
            j += 1
    return x * math.log(x / m) + m - x


def _log_pmf(x: int, n: int, p: float, q: float) -> float:
    """log P[Bin(n, p) = x] for 0 <= x <= n and 0 < p < 1, q = 1 - p (saddle point form)."""
    if x == 0:
        return n * math.log1p(-p)
    if x == n:
        return n * math.log(p)
    lc = _stirlerr(n) - _stirlerr(x) - _stirlerr(n - x) - _bd0(x, n * p) - _bd0(n - x, n * q)
    return lc - 0.5 * (_LN_2PI + math.log(x) + math.log1p(-x / n))


def _log_sum_away_from_mode(x: int, n: int, p: float, q: float, step: int) -> float:
    """log of sum of P[Bin(n,p) = j] for j = x, x+step, ... (step = +-1), on the far side of
    the mode so that the terms decrease; the neglected remainder is bounded geometrically."""
    ratio_pq = p / q if step > 0 else q / p
    total = term = 1.0  # relative to P[X = x]
    j = x
    while (j < n) if step > 0 else (j > 0):
        r = ((n - j) / (j + 1) if step > 0 else j / (n - j + 1)) * ratio_pq
        term *= r
        total += term
        j += step
        if r < 1.0 and term * r < _EPS * total * (1.0 - r):  # remainder <= term r/(1-r)
            break
    return _log_pmf(x, n, p, q) + math.log(total)


def log_binomial_tail(n: int, p: float, k: int) -> float:
    """Natural log of ``P[Bin(n, p) >= k]``; ``-inf`` when the probability is 0.

    Use it where :func:`binomial_tail` would underflow (probabilities under 1e-308).

    >>> round(log_binomial_tail(10**6, 1e-4, 1000) / math.log(10))  # about 1e-611
    -611
    """
    n = _count("n", n)
    k = _count("k", k, nonneg=False)
    p = _real("p", p, lambda x: 0 <= x <= 1, "a probability, 0 <= p <= 1")
    if k <= 0:
        return 0.0
    if k > n or p == 0.0:
        return -math.inf
    if p == 1.0:
        return 0.0
    q = 1.0 - p
    if k > n * p:  # upper tail: sum P[X = j] for j >= k directly
        return _log_sum_away_from_mode(k, n, p, q, +1)
    # k is at or below the mean: the tail is >= about 1/2, take 1 - P[X <= k-1]
    return math.log1p(-math.exp(_log_sum_away_from_mode(k - 1, n, p, q, -1)))


def binomial_tail(n: int, p: float, k: int) -> float:
    """``P[Bin(n, p) >= k]``: probability of at least ``k`` samples among ``n`` units.

    It is summed in log space from the saddle-point form of the binomial probabilities
    (Loader's algorithm, the one of R's ``dbinom``), so it keeps about 12 significant digits
    for tiny probabilities (1e-50, 1e-300) and for large ``n`` (1e10 and beyond). The cost
    grows with the standard deviation ``sqrt(n p (1-p))`` near the mean, and is small in
    the tails. The result is ``I_p(k, n-k+1)`` (regularised incomplete beta function).

    >>> round(binomial_tail(10, 0.5, 8) * 1024, 12)  # (45 + 10 + 1) / 1024
    56.0
    >>> f"{binomial_tail(408_067, 1e-4, 100):.2e}"  # OCaml: l = 10**6 words, t = 4e-15
    '4.00e-15'
    """
    return math.exp(log_binomial_tail(n, p, k))


# -- sampled allocation limits (OCaml memprof-limits) -----------------------------------------


def samples_to_limit(limit_bytes: float, rate: float = DEFAULT_RATE) -> int:
    """Number of samples ``k`` that a *sampled* counter needs to reach ``limit_bytes``.

    As in OCaml memprof-limits, each sample counts for ``round(1/rate)`` units and the
    limit is reached once the count is >= the limit, after at least one sample:
    ``k = max(1, ceil(limit / round(1/rate)))`` (exact rational arithmetic).

    >>> samples_to_limit(10**6, rate=1e-4), samples_to_limit(8 * 10**6)
    (100, 100)
    """
    limit = _amount("limit_bytes", limit_bytes)
    if math.isinf(limit):
        raise ValueError("limit_bytes must be finite")
    weight = round(1 / _rate(rate))
    return max(1, math.ceil(Fraction(limit) / weight))


def p_sampled_limit_reached(n_bytes: int, limit_bytes: float, rate: float = DEFAULT_RATE) -> float:
    """Probability that a *sampled* allocation limit has been reached within ``n_bytes``.

    ``P[Bin(n_bytes, rate) >= samples_to_limit(limit_bytes, rate)]``. This is the OCaml
    library's model; this library's allocation limits are exact (reached at ``limit_bytes``).

    >>> round(p_sampled_limit_reached(10**6, 10**6, rate=1e-4), 3)  # at the limit: about 1/2
    0.513
    """
    k = samples_to_limit(limit_bytes, rate)
    return binomial_tail(_count("n_bytes", n_bytes), _rate(rate), k)


def safe_allocation(limit_bytes: float, target: float, rate: float = DEFAULT_RATE) -> int:
    """Safe allocation ``N`` of a *sampled* limit: the largest ``N`` such that
    ``P[interrupted within N] <= target``.

    The "target safe allocation" of OCaml memprof-limits' statistical analysis: a task that
    allocates at most ``N`` under ``limit_bytes`` is wrongly interrupted with probability at
    most ``target``; ``(limit - N) / N`` measures the inaccuracy of the sampled limit. For
    this library's exact allocation limits the safe allocation is the limit itself.

    >>> safe_allocation(10**6, 4e-15, rate=1e-4)  # OCaml table (words): about 408 000
    408067
    """
    k = samples_to_limit(limit_bytes, rate)
    p = _rate(rate)
    t = _target(target)

    def safe(n: int) -> bool:
        return binomial_tail(n, p, k) <= t

    lo = k - 1  # fewer than k units cannot hold k samples: probability 0
    hi = max(k, math.ceil(k / p))
    while safe(hi):
        lo, hi = hi, 2 * hi
    while hi - lo > 1:  # invariant: safe(lo) and not safe(hi); the tail grows with n
        mid = (lo + hi) // 2
        if safe(mid):
            lo = mid
        else:
            hi = mid
    return lo


def min_sampling_rate(safe_bytes: int, target: float, limit_ratio: float = 10.0) -> float:
    """Smallest sampling rate at which a sampled limit of ``limit_ratio * safe_bytes`` has a
    safe allocation of at least ``safe_bytes`` for ``target``.

    As in OCaml memprof-limits' analysis: the rate is ``k / (limit_ratio * N)`` for the
    smallest ``k`` with ``P[Bin(N, k / (limit_ratio * N)) >= k] <= target``. For large ``N``
    and the default ratio 10, ``k`` is 14, 22 and 80 for targets 1e-9, 1e-14 and 1e-50.

    >>> round(min_sampling_rate(10**9, 1e-14) * 10 * 10**9)  # k
    22
    """
    n = _count("safe_bytes", safe_bytes)
    if n == 0:
        raise ValueError("safe_bytes must be an int >= 1, got 0")
    t = _target(target)
    ratio = _real("limit_ratio", limit_ratio, lambda x: 1 < x < math.inf, "a finite ratio > 1")
    k = 1
    while binomial_tail(n, min(1.0, k / (ratio * n)), k) > t:
        k += 1  # terminates: at k = n + 1 the tail is 0
    return min(1.0, k / (ratio * n))


# --------------------------------------------------------------------------
# The profiler's estimators (memprof_limits.memprof: Snapshot, poisson_interval).


def _inclusion_probability(size_bytes: int, rate: float) -> float:
    """P[an allocation of size_bytes gets at least one sample]."""
    if rate >= 1.0:
        return 1.0
    return -math.expm1(max(size_bytes, 1) * math.log1p(-rate))


def _gamma_p(a: float, x: float) -> float:
    """Regularized lower incomplete gamma function P(a, x), for a > 0."""
    if x <= 0.0:
        return 0.0
    log_prefix = -x + a * math.log(x) - math.lgamma(a)
    if x < a + 1.0:  # series
        term = total = 1.0 / a
        n = a
        for _ in range(100_000):
            n += 1.0
            term *= x / n
            total += term
            if term < total * 1e-16:
                break
        return min(1.0, total * math.exp(log_prefix))
    tiny = 1e-300  # continued fraction for Q(a, x), modified Lentz
    b = x + 1.0 - a
    c = 1.0 / tiny
    d = 1.0 / b
    h = d
    for i in range(1, 100_000):
        an = -i * (i - a)
        b += 2.0
        d = an * d + b
        d = tiny if abs(d) < tiny else d
        c = b + an / c
        c = tiny if abs(c) < tiny else c
        d = 1.0 / d
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-16:
            break
    return max(0.0, 1.0 - math.exp(log_prefix) * h)


def _gamma_quantile(a: float, p: float) -> float:
    """x such that P(a, x) = p (bisection)."""
    lo, hi = 0.0, a + 10.0 * math.sqrt(a) + 50.0
    while _gamma_p(a, hi) < p:
        hi *= 2.0
    for _ in range(200):
        mid = (lo + hi) / 2.0
        if _gamma_p(a, mid) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * hi:
            break
    return (lo + hi) / 2.0


@lru_cache(maxsize=4096)
def poisson_interval(k: int, level: float = 0.95) -> tuple[float, float]:
    """Exact (Garwood) confidence interval for the mean of a Poisson variable
    observed at ``k``: ``(Gamma^-1(a/2; k), Gamma^-1(1-a/2; k+1))``.

    Above 1000 the Wilson-Hilferty approximation is used (relative error
    below 1e-4).

    >>> lo, hi = poisson_interval(0)
    >>> lo, round(hi, 3)
    (0.0, 3.689)
    """
    if k < 0 or not 0.0 < level < 1.0:
        raise ValueError(f"poisson_interval: need k >= 0 and 0 < level < 1, got {k}, {level}")
    alpha = 1.0 - level
    if k > 1000:
        z = _statistics.NormalDist().inv_cdf(1.0 - alpha / 2.0)

        def wh(n: float, sign: float) -> float:
            return n * (1.0 - 1.0 / (9.0 * n) + sign * z / (3.0 * math.sqrt(n))) ** 3

        return (wh(k, -1.0), wh(k + 1.0, +1.0))
    low = 0.0 if k == 0 else _gamma_quantile(float(k), alpha / 2.0)
    return (low, _gamma_quantile(float(k + 1), 1.0 - alpha / 2.0))
