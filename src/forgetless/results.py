"""Results computed from evaluation reports (the `comparison` of `forgetless eval`'s JSON), shared by the sweep,
the continual sequence, the reports and the benches: a task's gain and the retention change, as typed records
that serialise to the dictionaries sweep.json, continual.json and the reports have always held."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class TaskGain:
    """The change of a comparison's first task, oriented so that positive is better, with its paired interval."""

    task: str
    metric: str
    base: float
    candidate: float
    gain: float
    ci: list[float]
    significant: bool

    @classmethod
    def of(cls, cmp: dict[str, Any]) -> TaskGain:
        name, t = next(iter(cmp["tasks"].items()))
        sign = 1.0 if t["higher_is_better"] else -1.0
        lo, hi = (sign * t["ci"][0], sign * t["ci"][1])
        return cls(task=name, metric=t["main"], base=t["base"], candidate=t["candidate"], gain=sign * t["delta"],
                   ci=[min(lo, hi), max(lo, hi)], significant=t["significant"])

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class RetentionChange:
    """A retention comparison as a change from the base model: score - 1 (0 = nothing lost, -0.01 = 1% lost), with
    its paired interval shifted alike, the abilities' changes, the significant drops and the per-task entries."""

    score: float
    change: float
    ci: list[float]
    score_definition: int
    abilities: dict[str, Any]
    significant_drops: list[str]
    tasks: dict[str, dict[str, Any]]

    @classmethod
    def of(cls, cmp: dict[str, Any]) -> RetentionChange:
        return cls(score=cmp["retention_score"], change=cmp["retention_score"] - 1,
                   ci=[cmp["retention_ci"][0] - 1, cmp["retention_ci"][1] - 1],
                   score_definition=cmp.get("score_definition", 1), abilities=cmp.get("abilities") or {},
                   significant_drops=cmp["significant_drops"], tasks=cmp["tasks"])

    def as_dict(self, *keys: str, task_fields: tuple[str, ...] | None = None) -> dict[str, Any]:
        """The named fields in that order (each record keeps the layout its file always had); `tasks` cut to
        `task_fields` per task (all of each task's comparison entry when None)."""
        out: dict[str, Any] = {}
        for k in keys:
            v = getattr(self, k)
            if k == "tasks" and task_fields is not None:
                v = {name: {x: t[x] for x in task_fields} for name, t in v.items()}
            out[k] = v
        return out


def task_gain(cmp: dict[str, Any]) -> dict[str, Any]:
    """The first task's change oriented so that positive is better, with its paired interval (TaskGain as a dict)."""
    return TaskGain.of(cmp).as_dict()


def ability_names(rows: list[dict[str, Any]]) -> list[str]:
    """The abilities any row reports, in first-seen order."""
    names: list[str] = []
    for r in rows:
        for ab in (r["retention"].get("abilities") or {}):
            if ab not in names:
                names.append(ab)
    return names
