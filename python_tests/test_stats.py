"""pub_native.demo.stats: the t quantile against scipy and its defining integral, and the paired
difference's 95% interval by its coverage on simulated data."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pub_native.demo.stats import mean_std, paired_difference, t_quantile_975


def _t_cdf(x: float, df: int, n: int = 200_000) -> float:
    """P(T ≤ x) for Student's t by the trapezoid rule on its density (independent of the
    table): f(t) = Γ((ν+1)/2) / (√(νπ) Γ(ν/2)) (1 + t²/ν)^(−(ν+1)/2)."""
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    t = np.linspace(0.0, x, n)
    f = c * (1 + t * t / df) ** (-(df + 1) / 2)
    return 0.5 + float(np.sum((f[1:] + f[:-1]) / 2) * (t[1] - t[0]))


@pytest.mark.parametrize("df", [1, 2, 4, 9, 30, 31, 60, 500])
def test_t_quantile_is_the_975_point(df):
    assert _t_cdf(t_quantile_975(df), df) == pytest.approx(0.975, abs=2e-6)


def test_t_quantile_against_scipy():
    stats = pytest.importorskip("scipy.stats")
    for df in range(1, 400):
        assert t_quantile_975(df) == pytest.approx(stats.t.ppf(0.975, df), abs=1e-4)
    assert t_quantile_975(10**6) == pytest.approx(1.959964, abs=1e-5)
    with pytest.raises(ValueError, match="df"):
        t_quantile_975(0)


def test_paired_difference_values():
    a = np.array([0.91, 0.92, 0.90, 0.93, 0.92])
    b = np.array([0.90, 0.90, 0.90, 0.90, 0.91])
    d = paired_difference(a, b)
    diff = a - b
    assert d["n"] == 5 and d["mean"] == pytest.approx(diff.mean())
    assert d["std"] == pytest.approx(diff.std(ddof=1))
    assert d["half_width"] == pytest.approx(2.7764 * diff.std(ddof=1) / math.sqrt(5), rel=1e-4)
    assert d["ci_low"] < d["mean"] < d["ci_high"]
    one = paired_difference([1.0], [0.5])
    assert one["mean"] == 0.5 and math.isnan(one["half_width"])
    assert mean_std([2.0]) == (2.0, 0.0)
    with pytest.raises(ValueError, match="length"):
        paired_difference([1.0, 2.0], [1.0])


@pytest.mark.parametrize("n", [3, 5])
def test_interval_covers_the_true_difference_95_percent_of_the_time(n):
    rng = np.random.default_rng(n)
    trials = 4000
    true = 0.3
    base = rng.normal(size=(trials, n))
    other = base + true + rng.normal(scale=0.5, size=(trials, n))  # paired: shared seed noise
    hits = 0
    for a, b in zip(other, base):
        d = paired_difference(a, b)
        hits += d["ci_low"] <= true <= d["ci_high"]
    # Binomial(4000, 0.95): standard deviation 0.0034; 4 of them either side.
    assert abs(hits / trials - 0.95) < 0.014
