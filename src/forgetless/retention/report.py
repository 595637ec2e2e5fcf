"""Rich tables for `forgetless eval`."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table


def _fmt(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.4f}" if abs(v) < 100 else f"{v:.1f}"


def print_report(report: dict[str, Any], console: Console | None = None) -> None:
    import sys

    console = console or Console(width=None if sys.stdout.isatty() else 150)
    cand = report["candidate"]
    cmp = report.get("comparison")
    title = f"{report['suite']} suite: {report['model']}" + (f"  vs  {report['baseline']}" if report.get("baseline")
                                                             else "")
    t = Table(title=title)
    for col in ("task", "ability", "metric", "n"):
        t.add_column(col)
    if cmp:
        for col in ("base", "candidate", "change", "95% CI of change", "significant?", "flipped"):
            t.add_column(col, justify="right")
    else:
        for col in ("score", "95% CI"):
            t.add_column(col, justify="right")
    for name, c in cand.items():
        main = c["main"]
        if cmp and name in cmp["tasks"]:
            x = cmp["tasks"][name]
            arrow = "" if x["higher_is_better"] else " (lower is better)"
            sig = "[red]drop[/red]" if x["significant_drop"] else ("[green]gain[/green]" if x["significant"]
                                                                   else "noise")
            t.add_row(name, x.get("ability") or "-", main + arrow, str(c["n"]), _fmt(x["base"]), _fmt(x["candidate"]),
                      f"{x['delta']:+.4f}", f"[{x['ci'][0]:+.4f}, {x['ci'][1]:+.4f}]", sig, str(x["flipped"]))
        else:
            lo, hi = c["ci"][main]
            t.add_row(name, c.get("ability") or "-", main, str(c["n"]), _fmt(c["metrics"][main]),
                      f"[{_fmt(lo)}, {_fmt(hi)}]")
    console.print(t)
    if cmp:
        if cmp.get("abilities"):
            console.print(ability_table(cmp))
        lo, hi = cmp["retention_ci"]
        drops = ", ".join(cmp["significant_drops"]) or "none"
        version = cmp.get("score_definition", 1)
        console.print(
            f"retention score {cmp['retention_score']:.4f} (95% CI {lo:.4f}-{hi:.4f}; 1.0 = nothing lost; "
            f"score definition {version}{': mean over abilities' if version >= 2 else ''}); significant drops: {drops}"
        )


def ability_table(cmp: dict[str, Any]) -> Table:
    """Each ability's relative change with its paired interval, its weight, tasks, and share of the score's variance."""
    t = Table(title="retention by ability (the score is 1 + the weighted mean of these changes)")
    for col in ("ability", "tasks", "weight", "change", "95% CI", "share of score variance"):
        t.add_column(col, justify="left" if col in ("ability", "tasks") else "right")
    tasks = cmp["tasks"]
    for name, a in cmp["abilities"].items():
        share = sum(tasks[n].get("variance_share") or 0.0 for n in a["tasks"] if n in tasks)
        t.add_row(name, ", ".join(a["tasks"]), f"{a['weight']:.2f}", f"{100 * a['change']:+.2f}%",
                  f"[{100 * a['ci'][0]:+.2f}%, {100 * a['ci'][1]:+.2f}%]", f"{100 * share:.0f}%")
    return t
