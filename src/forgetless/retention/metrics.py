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


def bootstrap_ci(metric: Metric, cols: Columns, n_boot: int = N_BOOT, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
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
    return base_value / cand_value if cand_value else float("nan")


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
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = cv / bv if metric.higher_is_better else bv / cv
        dists.append(np.where(np.isfinite(ratio), ratio, np.nan))  # a resample with base 0 has no ratio
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
