"""Small statistics for seed-level results: mean, sample standard deviation, Student-t
confidence intervals, paired comparisons over matched seeds, and ranks with ties.

Pure Python (no scipy). The Student-t CDF is computed from the regularised incomplete beta
function (continued fraction, modified Lentz), and its quantiles by bisection on the CDF;
:data:`T_975` holds the familiar two-sided 95% table values for small df, against which the
computation is tested.

Conventions used by the reports:

* ``std`` is the *sample* standard deviation (ddof = 1); it needs n >= 2 (NaN otherwise).
* The 95% CI of a mean is ``mean +- t(0.975, n - 1) * std / sqrt(n)``; NaN for n < 2.
* Two result sets are compared on the seeds they share (paired: seed s of method A against
  seed s of method B, so seed-level luck in data order and initialisation cancels). The
  difference is *distinguishable from seed noise* when the 95% CI of the mean paired
  difference excludes 0 (equivalently, the two-sided paired t-test has p < 0.05). With fewer
  than two shared seeds nothing can be said: ``distinguishable`` is None.
* Several comparisons at once (every pair of rows): :func:`holm` adjusts their p-values
  (Holm 1979, step-down), so "p_holm < 0.05" bounds the chance of *any* false "better" among
  them at 5%.
* Rank with ties: an entry's rank is 1 + the number of entries that are *distinguishably*
  better than it. Entries that no comparison separates share a rank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Hashable, Iterable, Mapping, Sequence

# Two-sided 95% Student-t critical values t(0.975, df), df = 1..30 (the printed table).
T_975: dict[int, float] = {
    1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
    11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093, 20: 2.086,
    21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060, 26: 2.056, 27: 2.052, 28: 2.048, 29: 2.045, 30: 2.042,
}


def _clean(values: Iterable[float]) -> list[float]:
    return [float(v) for v in values if v is not None and not math.isnan(float(v))]


def mean(values: Iterable[float]) -> float:
    """Arithmetic mean of the non-NaN values; NaN when there are none."""
    xs = _clean(values)
    return math.fsum(xs) / len(xs) if xs else math.nan


def sample_std(values: Iterable[float]) -> float:
    """Sample standard deviation (ddof = 1) of the non-NaN values; NaN for n < 2."""
    xs = _clean(values)
    if len(xs) < 2:
        return math.nan
    m = math.fsum(xs) / len(xs)
    return math.sqrt(math.fsum((x - m) ** 2 for x in xs) / (len(xs) - 1))


# -- Student t --------------------------------------------------------------------------------

def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta function I_x(a, b) for a, b > 0, 0 <= x <= 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    front = math.exp(log_front)
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom."""
    if df <= 0:
        raise ValueError(f"degrees of freedom must be positive, got {df}")
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))  # P(T > |t|)
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t (bisection on :func:`t_cdf`, |error| < 1e-10)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"quantile level must be in (0, 1), got {p}")
    if p == 0.5:
        return 0.0
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, hi * 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-10:
            break
    return 0.5 * (lo + hi)


def t_critical(df: int, level: float = 0.95) -> float:
    """Two-sided critical value: t((1 + level) / 2, df)."""
    return t_quantile(0.5 + level / 2.0, df)


def t_test_p(t: float, df: float) -> float:
    """Two-sided p-value of a t statistic."""
    if math.isnan(t):
        return math.nan
    return min(1.0, 2.0 * (1.0 - t_cdf(abs(t), df)))


# -- summaries ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Summary:
    """Mean, sample std and t-based confidence interval of one metric over seeds."""

    n: int
    mean: float
    std: float
    ci_low: float
    ci_high: float
    level: float = 0.95


def summarize(values: Iterable[float], level: float = 0.95, bounds: tuple[float, float] | None = None) -> Summary:
    """Summary of the non-NaN values (n counts only those). ``bounds`` (low, high): the range
    the metric cannot leave (an mIoU's 0..100); the t-interval is clipped to it, since an
    interval reaching below 0 % says nothing more than one reaching 0 %."""
    xs = _clean(values)
    n = len(xs)
    m, s = mean(xs), sample_std(xs)
    if n < 2:
        return Summary(n, m, math.nan, math.nan, math.nan, level)
    half = t_critical(n - 1, level) * s / math.sqrt(n)
    low, high = m - half, m + half
    if bounds is not None:
        low, high = max(low, bounds[0]), min(high, bounds[1])
    return Summary(n, m, s, low, high, level)


@dataclass(frozen=True)
class Paired:
    """A minus B over the seeds both have."""

    seeds: tuple[Hashable, ...]
    mean_diff: float
    std_diff: float
    ci_low: float
    ci_high: float
    t: float
    p_value: float
    distinguishable: bool | None  # None: fewer than two matched seeds
    level: float = 0.95

    @property
    def n(self) -> int:
        return len(self.seeds)

    @property
    def verdict(self) -> str:
        if self.distinguishable is None:
            return f"unknown (n={self.n} matched seed{'s' if self.n != 1 else ''}; needs >= 2)"
        if not self.distinguishable:
            return "within seed noise"
        return "A better" if self.mean_diff > 0 else "B better"


def paired_compare(a: Mapping[Hashable, float], b: Mapping[Hashable, float], level: float = 0.95) -> Paired:
    """Paired t comparison of ``a[seed] - b[seed]`` over seeds present (non-NaN) in both."""
    seeds = tuple(sorted((s for s in a if s in b and not _isnan(a[s]) and not _isnan(b[s])), key=_seed_key))
    diffs = [float(a[s]) - float(b[s]) for s in seeds]
    n = len(diffs)
    if n == 0:
        return Paired(seeds, math.nan, math.nan, math.nan, math.nan, math.nan, math.nan, None, level)
    md = mean(diffs)
    if n < 2:
        return Paired(seeds, md, math.nan, math.nan, math.nan, math.nan, math.nan, None, level)
    sd = sample_std(diffs)
    se = sd / math.sqrt(n)
    if se == 0.0:  # identical differences on every seed: no noise at all
        distinct = md != 0.0
        t = math.copysign(math.inf, md) if distinct else 0.0
        return Paired(seeds, md, sd, md, md, t, 0.0 if distinct else 1.0, distinct, level)
    half = t_critical(n - 1, level) * se
    t = md / se
    low, high = md - half, md + half
    return Paired(seeds, md, sd, low, high, t, t_test_p(t, n - 1), bool(low > 0 or high < 0), level)


def _isnan(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _seed_key(seed):
    return (0, seed) if isinstance(seed, (int, float)) else (1, str(seed))


def rank_with_ties(
    scores: Mapping[Hashable, float],
    better: Callable[[Hashable, Hashable], bool],
) -> dict[Hashable, int]:
    """Rank entries (1 = best). ``better(x, y)`` says x is distinguishably better than y.

    rank(x) = 1 + #{y : better(y, x)}; entries with NaN scores are not ranked (absent from
    the result). Entries that no comparison separates share a rank.
    """
    names = [k for k, v in scores.items() if not _isnan(v)]
    return {x: 1 + sum(1 for y in names if y != x and better(y, x)) for x in names}


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values, in the input order (NaN stays NaN, not counted).

    With the m valid p-values sorted ascending p_(1) <= ... <= p_(m):
    adj_(i) = min(1, max_{j <= i} (m - j + 1) * p_(j)); reject H_(i) at level a iff
    adj_(i) <= a (Holm, Scand. J. Statist. 6, 1979).
    """
    valid = sorted((p, i) for i, p in enumerate(p_values) if not _isnan(p))
    m = len(valid)
    out = [math.nan] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(valid):
        running = max(running, min(1.0, (m - rank) * p))
        out[i] = running
    return out


def tied(ranks: Mapping[Hashable, int]) -> set[Hashable]:
    """The entries whose rank another entry shares."""
    counts: dict[int, int] = {}
    for r in ranks.values():
        counts[r] = counts.get(r, 0) + 1
    return {k for k, r in ranks.items() if counts[r] > 1}


__all__: Sequence[str] = [
    "T_975", "mean", "sample_std", "betainc", "t_cdf", "t_quantile", "t_critical", "t_test_p",
    "Summary", "summarize", "Paired", "paired_compare", "rank_with_ties", "holm", "tied",
]
