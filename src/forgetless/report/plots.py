"""The reports' plots, as base64 PNG text for inlining: the forgetting frontier, training curves, layer drift."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

from .gather import read_jsonl


def png(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def pareto(points: list[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """Points not dominated in (retention change, task gain), both higher-is-better, ordered by retention."""
    front = [p for p in points
             if not any(q[0] >= p[0] and q[1] >= p[1] and (q[0] > p[0] or q[1] > p[1]) for q in points)]
    return sorted(front)


def frontier_line(rows: list[dict[str, Any]]) -> list[tuple[float, float, str]]:
    """The frontier the plot draws: runs not dominated by another run, as (retention change %, gain, run).
    The base model is the plot's reference point, not a candidate, so the line never runs to it."""
    return pareto([(100 * r["retention"]["change"], r["task"]["gain"], r["run"]) for r in rows if r.get("task")])


def frontier_plot(rows: list[dict[str, Any]], budget: float | None, recommended: str | None) -> str | None:
    rows = [r for r in rows if r.get("task")]
    if not rows:
        return None
    plt = pyplot()
    from matplotlib.colors import to_rgba

    fig, ax = plt.subplots(figsize=(7.5, 5))
    pts = [(0.0, 0.0, "base")]
    for r in rows:
        color = "tab:green" if r["run"] == recommended else "tab:blue"
        x, y = 100 * r["retention"]["change"], r["task"]["gain"]
        xl, xh = 100 * r["retention"]["ci"][0], 100 * r["retention"]["ci"][1]
        yl, yh = r["task"]["ci"]
        ax.errorbar([x], [y], xerr=[[max(0, x - xl)], [max(0, xh - x)]], yerr=[[max(0, y - yl)], [max(0, yh - y)]],
                    fmt="o", capsize=3, color=color, ecolor=to_rgba(color, 0.45), elinewidth=1)
        pts.append((x, y, r["run"]))
    ax.plot([0], [0], "s", color="black")
    front = frontier_line(rows)
    ax.plot([p[0] for p in front], [p[1] for p in front], "--", color="tab:orange", label="frontier")
    if budget:
        ax.axvline(-100 * budget, color="tab:red", linestyle=":", label=f"budget (-{100 * budget:.3g}%)")
    metric = rows[0]["task"]["metric"]
    ax.set_xlabel("retention change, % (right is better; 0 = nothing lost)")
    ax.set_ylabel(f"task gain ({rows[0]['task']['task']} {metric}, higher is better)")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    ax.set_title("Forgetting frontier: task gain vs retention change (95% intervals)")
    place_labels(ax, [(x, y, name + (" (recommended)" if name == recommended else "")) for x, y, name in pts])
    return png(fig)


def place_labels(ax: Any, points: list[tuple[float, float, str]], fontsize: float = 8) -> list[Any]:
    """Label each (x, y, text) point where its text overlaps no label placed before it, no other point and
    stays inside the axes: positions are tried on rings of growing radius around the point, and a label set
    away from its point gets a thin leader line. Where no position is free, the least-overlapping one is used.
    Call after the axes' limits are final (labels are laid out in display coordinates)."""
    import math

    fig = ax.figure
    fig.canvas.draw()  # settles the autoscaled limits the layout below depends on
    renderer = fig.canvas.get_renderer()
    inside = ax.get_window_extent(renderer)
    from matplotlib.transforms import Bbox

    r_mark = 4.0 * fig.dpi / 72  # a marker's half width, in pixels
    marks = [Bbox.from_extents(mx - r_mark, my - r_mark, mx + r_mark, my + r_mark)
             for mx, my in (ax.transData.transform((x, y)) for x, y, _ in points)]
    placed: list[Any] = []
    anns = []

    def shared(a: Any, b: Any) -> float:
        both = Bbox.intersection(a, b)
        return 0.0 if both is None else both.width * both.height

    def overlap(bb: Any) -> float:
        outside = bb.width * bb.height - shared(bb, inside)
        return sum(shared(bb, o) for o in placed + marks) + 10 * outside

    candidates = [(r * math.cos(math.radians(a)), r * math.sin(math.radians(a)))
                  for r in (7, 14, 24, 36, 50, 66) for a in (30, -30, 150, -150, 0, 180, 90, -90, 60, -60, 120, -120)]
    order = sorted(range(len(points)), key=lambda i: (-points[i][1], points[i][0]))  # top to bottom
    for i in order:
        x, y, text = points[i]
        best: tuple[float, Any, Any, float] | None = None
        for dx, dy in candidates:
            ha = "left" if dx > 1e-9 else "right" if dx < -1e-9 else "center"
            va = "bottom" if dy > 1e-9 else "top" if dy < -1e-9 else "center"
            ann = ax.annotate(text, (x, y), textcoords="offset points", xytext=(dx, dy), fontsize=fontsize, ha=ha,
                              va=va)
            bb = ann.get_window_extent(renderer)
            cost = overlap(bb)
            if best is None or cost < best[0]:
                if best is not None:
                    best[1].remove()
                best = (cost, ann, bb, math.hypot(dx, dy))
            else:
                ann.remove()
            if cost == 0:
                break
        assert best is not None  # candidates is not empty: the first one is always kept
        _, ann, bb, dist = best
        if dist > 10:
            ann.remove()
            ann = ax.annotate(text, (x, y), textcoords="offset points", xytext=ann.xyann, fontsize=fontsize,
                              ha=ann.get_ha(), va=ann.get_va(),
                              arrowprops={"arrowstyle": "-", "color": "0.6", "lw": 0.6})
        placed.append(bb)
        anns.append(ann)
    return anns


def curves_plot(run_dir: Path, name: str) -> str | None:
    recs = read_jsonl(run_dir / "metrics.jsonl")
    if not recs:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    loss = [(r["step"], r["loss"]) for r in recs if "loss" in r]
    ev = [(r["step"], r["eval_loss"]) for r in recs if "eval_loss" in r]
    if loss:
        ax.plot(*zip(*loss, strict=True), label="train loss", color="tab:blue")
    if ev:
        ax.plot(*zip(*ev, strict=True), "o-", label="validation loss", color="tab:purple")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    probes = [(r["step"], r["fl_retention"], r.get("fl_retention_lo"), r.get("fl_retention_hi")) for r in recs
              if "fl_retention" in r]
    if probes and probes[0][0] > 0:
        probes.insert(0, (0, 1.0, 1.0, 1.0))  # the monitor's reference: the model at the start, by definition
    handles, labels = ax.get_legend_handles_labels()
    if probes:
        ax2 = ax.twinx()
        s, v, lo, hi = zip(*probes, strict=True)
        ax2.plot(s, v, "s-", color="tab:green", label="monitor retention")
        if all(x is not None for x in lo + hi):
            ax2.fill_between(s, lo, hi, color="tab:green", alpha=0.15)
        ax2.set_ylabel("retention score (1 = base)")
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    for r in recs:
        if "guard" in r:
            ax.axvline(r["step"], color="tab:red", linestyle=":", alpha=0.8)
            ax.annotate(r["guard"], (r["step"], ax.get_ylim()[1]), fontsize=7, color="tab:red", rotation=90, va="top")
    ax.legend(handles, labels, loc="upper right", fontsize=8)
    ax.set_title(f"{name}: training")
    ax.grid(alpha=0.3)
    return png(fig)


def drift_plot(drift: dict[str, Any], name: str) -> str:
    plt = pyplot()
    n = len(drift["blocks"])
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * n + 2), 3.5))
    xs = range(n)
    ax.bar(xs, [100 * v for v in drift["relative_change"]], color="tab:blue", label="relative weight change")
    ax.set_xticks(list(xs), drift["blocks"], rotation=70, fontsize=7)
    ax.set_ylabel("||dW|| / ||W_base||, %")
    if drift.get("fisher_penalty"):
        ax2 = ax.twinx()
        ax2.plot(list(xs), drift["fisher_penalty"], "o-", color="tab:red", label="Fisher-weighted (EWC penalty)")
        ax2.set_ylabel("sum F dW^2")
    ax.set_title(f"{name}: layer-wise drift from the base model")
    ax.grid(alpha=0.3, axis="y")
    return png(fig)
