"""Results computed from evaluation reports, shared by the sweep, the reports and the benches: the task gain of
a comparison and the abilities a table of rows reports."""

from __future__ import annotations

from typing import Any


def task_gain(cmp: dict[str, Any]) -> dict[str, Any]:
    """The first task's change oriented so that positive is better, with its paired interval."""
    name, t = next(iter(cmp["tasks"].items()))
    sign = 1.0 if t["higher_is_better"] else -1.0
    lo, hi = (sign * t["ci"][0], sign * t["ci"][1])
    return {
        "task": name, "metric": t["main"], "base": t["base"], "candidate": t["candidate"],
        "gain": sign * t["delta"], "ci": [min(lo, hi), max(lo, hi)], "significant": t["significant"],
    }


def ability_names(rows: list[dict[str, Any]]) -> list[str]:
    """The abilities any row reports, in first-seen order."""
    names: list[str] = []
    for r in rows:
        for ab in (r["retention"].get("abilities") or {}):
            if ab not in names:
                names.append(ab)
    return names
