"""memprof_limits.stats against the published figures of OCaml memprof-limits, exact
arithmetic and simulation. Pure Python: needs no native sampler."""

from __future__ import annotations

import decimal
import math
import random
from fractions import Fraction

import pytest

from memprof_limits import stats

KiB = 1024
MiB = 1024 * 1024
WORD = stats.WORD_BYTES
P_WORD = stats.OCAML_RATE_PER_WORD


# -- the default rate -----------------------------------------------------------------------


def test_default_rate_is_ocamls_rate_per_8_byte_word() -> None:
    assert stats.DEFAULT_RATE == pytest.approx(P_WORD / WORD, rel=1e-15)
    assert 1 / stats.DEFAULT_RATE == pytest.approx(80_000)


# -- latency after a global memory limit is exceeded ----------------------------------------


def test_more_than_64_percent_interrupted_within_80_KiB() -> None:
    p = 1 - stats.p_not_interrupted(80 * KiB)
    assert 0.64 < p < 0.65  # 1 - exp(-1.024) = 0.6408
    # the same in OCaml's units: 10 240 words at 1e-4 per word
    assert p == pytest.approx(1 - math.exp(-10_240 * P_WORD), rel=1e-12)


@pytest.mark.parametrize(
    ("mib", "bound", "published", "smaller_mib"),
    [
        (1.62, 1e-9, 6.0e-10, 1.5),
        (2.5, 1e-14, 5.9e-15, 2.3),
        (8.8, 1e-50, 8.1e-51, 8.0),
    ],
)
def test_probability_of_not_being_interrupted_after(
    mib: float, bound: float, published: float, smaller_mib: float
) -> None:
    p = stats.p_not_interrupted(mib * MiB)
    assert p < bound
    assert p == pytest.approx(published, rel=0.01)  # the recomputed values, 2 digits
    # The claims are tight: a slightly smaller allocation does not meet them. (This fails if
    # the rate were too high, e.g. 1e-4 per byte instead of per word.)
    assert stats.p_not_interrupted(smaller_mib * MiB) > bound
    # bytes_until_probability is the exact crossing point, just below the quoted sizes
    n = stats.bytes_until_probability(bound)
    assert 0.95 * mib * MiB < n <= mib * MiB
    assert stats.p_not_interrupted(n) == pytest.approx(bound, rel=1e-12)


def test_p_not_interrupted_is_vectorised() -> None:
    ns = [0, 1, 80 * KiB, 1.62 * MiB, 10**12]
    assert stats.p_not_interrupted(ns) == [stats.p_not_interrupted(n) for n in ns]
    assert stats.p_not_interrupted((0, 80_000)) == [1.0, math.exp(-1)]
    assert stats.p_not_interrupted([]) == []
    assert stats.p_not_interrupted(8 * 10**4, rate=1e-4 / WORD) == pytest.approx(math.exp(-1))
    assert stats.p_not_interrupted(math.inf) == 0.0


def _gap(rng: random.Random, mean: float) -> int:
    """One gap of the native sampler: floor(Exp(mean)) + 1 bytes (u in (0, 1])."""
    return int(-math.log(1.0 - rng.random()) * mean) + 1


def _tol(p: float, trials: int) -> float:
    # 5 standard deviations of an empirical frequency over `trials` independent trials. The
    # seed is fixed, so the test is deterministic; 5 sigma means that a correct formula would
    # fail for fewer than one seed in a million, while each test below also checks that the
    # nearest wrong answer is rejected by the same tolerance.
    return 5 * math.sqrt(p * (1 - p) / trials)


def test_p_not_interrupted_matches_a_simulated_sampler() -> None:
    rng = random.Random(20_240_601)
    trials = 100_000
    mean = 1 / stats.DEFAULT_RATE
    gaps = [_gap(rng, mean) for _ in range(trials)]
    for n in (8 * KiB, 80 * KiB, 200 * KiB):
        empirical = sum(g > n for g in gaps) / trials
        p = stats.p_not_interrupted(n)
        assert abs(empirical - p) < _tol(p, trials)
        wrong = stats.p_not_interrupted(n * WORD)  # a per-word rate taken per byte
        assert abs(empirical - wrong) > _tol(p, trials)


# -- binomial tail --------------------------------------------------------------------------


def _exact_tails(n: int, p: float) -> list[float]:
    """P[Bin(n, p) >= k] for k = 0..n+1 in exact rational arithmetic, correctly rounded."""
    f = Fraction(p)
    a, d = f.numerator, f.denominator
    terms = [math.comb(n, j) * a**j * (d - a) ** (n - j) for j in range(n + 1)]
    tails, acc = [0.0], 0
    for t in reversed(terms):
        acc += t
        tails.append(acc / d**n)
    return tails[::-1]


@pytest.mark.parametrize("n", [1, 2, 5, 10, 37, 100, 300])
@pytest.mark.parametrize("p", [1e-4, 0.01, 0.3, 0.5, 0.9, 0.999])
def test_binomial_tail_matches_exact_summation(n: int, p: float) -> None:
    exact_tails = _exact_tails(n, p)
    for k in range(-1, n + 2):
        exact = exact_tails[max(k, 0)]
        got = stats.binomial_tail(n, p, k)
        if exact == 0.0:  # k > n, or below the smallest float
            assert got == 0.0
        else:  # includes values down to 1e-290 (n = 300, p = 1e-4)
            assert got == pytest.approx(exact, rel=1e-12, abs=0), (n, p, k)


def _decimal_tail(n: int, p: float, k: int) -> decimal.Decimal:
    """P[Bin(n, p) >= k] (k above the mean) to 50 digits: exact C(n, k), then the terms."""
    with decimal.localcontext() as ctx:
        ctx.prec = 50
        pd = decimal.Decimal(p)
        qd = 1 - pd
        term = (decimal.Decimal(math.comb(n, k)).ln() + k * pd.ln() + (n - k) * qd.ln()).exp()
        total, j = term, k
        while j < n and term > total * decimal.Decimal("1e-40"):
            term = term * (n - j) / (j + 1) * pd / qd
            total += term
            j += 1
        return +total


@pytest.mark.parametrize(
    ("n", "p", "k"),
    [
        (408_067, 1e-4, 100),  # OCaml's safe allocation for l = 10**6 words, t = 4e-15
        (137_718, 1e-4, 100),  # same limit, t = 1e-50
        (10**10, 1e-8, 150),
        (10**8, 1e-4, 10_500),  # 5 standard deviations above the mean
        (10**6, 1e-4, 1000),  # about 1e-611: only the log is representable
    ],
)
def test_binomial_tail_matches_high_precision_for_large_n(n: int, p: float, k: int) -> None:
    ref = _decimal_tail(n, p, k)
    assert stats.log_binomial_tail(n, p, k) == pytest.approx(float(ref.ln()), rel=1e-13)
    if ref > decimal.Decimal("1e-300"):
        assert stats.binomial_tail(n, p, k) == pytest.approx(float(ref), rel=1e-12)


def test_binomial_tail_below_the_mean_is_one_minus_the_lower_tail() -> None:
    n, p = 10**8, 2.0**-13  # mean 12 207, sd 110; 1 - (1 - p) == p exactly
    for k in (11_000, 12_100, 12_207, 12_208):
        lower = stats.binomial_tail(n, 1 - p, n - k + 1)  # P[X <= k-1] = P[n-X >= n-k+1]
        assert stats.binomial_tail(n, p, k) == pytest.approx(1 - lower, rel=1e-12)
    assert stats.binomial_tail(n, p, 12_207) == pytest.approx(0.5, abs=0.01)


def test_binomial_tail_edge_cases() -> None:
    assert stats.binomial_tail(10, 0.3, 0) == 1.0
    assert stats.binomial_tail(10, 0.3, -5) == 1.0
    assert stats.binomial_tail(10, 0.3, 11) == 0.0
    assert stats.binomial_tail(0, 0.3, 0) == 1.0
    assert stats.binomial_tail(0, 0.3, 1) == 0.0
    assert stats.binomial_tail(10, 0.0, 1) == 0.0
    assert stats.binomial_tail(10, 1.0, 10) == 1.0
    assert stats.binomial_tail(10, 0.5, 10) == pytest.approx(2.0**-10, rel=1e-14)
    assert stats.log_binomial_tail(10, 0.5, 11) == -math.inf


def test_binomial_tail_matches_a_simulated_sampler() -> None:
    # Counting samples of the native sampler (geometric gaps) in n units: Bin(n, 1 - e^-rate).
    rng = random.Random(1_234_567)
    rate, n, trials = 1e-3, 20_000, 20_000
    counts = []
    for _ in range(trials):
        pos, c = _gap(rng, 1 / rate), 0
        while pos <= n:
            c += 1
            pos += _gap(rng, 1 / rate)
        counts.append(c)
    q = -math.expm1(-rate)
    for k in (10, 15, 20, 25, 30):
        empirical = sum(c >= k for c in counts) / trials
        p = stats.binomial_tail(n, q, k)
        assert abs(empirical - p) < _tol(p, trials), k
        for wrong in (stats.binomial_tail(n, q, k + 1), stats.binomial_tail(n, q, k - 1)):
            assert abs(empirical - wrong) > _tol(p, trials), k


# -- safe allocation: OCaml's table ---------------------------------------------------------

TARGETS = (1e-9, 4e-15, 1e-50)
# Sheet Feuille3 of OCaml memprof-limits' doc/alloc_limits.fods: k, then N (words) for each
# target, found by hand as "the largest round n" under the target; 0 where none was given.
OCAML_TABLE = [
    (5, (415, 36, 0)),
    (10, (6_020, 1_670, 0)),
    (20, (34_600, 17_200, 272)),
    (50, (184_500, 129_000, 20_290)),
    (100, (511_000, 408_000, 137_600)),
    (1_000, (8_218_000, 7_700_000, 5_987_000)),
    (10_000, (94_118_000, 92_400_000, 85_796_000)),
    (10**6, (9_940_000_000, 9_922_500_000, 9_851_300_000)),
]


@pytest.mark.parametrize(("k", "sheet"), OCAML_TABLE)
def test_safe_allocation_reproduces_the_ocaml_table(k: int, sheet: tuple[int, ...]) -> None:
    limit = k * 10_000  # words: l = k / p
    assert stats.samples_to_limit(limit, rate=P_WORD) == k
    for target, published in zip(TARGETS, sheet, strict=True):
        n = stats.safe_allocation(limit, target, rate=P_WORD)
        # the definition: the largest N whose probability of interruption is <= target
        assert stats.binomial_tail(n, P_WORD, k) <= target < stats.binomial_tail(n + 1, P_WORD, k)
        if published == 0:
            # no round value in the sheet: fewer than k words cannot hold k samples, and k
            # words already exceed the target (p**k > t)
            assert n == k - 1
        else:
            # the sheet rounds by hand (to 2-4 digits), so allow 1 %; a model off by one
            # sample or by a factor in p moves N by more than that in every row but the last
            assert n == pytest.approx(published, rel=0.01)


def test_safe_allocation_exact_values_rederived_in_the_notes() -> None:
    assert stats.safe_allocation(200_000, 4e-15, rate=P_WORD) == 17_182
    assert stats.safe_allocation(10**6, 4e-15, rate=P_WORD) == 408_067


def test_safe_allocation_in_bytes_is_eight_times_the_words() -> None:
    for k in (20, 100, 1000):
        words = stats.safe_allocation(k * 10_000, 4e-15, rate=P_WORD)
        nbytes = stats.safe_allocation(k * 10_000 * WORD, 4e-15)
        assert nbytes == pytest.approx(WORD * words, rel=1e-3)


def test_sampled_limits_are_accurate_from_about_200_kw() -> None:
    # OCaml 0.2.0: "reasonably accurate (l less than an order of magnitude greater than N)
    # starting at around N = 20kw, [...] for 4E-15 around a limit of l = 200kw"
    n = stats.safe_allocation(300_000, 4e-15, rate=P_WORD)
    assert 300_000 / n < 10 < 200_000 / stats.safe_allocation(200_000, 4e-15, rate=P_WORD)
    assert 15_000 < stats.safe_allocation(200_000, 4e-15, rate=P_WORD) < 25_000


def test_samples_to_limit() -> None:
    assert stats.samples_to_limit(0) == 1  # a limit of 0 is reached at the first sample
    assert stats.samples_to_limit(80_000) == 1
    assert stats.samples_to_limit(80_001) == 2
    assert stats.samples_to_limit(8 * 10**6) == 100
    assert stats.samples_to_limit(10**6, rate=1e-4) == 100


def test_p_sampled_limit_reached() -> None:
    limit = 200_000
    ps = [stats.p_sampled_limit_reached(n, limit, rate=P_WORD) for n in range(0, 400_001, 20_000)]
    assert ps == sorted(ps)
    assert ps[0] == 0.0
    assert 0.4 < stats.p_sampled_limit_reached(limit, limit, rate=P_WORD) < 0.6
    assert ps[-1] > 0.999
    assert stats.p_sampled_limit_reached(limit, limit, rate=P_WORD) == stats.binomial_tail(
        limit, P_WORD, 20
    )


# -- minimal sampling rate ------------------------------------------------------------------


@pytest.mark.parametrize(("target", "k"), [(1e-9, 14), (1e-14, 22), (1e-50, 80)])
def test_min_sampling_rate(target: float, k: int) -> None:
    n = 10**9
    assert stats.min_sampling_rate(n, target) * 10 * n == pytest.approx(k)
    # the default rate suffices from N = 14 000 / 22 000 / 80 000 words on, not much before
    assert stats.min_sampling_rate(k * 1_000, target) <= P_WORD * (1 + 1e-12)
    assert stats.min_sampling_rate(k * 1_000 // 2, target) > P_WORD
    # and it is the smallest such rate: k - 1 samples do not reach the target
    assert stats.binomial_tail(n, (k - 1) / (10 * n), k - 1) > target


# -- validation -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "exc", "match"),
    [
        (lambda: stats.p_not_interrupted(-1), ValueError, "n_bytes must be a number of bytes"),
        (lambda: stats.p_not_interrupted(math.nan), ValueError, "n_bytes"),
        (lambda: stats.p_not_interrupted("80 KiB"), TypeError, "n_bytes"),  # type: ignore
        (lambda: stats.p_not_interrupted([1, None]), TypeError, "n_bytes"),  # type: ignore
        (lambda: stats.p_not_interrupted(True), TypeError, "n_bytes"),
        (lambda: stats.p_not_interrupted(1, rate=0), ValueError, "0 < rate <= 1"),
        (lambda: stats.p_not_interrupted(1, rate=2.0), ValueError, "0 < rate <= 1"),
        (lambda: stats.bytes_until_probability(0), ValueError, "0 < target < 1"),
        (lambda: stats.bytes_until_probability(1.0), ValueError, "0 < target < 1"),
        (lambda: stats.binomial_tail(10.0, 0.5, 3), TypeError, "n must be an int"),  # type: ignore
        (lambda: stats.binomial_tail(-1, 0.5, 3), ValueError, "n must be an int >= 0"),
        (lambda: stats.binomial_tail(10, 1.5, 3), ValueError, "0 <= p <= 1"),
        (lambda: stats.binomial_tail(10, 0.5, 3.0), TypeError, "k must be an int"),  # type: ignore
        (lambda: stats.safe_allocation(-5, 1e-9), ValueError, "limit_bytes"),
        (lambda: stats.safe_allocation(math.inf, 1e-9), ValueError, "finite"),
        (lambda: stats.safe_allocation(10**6, 0), ValueError, "target"),
        (lambda: stats.min_sampling_rate(0, 1e-9), ValueError, "safe_bytes"),
        (lambda: stats.min_sampling_rate(100, 1e-9, limit_ratio=1), ValueError, "limit_ratio"),
    ],
)
def test_invalid_arguments(call: object, exc: type[Exception], match: str) -> None:
    assert callable(call)
    with pytest.raises(exc, match=match):
        call()
