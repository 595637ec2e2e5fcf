"""Verdicts on the forgetting frontier: does a candidate recipe get full fine-tuning's task gain without its
forgetting? Decided by paired intervals over the same items and over training seeds.

For a candidate c, tuned full fine-tuning f and tuned LoRA l, each trained with the same seeds and scored on the
same items:

- R = gain(c) / gain(f), the share of full FT's task gain the candidate keeps. Per seed s, gain is the task's
  main metric's change from the base model (oriented so that positive is better) and R_s is its ratio to full
  FT's gain with the same seed; its item interval is a percentile bootstrap that resamples the task's items
  jointly for the base model, the candidate and full FT (the ratio's numerator and denominator share items).
- D = the candidate's retention drop in points, 100 x (1 - retention score), per seed with the score's paired
  item interval.
- Over seeds, each of R and D is the mean over seeds with the interval of `seeds.combine_seeds`: Student's t
  over the seed values and the shared item noise, added in quadrature.

The rules (the `1%` budget and the `0.98` share are arguments):

- **MET** when lower(R) >= 0.98 and upper(D) <= 1 and D <= D(LoRA) (point estimates for the last);
- **NOT MET** when upper(R) < 0.98 or lower(D) > 1;
- **INCONCLUSIVE** otherwise: the intervals admit both.

A tie is not a win: a candidate whose every seed scored exactly as a baseline's (the same per-item values on the
task and on retention, say a guard that never acted) is no candidate (`identical`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import metrics as M
from .seeds import combine_seeds
from .tasks import TaskResult

SHARE = 0.98  # of full FT's gain
BUDGET_POINTS = 1.0  # retention drop, points (100 x (1 - score))


def _oriented(r: TaskResult) -> tuple[M.Metric, float]:
    m = r.main_metric
    return m, (1.0 if m.higher_is_better else -1.0)


def gain_ratio(base: TaskResult, cand: TaskResult, full: TaskResult, *, n_boot: int = M.N_BOOT, seed: int = 0,
               level: float = 0.95) -> dict[str, Any]:
    """R = gain(cand) / gain(full) on one task and one seed, with its paired percentile bootstrap interval over the
    task's items (one resampling of the items for all three models)."""
    for r in (cand, full):
        if r.item_ids != base.item_ids:
            raise ValueError(f"task {base.task}: {r.task} was scored on other items than the base model")
    metric, sign = _oriented(cand)
    b, c, f = (M.value(metric, r.columns) for r in (base, cand, full))
    g_c, g_f = sign * (c - b), sign * (f - b)
    if not g_f > 0:
        raise ValueError(f"task {base.task}: full fine-tuning gained nothing ({g_f:+.4g}); no share of its gain "
                         "can be computed")
    n = len(base.item_ids)
    idx = M._resample_index(n, n_boot, seed)
    vb, vc, vf = (metric.fn(M._take(r.columns, idx)) for r in (base, cand, full))
    den = sign * (vf - vb)
    with np.errstate(divide="ignore", invalid="ignore"):
        dist = np.where(den > 0, sign * (vc - vb) / den, np.nan)
    a = (1 - level) / 2
    undefined = float(np.isnan(dist).mean())
    if undefined > a:  # the interval would reach a resample where full FT gained nothing: unbounded
        lo, hi = -math.inf, math.inf
    else:
        lo, hi = (float(np.nanquantile(dist, q)) for q in (a, 1 - a))
    return {"ratio": g_c / g_f, "ci": [lo, hi], "gain": g_c, "full_gain": g_f, "undefined_share": undefined}


def retention_drop(comparison: dict[str, Any]) -> dict[str, Any]:
    """D in points, 100 x (1 - score), with the score's paired interval turned alike (from a `compare` dict)."""
    s, (lo, hi) = comparison["retention_score"], comparison["retention_ci"]
    return {"drop": 100 * (1 - s), "ci": [100 * (1 - hi), 100 * (1 - lo)]}


def over_seeds(per_seed: Sequence[dict[str, Any]], key: str) -> dict[str, Any]:
    """The mean over seeds of per_seed[i][key] with the seeds-and-items interval (seeds.combine_seeds)."""
    return combine_seeds([p[key] for p in per_seed], [p["ci"] for p in per_seed])


def identical(a: Sequence[dict[str, TaskResult]], b: Sequence[dict[str, TaskResult]]) -> bool:
    """Whether two recipes' runs scored exactly alike, seed by seed and item by item (every task, every column)."""
    if len(a) != len(b):
        return False
    for ra, rb in zip(a, b, strict=True):
        if set(ra) != set(rb):
            return False
        for name, ta in ra.items():
            tb = rb[name]
            if ta.item_ids != tb.item_ids or set(ta.columns) != set(tb.columns):
                return False
            if not all(np.array_equal(ta.columns[k], tb.columns[k]) for k in ta.columns):
                return False
    return True


def decide(r: dict[str, Any], d: dict[str, Any], lora_drop: float | None, *, share: float = SHARE,
           budget: float = BUDGET_POINTS) -> str:
    """MET / NOT MET / INCONCLUSIVE from R's and D's intervals (over seeds) and LoRA's D (the module's rules)."""
    (r_lo, r_hi), (d_lo, d_hi) = r["ci"], d["ci"]
    if r_hi < share or d_lo > budget:
        return "NOT MET"
    if r_lo >= share and d_hi <= budget and lora_drop is not None and d["mean"] <= lora_drop:
        return "MET"
    return "INCONCLUSIVE"


@dataclass
class Verdict:
    """One candidate's verdict with what it rests on (R and D over seeds, per-seed values, LoRA's D)."""

    recipe: str
    verdict: str
    ratio: dict[str, Any]
    drop: dict[str, Any]
    lora_drop: float | None
    per_seed: list[dict[str, Any]] = field(default_factory=list)
    why: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"recipe": self.recipe, "verdict": self.verdict, "ratio": self.ratio, "drop": self.drop,
                "lora_drop": self.lora_drop, "per_seed": self.per_seed, "why": self.why}


def judge(recipe: str, base_task: TaskResult, cand_task: Sequence[TaskResult], full_task: Sequence[TaskResult],
          cand_retention: Sequence[dict[str, Any]], lora_retention: Sequence[dict[str, Any]], *,
          share: float = SHARE, budget: float = BUDGET_POINTS) -> Verdict:
    """The verdict of one candidate: `cand_task[i]` and `full_task[i]` are the task results of training seed i (the
    same seeds, in the same order), `cand_retention` / `lora_retention` the retention comparisons per seed."""
    if not (len(cand_task) == len(full_task) == len(cand_retention)) or not cand_task:
        raise ValueError(f"{recipe}: the candidate, full FT and the retention comparisons need the same seeds "
                         f"({len(cand_task)}, {len(full_task)}, {len(cand_retention)})")
    per_seed: list[dict[str, Any]] = []
    for i, (c, f, ret) in enumerate(zip(cand_task, full_task, cand_retention, strict=True)):
        per_seed.append({"seed_index": i, "ratio": gain_ratio(base_task, c, f, seed=i),
                         "drop": retention_drop(ret)})
    r = over_seeds([p["ratio"] for p in per_seed], "ratio")
    d = over_seeds([p["drop"] for p in per_seed], "drop")
    lora = (sum(retention_drop(x)["drop"] for x in lora_retention) / len(lora_retention)) if lora_retention else None
    v = decide(r, d, lora, share=share, budget=budget)
    why = (f"R {r['mean']:.3f} [{r['ci'][0]:.3f}, {r['ci'][1]:.3f}] (needs lower >= {share}), "
           f"D {d['mean']:.2f} [{d['ci'][0]:.2f}, {d['ci'][1]:.2f}] points (needs upper <= {budget:g}"
           + (f" and D <= LoRA's {lora:.2f})" if lora is not None else "; no LoRA row)")
           + f", {len(per_seed)} seed{'s' if len(per_seed) != 1 else ''}")
    return Verdict(recipe, v, r, d, lora, per_seed, why)
