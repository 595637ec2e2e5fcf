"""Forgetting metrics on synthetic scores with known answers: intervals, paired tests, retention score."""

from __future__ import annotations

import math

import numpy as np

from forgetless.retention import metrics as M


def test_perplexity_and_bits_per_byte_by_hand():
    cols = {"nll": np.array([2.0, 4.0]), "tokens": np.array([1.0, 3.0]), "bytes": np.array([4.0, 8.0])}
    assert math.isclose(M.value(M.perplexity(), cols), math.exp(6.0 / 4.0))
    assert math.isclose(M.value(M.per_unit("nll", "bytes", "bpb", 1 / M.LN2), cols), 6.0 / 12.0 / math.log(2))


def test_bootstrap_interval_covers_the_true_mean_at_the_stated_rate():
    rng = np.random.default_rng(0)
    covered = 0
    trials = 200
    for t in range(trials):
        x = rng.binomial(1, 0.6, size=300).astype(float)
        lo, hi = M.bootstrap_ci(M.mean_of("acc"), {"acc": x}, n_boot=500, seed=t)
        covered += lo <= 0.6 <= hi
    assert 0.90 <= covered / trials <= 0.99


def test_paired_test_flags_a_real_drop():
    rng = np.random.default_rng(1)
    base = rng.binomial(1, 0.6, size=500).astype(float)
    cand = base.copy()
    flip = rng.choice(np.flatnonzero(base == 1), size=40, replace=False)  # 8 points lost, items flipped
    cand[flip] = 0
    c = M.paired_test(M.mean_of("acc"), {"acc": base}, {"acc": cand})
    assert c.significant and c.worse and c.significant_drop
    assert math.isclose(c.delta, -40 / 500)
    assert c.ci[1] < 0 and c.p_value < 0.01


def test_paired_test_on_pure_noise_flags_about_five_percent():
    """Candidate and base are the same model up to item-level noise: a 95% test fires ~5% of the time."""
    rng = np.random.default_rng(2)
    fired = 0
    trials = 300
    for t in range(trials):
        skill = rng.uniform(0.2, 0.9, size=400)
        base = rng.binomial(1, skill).astype(float)
        cand = rng.binomial(1, skill).astype(float)
        fired += M.paired_test(M.mean_of("acc"), {"acc": base}, {"acc": cand}, n_boot=400, seed=t).significant
    assert 0.01 <= fired / trials <= 0.10


def test_paired_test_for_lower_is_better_metrics():
    base = {"nll": np.full(50, 2.0), "tokens": np.full(50, 1.0)}
    cand = {"nll": np.full(50, 2.5), "tokens": np.full(50, 1.0)}
    c = M.paired_test(M.perplexity(), base, cand)
    assert c.worse and c.delta > 0  # perplexity went up: worse


def test_retention_score_by_hand():
    acc = M.mean_of("acc")
    ppl = M.perplexity()
    b1, c1 = {"acc": np.array([1.0, 1.0, 0.0, 0.0] * 10)}, {"acc": np.array([1.0, 0.0, 0.0, 0.0] * 10)}  # 0.5 -> 0.25
    b2 = {"nll": np.array([math.log(10.0)] * 40), "tokens": np.ones(40)}  # ppl 10
    c2 = {"nll": np.array([math.log(20.0)] * 40), "tokens": np.ones(40)}  # ppl 20
    score, (lo, hi) = M.retention_score([(acc, b1, c1, 1.0), (ppl, b2, c2, 1.0)])
    assert math.isclose(score, (0.25 / 0.5 + 10 / 20) / 2)
    assert lo <= score <= hi
    weighted, _ = M.retention_score([(acc, b1, c1, 3.0), (ppl, b2, b2, 1.0)])
    assert math.isclose(weighted, (3 * 0.5 + 1 * 1.0) / 4)


def test_retention_score_leaves_out_tasks_the_base_scores_zero_on():
    acc = M.mean_of("acc")
    b1, c1 = {"acc": np.array([1.0, 1.0, 0.0, 0.0] * 10)}, {"acc": np.array([1.0, 0.0, 0.0, 0.0] * 10)}  # ratio 0.5
    zero, some = {"acc": np.zeros(40)}, {"acc": np.array([1.0, 0.0] * 20)}  # base 0: no ratio
    score, (lo, hi) = M.retention_score([(acc, b1, c1, 1.0), (acc, zero, some, 1.0)])
    assert math.isclose(score, 0.5) and lo <= 0.5 <= hi
    score, (lo, hi) = M.retention_score([(acc, zero, some, 1.0)])
    assert math.isnan(score) and math.isnan(lo) and math.isnan(hi)
