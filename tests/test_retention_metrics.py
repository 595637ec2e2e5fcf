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


def _acc_pair(base_rate_of_40: int, cand_rate_of_40: int) -> tuple[dict, dict]:
    b = np.zeros(40)
    c = np.zeros(40)
    b[:base_rate_of_40] = 1.0
    c[:cand_rate_of_40] = 1.0
    return {"acc": b}, {"acc": c}


def test_ability_score_by_hand():
    acc = M.mean_of("acc")
    b1, c1 = _acc_pair(20, 10)  # ratio 0.5
    b2, c2 = _acc_pair(20, 20)  # ratio 1.0
    b3, c3 = _acc_pair(20, 18)  # ratio 0.9
    out = M.ability_score([("t1", acc, b1, c1, 1.0, "a"), ("t2", acc, b2, c2, 1.0, "a"), ("t3", acc, b3, c3, 1.0, "b")])
    # ability a: (0.5 + 1.0) / 2 - 1 = -0.25; ability b: 0.9 - 1 = -0.1; score 1 + (-0.25 - 0.1) / 2
    assert math.isclose(out["abilities"]["a"]["change"], -0.25) and math.isclose(out["abilities"]["b"]["change"], -0.1)
    assert math.isclose(out["score"], 0.825)
    assert out["abilities"]["a"]["tasks"] == ["t1", "t2"] and out["abilities"]["a"]["weight"] == 0.5
    assert {t: out["tasks"][t]["weight_in_score"] for t in ("t1", "t2", "t3")} == {"t1": 0.25, "t2": 0.25, "t3": 0.5}
    for ab in ("a", "b"):
        lo, hi = out["abilities"][ab]["ci"]
        assert lo <= out["abilities"][ab]["change"] <= hi
    assert out["ci"][0] <= out["score"] <= out["ci"][1]
    # definition 1 (a task-weighted mean) would give (0.5 + 1.0 + 0.9) / 3 = 0.8: two tasks of one ability do not
    # outvote one
    v1, _ = M.retention_score([(acc, b1, c1, 1.0), (acc, b2, c2, 1.0), (acc, b3, c3, 1.0)])
    assert math.isclose(v1, 0.8)


def test_ability_score_without_abilities_is_definition_1_exactly():
    acc, ppl = M.mean_of("acc"), M.perplexity()
    rng = np.random.default_rng(3)
    b1, c1 = {"acc": rng.integers(0, 2, 60).astype(float)}, {"acc": rng.integers(0, 2, 60).astype(float)}
    b2 = {"nll": rng.uniform(1, 3, 30), "tokens": rng.integers(1, 9, 30).astype(float)}
    c2 = {"nll": b2["nll"] * rng.uniform(0.9, 1.3, 30), "tokens": b2["tokens"]}
    v1, ci1 = M.retention_score([(acc, b1, c1, 2.0), (ppl, b2, c2, 1.0)])
    v2 = M.ability_score([("x", acc, b1, c1, 2.0, None), ("y", ppl, b2, c2, 1.0, None)])
    assert math.isclose(v2["score"], v1) and np.allclose(v2["ci"], ci1)
    assert set(v2["abilities"]) == {"x", "y"} and math.isclose(v2["abilities"]["x"]["weight"], 2 / 3)


def test_variance_share_goes_to_the_noisy_task():
    acc = M.mean_of("acc")
    rng = np.random.default_rng(0)
    noisy_b, noisy_c = {"acc": rng.integers(0, 2, 200).astype(float)}, {"acc": rng.integers(0, 2, 200).astype(float)}
    flat = {"acc": np.ones(200)}
    out = M.ability_score([("noisy", acc, noisy_b, noisy_c, 1.0, "a"), ("flat", acc, flat, flat, 1.0, "b")])
    assert math.isclose(out["tasks"]["noisy"]["variance_share"], 1.0) and out["tasks"]["flat"]["variance_share"] == 0.0
    assert out["tasks"]["flat"]["half_width"] == 0.0 and out["tasks"]["noisy"]["half_width"] > 0
    # two equally noisy tasks of one ability share the variance about equally
    nb2, nc2 = {"acc": rng.integers(0, 2, 200).astype(float)}, {"acc": rng.integers(0, 2, 200).astype(float)}
    two = M.ability_score([("n1", acc, noisy_b, noisy_c, 1.0, "a"), ("n2", acc, nb2, nc2, 1.0, "a")])
    assert 0.3 < two["tasks"]["n1"]["variance_share"] < 0.7
    assert math.isclose(two["tasks"]["n1"]["variance_share"] + two["tasks"]["n2"]["variance_share"], 1.0)
    # a model scored against itself: no variance, so no shares (None: comparable and valid JSON, unlike NaN)
    same = M.ability_score([("n1", acc, noisy_b, noisy_b, 1.0, "a"), ("flat", acc, flat, flat, 1.0, "b")])
    assert same["score"] == 1.0 and [t["variance_share"] for t in same["tasks"].values()] == [None, None]


def test_budget_check_reports_the_point_and_the_95_percent_verdict():
    # score 0.995 [0.985, 1.004]: a 0.5% drop, but up to 1.5% at 95%
    out = M.budget_check(0.995, (0.985, 1.004), 0.01)
    assert math.isclose(out["drop"], 0.005) and math.isclose(out["drop_upper"], 0.015)
    assert out["within_budget"] is True and out["within_budget_95"] is False
    assert M.budget_check(0.995, (0.992, 0.998), 0.01)["within_budget_95"] is True
    assert M.budget_check(0.98, (0.97, 0.99), 0.01)["within_budget"] is False


def test_a_lower_is_better_metric_whose_base_is_zero_has_no_ratio():
    """main_metric: kl: the base's KL from itself is 0, and 0 / x would read as everything lost (-100%); the
    task has no ratio and is left out, as a higher-is-better task with base 0 is."""
    kl = M.mean_of("kl", higher_is_better=False)
    acc = M.mean_of("acc")
    base_kl, cand_kl = {"kl": np.zeros(30)}, {"kl": np.full(30, 0.2)}
    assert math.isnan(M.retention_ratio(kl, 0.0, 0.2))
    b, c = _acc_pair(20, 18)
    out = M.ability_score([("drift", kl, base_kl, cand_kl, 1.0, "own"), ("t", acc, b, c, 1.0, "skill")])
    assert math.isclose(out["score"], 0.9), out["score"]  # the acc task alone: 18 / 20
    v1, (lo, hi) = M.retention_score([(kl, base_kl, cand_kl, 1.0), (acc, b, c, 1.0)])
    assert math.isclose(v1, 0.9) and lo <= 0.9 <= hi
