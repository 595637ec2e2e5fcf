"""Results over several training seeds: one interval that holds both the evaluation's item noise and the
seed-to-seed spread of training.

Each seed's run is scored on the same evaluation items and has a paired item-bootstrap interval. Over k
seeds the row reports the mean, and an interval for the expected value over training seeds and items:

    V = s^2 / k  +  se_item^2

- s^2 / k: the seed component, s the sample standard deviation of the k per-seed values (it also holds the
  part of the item noise that differs between seeds);
- se_item: the item component, the mean over seeds of each seed's item standard error (its 95% bootstrap
  interval's width / (2 x 1.96)). The seeds are scored on the *same* items, so this part of the noise is
  shared by every seed and does not average away over seeds: it has to be added, not divided by k. Taking
  the mean of the per-seed errors is the fully correlated case, a slight overestimate where the seeds'
  item errors are partly independent.

The half-width adds the two components' 95% half-widths in quadrature:

    half = sqrt( (t(k-1) x s / sqrt(k))^2 + (1.96 x se_item)^2 )

t(k-1) is Student's t quantile with k - 1 degrees of freedom (4.30 at 3 seeds, 2.26 at 10): with the seed
spread dominating this is the exact t interval of a mean of k values; with the item noise dominating it
tends to the item interval. In between it is somewhat conservative. Why not a bootstrap over seeds: 3 seeds
have only 10 distinct resamples, and a percentile interval over them covers the truth far less than 95% of
the time (the bootstrap spread of a mean of 3 is s/sqrt(3) x sqrt(2/3); in a simulation on normal data its
percentile interval covered the truth 74% of the time at 3 seeds, 90% at 10). Why not a Welch-Satterthwaite df
(estimated from s itself): at 3 seeds it under-covered (92%) in our simulation whenever the seed spread dominates, since
a small s by chance also buys a small t. Coverage on synthetic data with a known truth (tests/test_seeds.py, 80% of the
item noise shared by the seeds): 95.6-98.5% at 3 seeds and 95.6-97.4% at 10 seeds over regimes from seed-dominated to
item-dominated; the conservative end is the item-dominated case at 3 seeds, where the per-seed values'
spread also carries their unshared item noise and is multiplied by t(2).

One seed: the item interval alone, and the row is marked as single-seed: it says nothing about how much a
different seed would move the result.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import NormalDist
from typing import Any

Z95 = NormalDist().inv_cdf(0.975)


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularised incomplete beta function (modified Lentz)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1, a - 1
    c, d = 1.0, 1 - qab * x / qap
    d = 1 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1 + aa * d
            d = 1 / (d if abs(d) > tiny else tiny)
            c = 1 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    lbt = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1) / (a + b + 2):
        return math.exp(lbt) * _betacf(a, b, x) / a
    return 1 - math.exp(lbt) * _betacf(b, a, 1 - x) / b


def t_cdf(t: float, df: float) -> float:
    """Student's t distribution function (any real df > 0)."""
    tail = 0.5 * _betainc(df / 2, 0.5, df / (df + t * t))
    return 1 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The p-quantile (p > 0.5) of Student's t with df > 0 degrees of freedom (safeguarded Newton on t_cdf)."""
    if not math.isfinite(df) or df > 1e6:
        return NormalDist().inv_cdf(p)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, hi * 2
    q = 0.5 * (lo + hi)
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    for _ in range(100):
        f = t_cdf(q, df) - p
        if abs(f) < 1e-13:
            break
        if f > 0:
            hi = q
        else:
            lo = q
        step = q - f / math.exp(log_norm - (df + 1) / 2 * math.log1p(q * q / df))
        q = step if lo < step < hi else 0.5 * (lo + hi)
    return q


def combine_seeds(values: Sequence[float], item_cis: Sequence[Sequence[float]], level: float = 0.95) -> dict[str, Any]:
    """Mean over seeds of `values` with an interval combining the seed spread (t-based) and the item noise
    (from each seed's item interval `item_cis`), as the module docstring explains."""
    k = len(values)
    if k == 0:
        raise ValueError("combine_seeds needs at least one seed")
    z = NormalDist().inv_cdf((1 + level) / 2)
    mean = sum(values) / k
    if k == 1:
        lo, hi = item_cis[0]
        return {"mean": mean, "ci": [float(lo), float(hi)], "n_seeds": 1, "seed_sd": None,
                "item_se": (hi - lo) / (2 * z), "df": None, "method": "one seed: item interval only"}
    se_item = sum((hi - lo) / (2 * z) for lo, hi in item_cis) / k
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (k - 1))
    t = t_quantile((1 + level) / 2, k - 1)
    half = math.sqrt((t * sd / math.sqrt(k)) ** 2 + (z * se_item) ** 2)
    return {"mean": mean, "ci": [mean - half, mean + half], "n_seeds": k, "seed_sd": sd, "item_se": se_item,
            "seed_half_width": t * sd / math.sqrt(k), "item_half_width": z * se_item,
            "method": f"t over {k} seeds (df {k - 1}) and shared item noise, half-widths added in quadrature"}
