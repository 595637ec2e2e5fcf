"""report.html, matrix.png and trajectory.png for a `forgetless continual` sequence directory (from its
continual.json and its step directories)."""

from __future__ import annotations

import base64
import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..io import atomic_write_text
from .gather import retention_tables
from .plots import curves_plot, pyplot


def matrix_plot(state: dict[str, Any]) -> Any:
    plt = pyplot()
    R = np.asarray(state["matrix"]["score"], dtype=float)
    gain = R - R[0]
    rows, cols = state["matrix"]["rows"], state["matrix"]["columns"]
    fig, ax = plt.subplots(figsize=(1.6 * len(cols) + 2.5, 0.6 * len(rows) + 1.8))
    lim = float(np.nanmax(np.abs(gain))) or 1.0
    im = ax.imshow(gain, cmap="RdBu", vmin=-lim, vmax=lim, aspect="auto")
    for i in range(len(rows)):
        for j in range(len(cols)):
            lo, hi = state["matrix"]["ci"][i][j]
            ax.text(j, i, f"{R[i, j]:.3f}\n[{lo:.3f}, {hi:.3f}]", ha="center", va="center", fontsize=7,
                    fontweight="bold" if i == j + 1 else "normal")
    ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), ["base" if r == "base" else f"after {r}" for r in rows])
    ax.set_xlabel("evaluated on task")
    ax.set_ylabel("model")
    fig.colorbar(im, ax=ax, label="change from the base model (higher is better)")
    scores = {t["score"] for t in state["tasks"]}
    ax.set_title(f"Accuracy matrix R[i][j] ({', '.join(sorted(scores))}; 95% CI); bold: the task just trained")
    return fig


def trajectory_plot(state: dict[str, Any]) -> Any:
    plt = pyplot()
    R = np.asarray(state["matrix"]["score"], dtype=float)
    ci = np.asarray(state["matrix"]["ci"], dtype=float)
    xs = list(range(R.shape[0]))
    labels = state["matrix"]["rows"]
    has_ret = any(e.get("retention") for e in state["trajectory"][1:])
    fig, axes = plt.subplots(1, 2 if has_ret else 1, figsize=(12 if has_ret else 7, 4.2), squeeze=False)
    ax = axes[0][0]
    for j, name in enumerate(state["matrix"]["columns"]):
        ax.errorbar(xs, R[:, j], yerr=[R[:, j] - ci[:, j, 0], ci[:, j, 1] - R[:, j]], fmt="o-", capsize=3, label=name)
    acc = [(e["step"], e["average_accuracy"]["value"]) for e in state["trajectory"] if e["average_accuracy"]]
    if acc:
        ax.plot(*zip(*acc, strict=True), "k--", lw=2, label="average (tasks trained so far)")
    ax.set_xticks(xs, labels, rotation=30, ha="right")
    ax.set_ylabel("score (higher is better)")
    ax.set_title("Every task's score after each step (95% CI)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if has_ret:
        ax2 = axes[0][1]
        pts = [(e["step"], 100 * e["retention"]["change"], 100 * e["retention"]["ci"][0], 100 * e["retention"]["ci"][1])
               for e in state["trajectory"] if e.get("retention")]
        s, v, lo, hi = zip(*pts, strict=True)
        ax2.plot(s, v, "s-", color="tab:green", label=f"retention ({state['retention_suite']})")
        ax2.fill_between(s, lo, hi, color="tab:green", alpha=0.2)
        ax2.axhline(0, color="black", lw=0.8)
        ax2.set_xticks(xs, labels, rotation=30, ha="right")
        ax2.set_ylabel("retention change, % (0 = base)")
        ax2.set_title("Base abilities after each step (paired 95% CI)")
        ax2.grid(alpha=0.3)
        ax2.legend(fontsize=8)
    return fig


def write_plots(state: dict[str, Any], out: Path) -> dict[str, str]:
    """matrix.png and trajectory.png beside continual.json (written atomically)."""
    import matplotlib.pyplot as plt

    paths = {}
    for name, make in (("matrix", matrix_plot), ("trajectory", trajectory_plot)):
        fig = make(state)
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
        plt.close(fig)
        target = out / f"{name}.png"
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.write_bytes(buf.getvalue())
        tmp.replace(target)
        paths[name] = str(target)
    return paths


def write_continual_report(path: str | Path, state: dict[str, Any] | None = None,
                           out: str | Path | None = None) -> Path:
    """report.html for a sequence directory (or `out`): metrics, heat-map, trajectories, per-step curves and tables."""
    import jinja2

    path = Path(path)
    state = state or json.loads((path / "continual.json").read_text())
    if not (path / "matrix.png").is_file():
        write_plots(state, path)
    img = {n: base64.b64encode((path / f"{n}.png").read_bytes()).decode() for n in ("matrix", "trajectory")}
    target = Path(out) if out else path / "report.html"
    dirs = [Path(e["dir"]) for e in state["steps"]]
    steps = [{**e, "curves": curves_plot(d, d.name), "has_report": (d / "report.html").is_file(),
              "report_rel": os.path.relpath(d / "report.html", target.resolve().parent)}
             for e, d in zip(state["steps"], dirs, strict=True)]
    env = jinja2.Environment(loader=jinja2.PackageLoader("forgetless", "templates"),
                             autoescape=jinja2.select_autoescape(["html", "j2"]), undefined=jinja2.StrictUndefined)
    env.filters["pct"] = lambda x: "-" if x is None else f"{100 * x:+.2f}%"
    env.filters["num"] = lambda x: "-" if x is None else f"{x:+.4f}"
    carry = state.get("carry") or []
    if isinstance(carry, dict):  # continual.json of 0.1: {name: options}
        carry = [{"name": k, **v} for k, v in carry.items()]
    carried = [(e["name"], {k: v for k, v in e.items() if k != "name"}) for e in carry]
    html = env.get_template("continual.html.j2").render(
        state=state, carried=carried, img=img, steps=steps, tables=retention_tables(dirs), metric_names=METRIC_NAMES)
    atomic_write_text(target, html)
    return target


METRIC_NAMES = {
    "average_accuracy": "average accuracy (mean score over all tasks after the last step)",
    "bwt": "backward transfer BWT (negative: earlier tasks forgotten)",
    "fwt": "forward transfer FWT (score before a task's own training minus the base model's)",
    "forgetting": "forgetting (best earlier score minus the last, averaged)",
}
