"""The frontier verdict (retention/frontier.py) on constructed inputs: the rules, the paired gain ratio, seeds."""

from __future__ import annotations

import numpy as np
import pytest

from forgetless.retention import metrics as M
from forgetless.retention.frontier import decide, gain_ratio, identical, judge, retention_drop
from forgetless.retention.seeds import combine_seeds
from forgetless.retention.tasks import TaskResult


def result(values, higher_is_better=True, name="t") -> TaskResult:
    cols = {"v": np.asarray(values, dtype=np.float64)}
    return TaskResult(name, "x", cols, [M.mean_of("v", "mean", higher_is_better)], "mean",
                      [f"i{k}" for k in range(len(values))])


def iv(mean, lo, hi):
    return {"mean": mean, "ci": [lo, hi]}


@pytest.mark.parametrize(("r", "d", "lora", "want"), [
    (iv(1.00, 0.98, 1.02), iv(0.5, 0.1, 1.0), 0.6, "MET"),  # the bounds themselves pass
    (iv(1.00, 0.979, 1.02), iv(0.5, 0.1, 0.9), 0.6, "INCONCLUSIVE"),  # R's lower bound just short
    (iv(0.95, 0.93, 0.979), iv(0.5, 0.1, 0.9), 0.6, "NOT MET"),  # R surely below 0.98
    (iv(1.00, 0.99, 1.01), iv(1.5, 1.01, 2.0), 2.0, "NOT MET"),  # surely over the budget
    (iv(1.00, 0.99, 1.01), iv(0.8, 0.3, 1.2), 0.9, "INCONCLUSIVE"),  # the budget may not hold
    (iv(1.00, 0.99, 1.01), iv(0.8, 0.3, 0.95), 0.7, "INCONCLUSIVE"),  # forgets more than LoRA
    (iv(1.00, 0.99, 1.01), iv(0.7, 0.3, 0.95), 0.7, "MET"),  # as much as LoRA: within
    (iv(1.00, 0.99, 1.01), iv(0.5, 0.1, 0.9), None, "INCONCLUSIVE"),  # no LoRA row to compare with
    (iv(0.90, 0.80, 0.97), iv(2.0, 1.5, 2.5), 0.1, "NOT MET"),
])
def test_the_rules(r, d, lora, want):
    assert decide(r, d, lora) == want


def test_gain_ratio_is_hand_computed_and_paired_over_items():
    base = [0.2, 0.4, 0.1, 0.7, 0.5, 0.3]
    full = [0.9, 0.5, 0.6, 0.8, 0.9, 0.4]
    # the candidate gains exactly half of full FT's gain on every item: R is 0.5 in every paired resample
    half = [b + 0.5 * (f - b) for b, f in zip(base, full, strict=True)]
    g = gain_ratio(result(base), result(half), result(full))
    assert g["ratio"] == pytest.approx(0.5) and g["ci"] == [pytest.approx(0.5), pytest.approx(0.5)]
    assert g["gain"] == pytest.approx(np.mean(half) - np.mean(base))
    assert g["full_gain"] == pytest.approx(np.mean(full) - np.mean(base))

    # lower is better (a cross-entropy): gains are decreases; hand-computed 0.6 / 1.0 = 0.6
    base_ce, full_ce, cand_ce = [2.0, 3.0], [1.0, 2.0], [1.5, 2.3]
    g = gain_ratio(result(base_ce, False), result(cand_ce, False), result(full_ce, False))
    assert g["ratio"] == pytest.approx(((2.0 + 3.0) - (1.5 + 2.3)) / ((2.0 + 3.0) - (1.0 + 2.0)))


def test_gain_ratio_interval_matches_a_reference_bootstrap():
    rng = np.random.default_rng(3)
    base = rng.normal(0, 1, 300)
    full = base + rng.normal(1.0, 1, 300)
    cand = base + rng.normal(0.9, 1, 300)
    g = gain_ratio(result(base), result(cand), result(full), n_boot=2000, seed=5)
    # the reference: resample item indices, the same ones for all three models, and take the ratio of mean gains
    idx = np.random.default_rng(5).integers(0, 300, size=(2000, 300))
    ref = (cand[idx].mean(1) - base[idx].mean(1)) / (full[idx].mean(1) - base[idx].mean(1))
    assert g["ci"] == [pytest.approx(np.quantile(ref, 0.025)), pytest.approx(np.quantile(ref, 0.975))]
    assert g["ci"][0] < g["ratio"] < g["ci"][1]


def test_gain_ratio_refuses_what_it_cannot_compute():
    with pytest.raises(ValueError, match="full fine-tuning gained nothing"):
        gain_ratio(result([0.5, 0.5]), result([0.6, 0.6]), result([0.4, 0.5]))
    other = TaskResult("t", "x", {"v": np.ones(2)}, [M.mean_of("v", "mean")], "mean", ["a", "z"])
    with pytest.raises(ValueError, match="other items"):
        gain_ratio(result([0.1, 0.2]), other, result([0.9, 0.9]))
    # full FT's gain is pure noise: resamples where it gains nothing make the ratio's interval unbounded
    g = gain_ratio(result([0.0] * 20), result([0.0] * 19 + [1.0]), result([0.0] * 19 + [0.5]), n_boot=400)
    assert g["undefined_share"] > 0.025 and g["ci"] == [-np.inf, np.inf]


def comparison(score, lo, hi):
    return {"retention_score": score, "retention_ci": [lo, hi]}


def test_judge_over_three_seeds():
    rng = np.random.default_rng(0)
    base = rng.uniform(0, 1, 400)
    full = [base + rng.normal(0.30, 0.05, 400) for _ in range(3)]
    cand = [f + rng.normal(0.0, 0.01, 400) for f in full]  # full FT's gain, item by item, give or take
    rets = [comparison(0.997, 0.994, 1.000), comparison(0.996, 0.993, 0.999), comparison(0.998, 0.995, 1.001)]
    lora = [comparison(0.99, 0.985, 0.995)] * 3
    v = judge("cand", result(base), [result(c) for c in cand], [result(f) for f in full], rets, lora)
    drops = [retention_drop(x) for x in rets]
    assert drops[0]["drop"] == pytest.approx(0.3) and drops[0]["ci"] == [pytest.approx(0.0), pytest.approx(0.6)]
    want = combine_seeds([d["drop"] for d in drops], [d["ci"] for d in drops])
    assert v.drop["mean"] == pytest.approx(0.3) and v.drop["ci"] == pytest.approx(want["ci"])
    ratios = [gain_ratio(result(base), result(c), result(f), seed=i)
              for i, (c, f) in enumerate(zip(cand, full, strict=True))]
    assert v.ratio["ci"] == pytest.approx(combine_seeds([r["ratio"] for r in ratios], [r["ci"] for r in ratios])["ci"])
    assert v.lora_drop == pytest.approx(1.0)
    assert v.verdict == "MET", v.why
    assert v.ratio["n_seeds"] == 3 and "3 seeds" in v.why

    # the same candidate forgetting more than the budget on one seed: the interval over seeds widens past 1
    rets[2] = comparison(0.97, 0.967, 0.973)
    assert judge("cand", result(base), [result(c) for c in cand], [result(f) for f in full], rets,
                 lora).verdict == "INCONCLUSIVE"
    with pytest.raises(ValueError, match="same seeds"):
        judge("cand", result(base), [result(c) for c in cand], [result(f) for f in full[:2]], rets, lora)


def test_a_run_identical_to_a_baseline_is_no_candidate():
    a = [{"task": result([0.1, 0.2]), "ret": result([1.0, 2.0])}]
    same = [{"task": result([0.1, 0.2]), "ret": result([1.0, 2.0])}]
    moved = [{"task": result([0.1, 0.2]), "ret": result([1.0, 2.0000001])}]
    assert identical(a, same) and not identical(a, moved) and not identical(a, same * 2)
