"""`forgetless report`: one self-contained report.html (plots inlined) for a run or a sweep directory.

Sections: the forgetting frontier (task gain against retention change, interval bars, the frontier line
and the budget line); training curves (loss, validation loss, monitor probe, guard events); the per-task
retention table with significance; a few flipped examples per task; and the layer-wise drift chart
(relative weight change per block, and the EWC penalty per block where the run estimated a Fisher).

A run directory needs its evaluations for the frontier and the retention table (`forgetless eval RUN
--out RUN/eval-retention.json`, and eval-task.json for the target task); `forgetless sweep` writes them.
"""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path
from typing import Any

from . import faults
from .errors import ForgetlessError
from .io import atomic_write_json, atomic_write_text

TEMPLATE = "templates/report.html.j2"
LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")


# ---------------------------------------------------------------- gathering


def _read_json(p: Path) -> Any:
    return json.loads(p.read_text()) if p.is_file() else None


def _read_jsonl(p: Path) -> list[dict[str, Any]]:
    if not p.is_file():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def run_row(run_dir: Path) -> dict[str, Any] | None:
    """A sweep-style row for a lone run from its eval-task.json / eval-retention.json (None if not evaluated)."""
    from .sweep import task_gain

    ret = _read_json(run_dir / "eval-retention.json")
    if not ret or not ret.get("comparison"):
        return None
    task = _read_json(run_dir / "eval-task.json")
    summary = _read_json(run_dir / "summary.json") or {}
    rc = ret["comparison"]
    g = task_gain(task["comparison"]) if task and task.get("comparison") else None
    return {
        "run": summary.get("name", run_dir.name), "dir": str(run_dir), "method": summary.get("method", "?"),
        "task": g,
        "n_seeds": 1,
        "retention": {"score": rc["retention_score"], "change": rc["retention_score"] - 1,
                      "ci": [rc["retention_ci"][0] - 1, rc["retention_ci"][1] - 1],
                      "abilities": rc.get("abilities") or {}, "score_definition": rc.get("score_definition", 1),
                      "significant_drops": rc["significant_drops"]},
    }


def gather(path: Path) -> dict[str, Any]:
    from .sweep import ability_names

    path = Path(path)
    sweep = _read_json(path / "sweep.json")
    if sweep is not None:
        rows = sweep["runs"]
        return {"title": f"sweep {sweep['name']}", "kind": "sweep", "sweep": sweep, "rows": rows,
                "runs": [Path(d) for r in rows for d in r.get("dirs", [r["dir"]])], "budget": sweep.get("budget"),
                "recommended": sweep.get("recommended"), "decide_on": sweep.get("decide_on", "point"),
                "abilities": ability_names(rows)}
    if (path / "summary.json").is_file() or (path / "recipe.yaml").is_file():
        row = run_row(path)
        import yaml

        rec = yaml.safe_load((path / "recipe.yaml").read_text()) if (path / "recipe.yaml").is_file() else {}
        budget = ((rec or {}).get("guard") or {}).get("budget")
        return {"title": f"run {path.name}", "kind": "run", "sweep": None, "rows": [row] if row else [],
                "runs": [path], "budget": budget, "recommended": None, "decide_on": "point",
                "abilities": ability_names([row] if row else [])}
    raise ForgetlessError(f"{path}: neither a run directory (summary.json) nor a sweep directory (sweep.json)")


# ---------------------------------------------------------------- drift


def layer_drift(run_dir: Path, force: bool = False) -> dict[str, Any] | None:
    """Relative weight change per block (||dW|| / ||W_base||) and, with an EWC Fisher, its penalty per block.
    Cached in <run>/drift.json. None when the base model is no longer available."""
    cache = run_dir / "drift.json"
    if cache.is_file() and not force:
        return json.loads(cache.read_text())
    summary = _read_json(run_dir / "summary.json")
    if not summary or not (run_dir / "final").is_dir():
        return None
    base_path = summary["model"]["path"]
    if not Path(base_path).is_dir():
        return None
    import torch

    from .retention.api import load_for_eval
    from .train.model import load_model

    tuned, _, _ = load_for_eval(str(run_dir))
    base, _ = load_model(base_path)
    base_sd = {k: v for k, v in base.state_dict().items()}
    fisher = {}
    ewc = run_dir / "ewc_state.safetensors"
    if ewc.is_file():
        from safetensors.torch import load_file

        fisher = {k[len("fisher."):]: v for k, v in load_file(str(ewc)).items() if k.startswith("fisher.")}
    blocks: dict[str, dict[str, float]] = {}
    for name, w in tuned.state_dict().items():
        b = base_sd.get(name)
        if b is None or b.shape != w.shape or not torch.is_floating_point(w):
            continue
        m = LAYER.search(name)
        block = f"layer {int(m.group(1)):02d}" if m else ("embeddings" if "emb" in name
                                                          else ("lm_head" if "lm_head" in name else "other"))
        d = (w.float() - b.float())
        acc = blocks.setdefault(block, {"diff2": 0.0, "base2": 0.0, "fisher_penalty": 0.0})
        acc["diff2"] += float(d.pow(2).sum())
        acc["base2"] += float(b.float().pow(2).sum())
        f = fisher.get(name, fisher.get(f"base_model.model.{name}"))
        if f is not None and f.shape == d.shape:
            acc["fisher_penalty"] += float((f.float() * d.pow(2)).sum())
    order = sorted(blocks, key=lambda k: (not k.startswith("embeddings"), not k.startswith("layer"), k))
    out = {
        "blocks": order,
        "relative_change": [(blocks[k]["diff2"] ** 0.5) / max(blocks[k]["base2"] ** 0.5, 1e-12) for k in order],
        "fisher_penalty": [blocks[k]["fisher_penalty"] for k in order] if fisher else None,
    }
    atomic_write_json(cache, out)
    return out


# ---------------------------------------------------------------- plots


def _png(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _plt() -> Any:
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
    plt = _plt()
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
    return _png(fig)


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
        best = None
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
    recs = _read_jsonl(run_dir / "metrics.jsonl")
    if not recs:
        return None
    plt = _plt()
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
    return _png(fig)


def drift_plot(drift: dict[str, Any], name: str) -> str:
    plt = _plt()
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
    return _png(fig)


# ---------------------------------------------------------------- tables


def retention_tables(run_dirs: list[Path], max_flips: int = 3) -> list[dict[str, Any]]:
    out = []
    for d in run_dirs:
        for kind in ("task", "retention"):
            rep = _read_json(d / f"eval-{kind}.json")
            if not rep or not rep.get("comparison"):
                continue
            rows, flips = [], []
            for name, t in rep["comparison"]["tasks"].items():
                rows.append({
                    "task": name, "metric": t["main"] + ("" if t["higher_is_better"] else " (lower is better)"),
                    "n": t["n"], "base": t["base"], "candidate": t["candidate"], "delta": t["delta"], "ci": t["ci"],
                    "verdict": "drop" if t["significant_drop"] else ("gain" if t["significant"] else "noise"),
                    "flipped": t["flipped"],
                })
                for ex in t.get("flipped_examples", [])[:max_flips]:
                    flips.append({"task": name, "where": ex.get("where", ex.get("id", "")),
                                  "text": str(next((ex[k] for k in ("context", "prompt", "text", "question")
                                                    if k in ex), ""))[-400:],
                                  "base": str(ex.get("base_prediction", "")), "now": str(ex.get("prediction", ""))})
            cmp = rep["comparison"]
            abilities = [{"ability": name, "tasks": ", ".join(a["tasks"]), "weight": a["weight"], "change": a["change"],
                          "ci": a["ci"],
                          "share": sum(cmp["tasks"].get(n, {}).get("variance_share") or 0.0 for n in a["tasks"])}
                         for name, a in (cmp.get("abilities") or {}).items()]
            out.append({"run": d.name, "suite": rep["suite"], "kind": kind, "rows": rows, "flips": flips,
                        "abilities": abilities, "score_definition": cmp.get("score_definition", 1),
                        "retention_score": cmp["retention_score"], "retention_ci": cmp["retention_ci"]})
    return out


# ---------------------------------------------------------------- report


def build_report(path: str | Path, drift: bool = True) -> str:
    """The report's HTML text."""
    import jinja2

    info = gather(Path(path))
    runs = []
    for d in info["runs"]:
        summary = _read_json(d / "summary.json") or {}
        dr = layer_drift(d) if drift else None
        runs.append({
            "name": d.name, "dir": str(d), "summary": summary,
            "curves": curves_plot(d, d.name),
            "drift": drift_plot(dr, d.name) if dr else None,
            "drift_note": None if dr else "base model not available to compare against",
            "guard_events": [r for r in _read_jsonl(d / "metrics.jsonl") if "guard" in r],
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
        from .continual import write_continual_report

        return write_continual_report(path, out=out)
    target = Path(out) if out else Path(path) / "report.html"
    html = build_report(path, drift=drift)
    faults.point("report")
    atomic_write_text(target, html)
    return target
