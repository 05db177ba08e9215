"""harness/stats.py: known values for mean, sample std, Student-t quantiles and CDF, CIs,
paired comparisons and ranks with ties."""

from __future__ import annotations

import math

import pytest

from harness import stats


def test_mean_and_sample_std():
    assert stats.mean([1, 2, 3, 4]) == 2.5
    assert stats.sample_std([2, 4, 4, 4, 5, 5, 7, 9]) == pytest.approx(2.138089935)  # ddof=1, not 2.0 (ddof=0)
    assert math.isnan(stats.sample_std([5.0]))
    assert math.isnan(stats.mean([]))
    assert stats.mean([1.0, float("nan"), 3.0]) == 2.0  # NaNs are not values


@pytest.mark.parametrize("df", sorted(stats.T_975))
def test_t_quantile_matches_printed_table(df):
    assert stats.t_critical(df) == pytest.approx(stats.T_975[df], abs=6e-4)


@pytest.mark.parametrize(
    "p, df, expected",
    [(0.995, 3, 5.840909), (0.95, 1, 6.313752), (0.9, 10, 1.372184), (0.975, 120, 1.979930), (0.025, 4, -2.776445), (0.5, 7, 0.0)],
)
def test_t_quantile_other_levels(p, df, expected):
    assert stats.t_quantile(p, df) == pytest.approx(expected, abs=1e-5)


def test_t_cdf_and_p_values():
    assert stats.t_cdf(0.0, 3) == pytest.approx(0.5)
    assert stats.t_cdf(-1.0, 5) == pytest.approx(0.1816087, abs=1e-6)
    assert stats.t_cdf(1.0, 1) == pytest.approx(0.75)  # Cauchy: 1/2 + atan(1)/pi
    assert stats.t_test_p(2.0, 10) == pytest.approx(0.0733880, abs=1e-6)
    assert stats.t_test_p(0.0, 4) == pytest.approx(1.0)
    assert stats.t_cdf(float("inf"), 2) == 1.0
    with pytest.raises(ValueError):
        stats.t_quantile(1.0, 3)


def test_summary_ci():
    s = stats.summarize([60.0, 62.0, 64.0])
    assert (s.n, s.mean, s.std) == (3, 62.0, 2.0)
    half = 4.302653 * 2.0 / math.sqrt(3)
    assert s.ci_low == pytest.approx(62.0 - half, abs=1e-5)
    assert s.ci_high == pytest.approx(62.0 + half, abs=1e-5)
    one = stats.summarize([61.0])
    assert one.n == 1 and one.mean == 61.0 and math.isnan(one.std) and math.isnan(one.ci_low)
    assert stats.summarize([]).n == 0


def test_paired_compare_distinguishable():
    a = {0: 60.0, 1: 62.0, 2: 64.0}
    b = {0: 50.0, 1: 51.0, 2: 53.0}
    p = stats.paired_compare(a, b)
    assert p.seeds == (0, 1, 2)
    assert p.mean_diff == pytest.approx(32 / 3)
    assert p.std_diff == pytest.approx(math.sqrt(1 / 3))
    half = 4.302653 * math.sqrt(1 / 3) / math.sqrt(3)
    assert (p.ci_low, p.ci_high) == (pytest.approx(32 / 3 - half, abs=1e-5), pytest.approx(32 / 3 + half, abs=1e-5))
    assert p.t == pytest.approx(32.0)
    assert p.p_value == pytest.approx(0.000975, abs=2e-6)
    assert p.distinguishable is True and p.verdict == "A better"


def test_paired_compare_uses_only_matched_seeds():
    p = stats.paired_compare({0: 60.0, 1: 62.0, 2: 64.0}, {0: 61.0, 1: 61.5, 3: 99.0})
    assert p.seeds == (0, 1)
    assert p.mean_diff == pytest.approx(-0.25)
    assert p.distinguishable is False and p.verdict == "within seed noise"


def test_paired_compare_too_few_seeds():
    one = stats.paired_compare({0: 1.0, 1: 2.0}, {1: 0.0})
    assert one.n == 1 and one.mean_diff == 2.0 and one.distinguishable is None and "needs >= 2" in one.verdict
    none = stats.paired_compare({0: 1.0}, {1: 0.0})
    assert none.n == 0 and math.isnan(none.mean_diff) and none.distinguishable is None


def test_paired_compare_constant_difference():
    same = stats.paired_compare({0: 1.0, 1: 2.0}, {0: 1.0, 1: 2.0})
    assert same.distinguishable is False and same.p_value == 1.0
    shifted = stats.paired_compare({0: 2.0, 1: 3.0}, {0: 1.0, 1: 2.0})
    assert shifted.distinguishable is True and shifted.mean_diff == 1.0 and shifted.p_value == 0.0


def test_rank_with_ties():
    scores = {"a": 62.0, "b": 51.0, "c": 61.2, "d": float("nan")}
    wins = {("a", "b"), ("c", "b")}
    ranks = stats.rank_with_ties(scores, lambda x, y: (x, y) in wins)
    assert ranks == {"a": 1, "c": 1, "b": 3}
    assert stats.tied(ranks) == {"a", "c"}
    # a chain of indistinguishable neighbours: only the distinguishable pair separates
    ranks = stats.rank_with_ties({"x": 3.0, "y": 2.0, "z": 1.0}, lambda p, q: (p, q) == ("x", "z"))
    assert ranks == {"x": 1, "y": 1, "z": 2}


def test_summary_interval_is_clipped_to_the_metric_range():
    # 0, 0, 3: mean 1, sample std sqrt(3), t(2, 0.975) = 4.303 -> 1 -/+ 4.303: [-3.303, 5.303];
    # an mIoU cannot be below 0 %, so the reported interval starts at 0.
    raw = stats.summarize([0.0, 0.0, 3.0])
    assert raw.ci_low == pytest.approx(-3.3027, abs=1e-3) and raw.ci_high == pytest.approx(5.3027, abs=1e-3)
    clipped = stats.summarize([0.0, 0.0, 3.0], bounds=(0.0, 100.0))
    assert clipped.ci_low == 0.0 and clipped.ci_high == raw.ci_high and clipped.mean == 1.0
