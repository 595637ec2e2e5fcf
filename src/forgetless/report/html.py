"""report.html for a run or a sweep directory (a sequence directory's report is report/continual.py's)."""

from __future__ import annotations

from pathlib import Path

from .. import faults
from ..io import atomic_write_text
from .continual import write_continual_report
from .gather import gather, layer_drift, read_json, read_jsonl, retention_tables
from .plots import curves_plot, drift_plot, frontier_plot

TEMPLATE = "templates/report.html.j2"


def build_report(path: str | Path, drift: bool = True) -> str:
    """The report's HTML text."""
    import jinja2

    info = gather(Path(path))
    runs = []
    for d in info["runs"]:
        summary = read_json(d / "summary.json") or {}
        dr = layer_drift(d) if drift else None
        runs.append({
            "name": d.name, "dir": str(d), "summary": summary,
            "curves": curves_plot(d, d.name),
            "drift": drift_plot(dr, d.name) if dr else None,
            "drift_note": None if dr else "base model not available to compare against",
            "guard_events": [r for r in read_jsonl(d / "metrics.jsonl") if "guard" in r],
            "selection": (summary.get("guard") or {}).get("selection"),
        })
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("forgetless", "templates"), autoescape=jinja2.select_autoescape(["html", "j2"]),
        undefined=jinja2.StrictUndefined,
    )
    env.filters["pct"] = lambda x: "-" if x is None else f"{100 * x:+.2f}%"
    env.filters["num"] = lambda x: "-" if x is None else (f"{x:.4f}" if abs(x) < 100 else f"{x:.1f}")
    return env.get_template("report.html.j2").render(
        title=info["title"], kind=info["kind"], rows=info["rows"], budget=info["budget"],
        recommended=info["recommended"], decide_on=info["decide_on"], abilities=info["abilities"],
        frontier=frontier_plot(info["rows"], info["budget"], info["recommended"]),
        runs=runs, tables=retention_tables(info["runs"]),
    )


def write_report(path: str | Path, out: str | Path | None = None, drift: bool = True) -> Path:
    """Write report.html into the run, sweep or sequence directory (or `out`); returns its path."""
    if (Path(path) / "continual.json").is_file():
        return write_continual_report(path, out=out)
    target = Path(out) if out else Path(path) / "report.html"
    html = build_report(path, drift=drift)
    faults.point("report")
    atomic_write_text(target, html)
    return target
