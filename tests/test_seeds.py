"""Seed aggregation: t quantiles against known values, and ~95% coverage on synthetic data with a known truth."""

from __future__ import annotations

import math

import numpy as np
import pytest

from forgetless.retention.seeds import combine_seeds, t_quantile


def test_t_quantiles_against_table_values():
    # two-sided 95% critical values from any t table
    for df, t in ((1, 12.7062), (2, 4.3027), (3, 3.1824), (9, 2.2622), (30, 2.0423), (1e9, 1.9600)):
        assert t_quantile(0.975, df) == pytest.approx(t, abs=1e-4)
    scipy_stats = pytest.importorskip("scipy.stats")
    for df in (1.3, 2.7, 5.5, 17.2, 250.0):
        for p in (0.9, 0.975, 0.995):
            assert t_quantile(p, df) == pytest.approx(scipy_stats.t.ppf(p, df), rel=1e-6)


def test_one_seed_is_the_item_interval_and_two_seeds_by_hand():
    one = combine_seeds([-0.02], [(-0.03, -0.01)])
    assert one["ci"] == [-0.03, -0.01] and one["n_seeds"] == 1 and one["seed_sd"] is None
    # values -0.01, -0.03: mean -0.02, s = 0.0141421, t(1) = 12.7062; item se = 0.01 / 1.959964 for both
    two = combine_seeds([-0.01, -0.03], [(-0.02, 0.0), (-0.04, -0.02)])
    s = math.sqrt(2) * 0.01
    half = math.sqrt((12.7062 * s / math.sqrt(2)) ** 2 + 0.01**2)
    assert two["mean"] == pytest.approx(-0.02) and two["seed_sd"] == pytest.approx(s)
    assert two["ci"] == pytest.approx([-0.02 - half, -0.02 + half], rel=1e-5)
    # identical seeds: no seed spread, the interval is the item interval's width
    same = combine_seeds([0.1, 0.1, 0.1], [(0.0, 0.2)] * 3)
    assert same["ci"] == pytest.approx([0.0, 0.2], abs=1e-9) and same["seed_sd"] == pytest.approx(0.0)


def _coverage(k: int, sd_seed: float, sd_item: float, shared: float, reps: int, rng) -> tuple[float, float]:
    """Share of intervals covering the truth (0), and of naive item-only intervals: every seed is scored on the
    same items, so a `shared` part of the item noise is common to all seeds; each seed's reported item
    interval is +-1.96 x (its item standard error, as a bootstrap over ~300 items would estimate it)."""
    hits = naive = 0
    common = rng.normal(0, sd_item * math.sqrt(shared), reps)
    for r in range(reps):
        own = rng.normal(0, sd_item * math.sqrt(1 - shared), k)
        vals = rng.normal(0, sd_seed, k) + common[r] + own
        se_est = sd_item * (1 + rng.normal(0, 0.04, k))  # bootstrap standard errors are themselves a little noisy
        cis = [(v - 1.959964 * s, v + 1.959964 * s) for v, s in zip(vals, se_est, strict=True)]
        lo, hi = combine_seeds(list(vals), cis)["ci"]
        hits += lo <= 0 <= hi
        m, h = vals.mean(), 1.959964 * se_est.mean()
        naive += m - h <= 0 <= m + h
    return hits / reps, naive / reps


@pytest.mark.parametrize("k", [3, 10])
def test_intervals_cover_the_truth_about_95_percent_of_the_time(k):
    rng = np.random.default_rng(20260)
    regimes = {"seed spread dominates": (1.0, 0.15), "balanced": (1.0, 1.0), "item noise dominates": (0.15, 1.0)}
    for name, (sd_seed, sd_item) in regimes.items():
        cov, naive = _coverage(k, sd_seed, sd_item, shared=0.8, reps=1500, rng=rng)
        # 1500 replicates: the binomial sd of a 95% rate is 0.6 points
        assert 0.935 <= cov <= 0.99, (name, k, cov)  # about 95%, conservative where item noise dominates
        if name == "seed spread dominates":
            assert naive < 0.6, (name, k, naive)  # item-only intervals ignore the seed spread and miss it
