"""Scores with honest noise: bootstrap intervals over items, paired tests against a baseline, retention.

A task's per-item results are columns (arrays over items). A metric is an aggregator over those columns
that works on any leading batch shape, so one vectorised call scores all bootstrap resamples at once.
Ratio metrics (perplexity, bits per byte, token cross-entropy) resample documents and recompute the
ratio, as they should, rather than averaging per-document ratios.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

import numpy as np

Columns = dict[str, np.ndarray]
N_BOOT = 1000
LN2 = math.log(2.0)


@dataclass(frozen=True)
class Metric:
    name: str
    higher_is_better: bool
    fn: Callable[[Columns], np.ndarray]  # columns of shape [..., n_items] -> [...]


def mean_of(col: str, name: str | None = None, higher_is_better: bool = True) -> Metric:
    return Metric(name or col, higher_is_better, lambda c: c[col].mean(axis=-1))


def perplexity(nll: str = "nll", count: str = "tokens", name: str = "perplexity") -> Metric:
    return Metric(name, False, lambda c: np.exp(c[nll].sum(axis=-1) / c[count].sum(axis=-1)))


def per_unit(nll: str, count: str, name: str, scale: float = 1.0) -> Metric:
    """sum(nll) / sum(count) * scale: token cross-entropy (scale 1) or bits per byte (scale 1/ln 2)."""
    return Metric(name, False, lambda c: c[nll].sum(axis=-1) / c[count].sum(axis=-1) * scale)


def _resample_index(n: int, n_boot: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def _take(cols: Columns, idx: np.ndarray) -> Columns:
    return {k: v[idx] for k, v in cols.items()}


def value(metric: Metric, cols: Columns) -> float:
    return float(metric.fn(cols))


def bootstrap_ci(metric: Metric, cols: Columns, n_boot: int = N_BOOT, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of `metric` over items."""
    n = len(next(iter(cols.values())))
    if n < 2:
        v = value(metric, cols)
        return (v, v)
    dist = metric.fn(_take(cols, _resample_index(n, n_boot, seed)))
    a = (1 - level) / 2
    return float(np.quantile(dist, a)), float(np.quantile(dist, 1 - a))


@dataclass
class Comparison:
    metric: str
    base: float
    candidate: float
    delta: float  # candidate - base
    ci: tuple[float, float]  # paired bootstrap interval of delta
    relative: float | None  # delta / base
    p_value: float
    significant: bool  # the interval excludes 0
    worse: bool  # the change goes in the bad direction

    @property
    def significant_drop(self) -> bool:
        return self.significant and self.worse


def paired_test(
    metric: Metric, base: Columns, cand: Columns, n_boot: int = N_BOOT, seed: int = 0, level: float = 0.95
) -> Comparison:
    """Paired bootstrap over the same items: resample item indices once, score both models on them."""
    n = len(next(iter(base.values())))
    if n != len(next(iter(cand.values()))):
        raise ValueError("paired test needs the same items for base and candidate")
    b, c = value(metric, base), value(metric, cand)
    idx = _resample_index(n, n_boot, seed)
    deltas = metric.fn(_take(cand, idx)) - metric.fn(_take(base, idx))
    a = (1 - level) / 2
    lo, hi = float(np.quantile(deltas, a)), float(np.quantile(deltas, 1 - a))
    # two-sided bootstrap p-value: how often the resampled change crosses zero
    p = float(min(1.0, 2 * min((deltas <= 0).mean(), (deltas >= 0).mean())))
    d = c - b
    return Comparison(
        metric=metric.name,
        base=b,
        candidate=c,
        delta=d,
        ci=(lo, hi),
        relative=d / b if b else None,
        p_value=p,
        significant=lo > 0 or hi < 0,
        worse=(d < 0) if metric.higher_is_better else (d > 0),
    )


def retention_ratio(metric: Metric, base_value: float, cand_value: float) -> float:
    """candidate / base for higher-is-better metrics, base / candidate otherwise (1.0 = nothing lost)."""
    if metric.higher_is_better:
        return cand_value / base_value if base_value else float("nan")
    # a lower-is-better base of 0 (the base's KL from itself) has no ratio: 0 / x would read as all lost
    return base_value / cand_value if cand_value and base_value else float("nan")


def retention_score(
    tasks: list[tuple[Metric, Columns, Columns, float]], n_boot: int = N_BOOT, seed: int = 0, level: float = 0.95
) -> tuple[float, tuple[float, float]]:
    """Weighted mean over tasks of the retention ratio of each task's main metric, with a bootstrap interval
    (items resampled within each task, paired between base and candidate).

    `tasks`: (metric, base columns, candidate columns, weight). Tasks with no ratio (base score 0) are left out."""
    point = []
    dists = []
    weights = []
    for k, (metric, base, cand, weight) in enumerate(tasks):
        n = len(next(iter(base.values())))
        idx = _resample_index(n, n_boot, seed + k)
        bv, cv = metric.fn(_take(base, idx)), metric.fn(_take(cand, idx))
        dists.append(_ratios(metric, bv, cv))  # a resample with base 0 has no ratio
        point.append(retention_ratio(metric, value(metric, base), value(metric, cand)))
        weights.append(weight)
    # a task whose base score is 0 (for example an exact-match task the base model cannot do at all) has no
    # ratio: it is left out of the score rather than turning it into NaN
    keep = [i for i, p in enumerate(point) if np.isfinite(p)]
    if not keep:
        return float("nan"), (float("nan"), float("nan"))
    w = np.asarray([weights[i] for i in keep], dtype=float)
    w = w / w.sum()
    score = float(np.dot(w, [point[i] for i in keep]))
    dist = (w[:, None] * np.stack([dists[i] for i in keep])).sum(axis=0)
    a = (1 - level) / 2
    return score, (float(np.nanquantile(dist, a)), float(np.nanquantile(dist, 1 - a)))


# ---------------------------------------------------------------- the score, by ability (definition 2)

#: The retention score's definition, recorded in every comparison and in baseline cache keys.
#: 1: weighted mean over tasks of each task's retention ratio (forgetless <= 0.x).
#: 2: 1 + the mean over abilities of each ability's relative change; tasks weigh equally within an ability
#:    (their `weight` is a within-ability weight); a task without `ability:` is an ability of its own,
#:    weighted by its `weight`, so a suite without abilities scores exactly as under definition 1.
SCORE_VERSION = 2
#: The abilities of the built-in `general` suite (equal weight). Custom suites may name others.
ABILITIES = ("knowledge", "commonsense", "language_modelling", "own_distribution", "basic_skills")


def _ratio_dist(metric: Metric, base: Columns, cand: Columns, n_boot: int, seed: int) -> np.ndarray:
    n = len(next(iter(base.values())))
    idx = _resample_index(n, n_boot, seed)
    bv, cv = metric.fn(_take(base, idx)), metric.fn(_take(cand, idx))
    return _ratios(metric, bv, cv)


def _ratios(metric: Metric, bv: np.ndarray, cv: np.ndarray) -> np.ndarray:
    """retention_ratio over resamples: NaN where the base is 0 (no ratio, either orientation)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = cv / bv if metric.higher_is_better else bv / cv
    return np.where(np.isfinite(ratio) & (bv != 0), ratio, np.nan)


def ability_score(
    tasks: list[tuple[str, Metric, Columns, Columns, float, str | None]], n_boot: int = N_BOOT, seed: int = 0,
    level: float = 0.95
) -> dict:
    """The retention score (definition 2) with each ability's change, their paired bootstrap intervals, and
    each task's share of the score's item-resampling variance.

    `tasks`: (name, main metric, base columns, candidate columns, weight, ability or None). Items are resampled
    within each task (seed + task index, as `retention_score`), the same resamples for base and candidate and for
    the abilities and the score, so an ability's interval and the score's come from one joint distribution.
    Tasks with no ratio (base score 0) are left out. Returns {score, ci, abilities: {name: {change, ci, tasks,
    weight}}, tasks: {name: {ability, retention, weight_in_score, half_width, variance_share}}}."""
    a = (1 - level) / 2
    point, dists = {}, {}
    for k, (name, metric, base, cand, _w, _ab) in enumerate(tasks):
        point[name] = retention_ratio(metric, value(metric, base), value(metric, cand))
        dists[name] = _ratio_dist(metric, base, cand, n_boot, seed + k)
    keep = [t for t in tasks if np.isfinite(point[t[0]])]
    nan2 = (float("nan"), float("nan"))
    if not keep:
        return {"score": float("nan"), "ci": nan2, "abilities": {}, "tasks": {}}
    groups: dict[str, list[tuple[str, float]]] = {}
    ability_weight: dict[str, float] = {}
    for name, _m, _b, _c, w, ab in keep:
        key = ab or name
        groups.setdefault(key, []).append((name, w))
        ability_weight[key] = 1.0 if ab else w
    total = sum(ability_weight.values())
    abilities: dict[str, dict[str, Any]] = {}
    task_out: dict[str, dict[str, Any]] = {}
    score_dist = np.zeros(n_boot)
    contrib_var = {}
    for key, members in groups.items():
        wsum = sum(w for _, w in members)
        ab_dist = sum((w / wsum) * dists[n] for n, w in members)
        ab_point = sum((w / wsum) * point[n] for n, w in members)
        abilities[key] = {
            "change": ab_point - 1,
            "ci": (float(np.nanquantile(ab_dist, a)) - 1, float(np.nanquantile(ab_dist, 1 - a)) - 1),
            "tasks": [n for n, _ in members], "weight": ability_weight[key] / total,
        }
        score_dist = score_dist + (ability_weight[key] / total) * ab_dist
        for n, w in members:
            wt = ability_weight[key] / total * w / wsum
            contrib_var[n] = wt**2 * float(np.nanvar(dists[n]))
            task_out[n] = {"ability": key, "retention": point[n], "weight_in_score": wt}
    var_total = sum(contrib_var.values())
    z = NormalDist().inv_cdf((1 + level) / 2)
    for n, v in contrib_var.items():
        # no variance at all (a model scored against itself): no task has a share of it; None, not NaN (NaN !=
        # NaN, and it is no JSON value)
        task_out[n]["variance_share"] = v / var_total if var_total > 0 else None
        task_out[n]["half_width"] = z * float(np.nanstd(dists[n]))  # the task's own ratio, 95% (normal approximation)
    score = sum(ability_weight[k] / total * (abilities[k]["change"] + 1) for k in abilities)
    return {
        "score": float(score), "ci": (float(np.nanquantile(score_dist, a)), float(np.nanquantile(score_dist, 1 - a))),
        "abilities": abilities, "tasks": task_out,
    }


def budget_check(score: float, ci: tuple[float, float] | list[float], budget: float | None) -> dict:
    """A retention score against a forgetting budget, both ways: the point estimate of the drop (1 - score) is
    within the budget, and the budget holds with 95% confidence (the drop's upper bound, 1 - the score's lower
    bound, is within it). Callers say which of the two they act on."""
    drop, drop_hi = 1 - score, 1 - ci[0]
    out = {"drop": drop, "drop_upper": drop_hi, "budget": budget}
    if budget is not None:
        out["within_budget"] = bool(drop <= budget)
        out["within_budget_95"] = bool(drop_hi <= budget)
    return out
