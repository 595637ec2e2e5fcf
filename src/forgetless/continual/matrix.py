"""The score matrix R[i][j] (task j after step i; row 0 the base model) with paired bootstrap intervals, and the
continual-learning metrics computed from it (average accuracy, BWT, FWT, forgetting)."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import ForgetlessError
from .sequence import TaskSpec

N_BOOT = 1000


def metric_of(result: Any, spec: TaskSpec) -> tuple[Any, float]:
    """The metric that scores `spec`'s task, and the sign that makes higher better."""
    name = spec.metric or result.main
    names = [m.name for m in result.metrics]
    if name not in names:
        raise ForgetlessError(f"task {spec.name}: metric {name!r} is not reported by its eval task (kind "
                              f"{result.kind}); valid: {', '.join(names)}")
    m = result.metric(name)
    return m, 1.0 if m.higher_is_better else -1.0


def sequence_metrics(R: np.ndarray, t: int | None = None) -> dict[str, np.ndarray | None]:
    """Continual-learning metrics from a score matrix R[..., i, j] (row 0: the base model; row i: after step i,
    which trained task i (column i - 1); higher is better), after step t (default: the last row).

    average_accuracy = mean_{j <= t} R[t][j]; bwt = mean_{j < t} (R[t][j] - R[j][j]);
    fwt = mean_{2 <= j <= t} (R[j-1][j] - R[0][j]); forgetting = mean_{j < t} (max_{j <= l < t} R[l][j] - R[t][j])
    (tasks 1-based). Leading dimensions (bootstrap resamples) are kept."""
    t = R.shape[-2] - 1 if t is None else t
    out: dict[str, np.ndarray | None] = {"average_accuracy": None, "bwt": None, "fwt": None, "forgetting": None}
    if t >= 1:
        out["average_accuracy"] = R[..., t, :t].mean(-1)
    if t >= 2:
        j = np.arange(t - 1)  # 0-based columns of the tasks trained before step t
        out["bwt"] = (R[..., t, j] - R[..., j + 1, j]).mean(-1)
        k = np.arange(1, t)
        out["fwt"] = (R[..., k, k] - R[..., 0, k]).mean(-1)
        out["forgetting"] = np.stack([R[..., c + 1 : t, c].max(-1) - R[..., t, c] for c in j], -1).mean(-1)
    return out


def score_matrix(rows: list[dict[str, Any]], specs: list[TaskSpec], n_boot: int = N_BOOT, seed: int = 0
                 ) -> tuple[np.ndarray, np.ndarray]:
    """R[i][j] and its bootstrap resamples B[b][i][j] from per-item results (rows[i][task] = TaskResult).
    Items are resampled once per task and the same resample is used in every row (paired across steps)."""
    R = np.full((len(rows), len(specs)), np.nan)
    B = np.full((n_boot, len(rows), len(specs)), np.nan)
    for j, spec in enumerate(specs):
        first = rows[0][spec.name]
        idx = np.random.default_rng(seed + j).integers(0, first.n, size=(n_boot, first.n))
        for i, row in enumerate(rows):
            r = row[spec.name]
            if r.item_ids != first.item_ids:
                raise ForgetlessError(f"task {spec.name}: step {i} was scored on other items than the base model; "
                                      "the evaluation data changed: run again with --overwrite")
            m, sign = metric_of(r, spec)
            R[i, j] = sign * float(m.fn(r.columns))
            B[:, i, j] = sign * m.fn({c: v[idx] for c, v in r.columns.items()})
    return R, B


def _ci(dist: np.ndarray) -> list[float]:
    return [float(np.nanquantile(dist, 0.025)), float(np.nanquantile(dist, 0.975))]


def summarize(R: np.ndarray, B: np.ndarray) -> dict[str, Any]:
    """Matrix with intervals, final metrics and their trajectory over steps, as JSON-ready values."""
    def with_ci(point: dict, dist: dict) -> dict:
        return {k: (None if v is None else {"value": float(v), "ci": _ci(dist[k])}) for k, v in point.items()}

    traj = [{"step": t, **with_ci(sequence_metrics(R, t), sequence_metrics(B, t))} for t in range(R.shape[0])]
    return {
        "score": R.tolist(),
        "ci": [[_ci(B[:, i, j]) for j in range(R.shape[1])] for i in range(R.shape[0])],
        "metrics": {k: v for k, v in traj[-1].items() if k != "step"},
        "trajectory": traj,
    }


def fmt_interval(m: dict[str, Any] | None, pct: bool = False) -> str:
    """A metric with its interval, as `+0.123 [+0.100, +0.150]` (or percent)."""
    if not m:
        return "-"
    f = (lambda x: f"{100 * x:+.2f}%") if pct else (lambda x: f"{x:+.3f}")
    return f"{f(m['value'])} [{f(m['ci'][0])}, {f(m['ci'][1])}]"
