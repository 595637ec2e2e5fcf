"""What the reports read: a run's or a sweep's rows (sweep.json, or a lone run's evaluations), the per-task
retention tables, and the layer-wise drift of a run's weights from its base model (cached in drift.json)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from ..errors import ForgetlessError
from ..io import atomic_write_json
from ..results import RetentionChange, TaskGain, ability_names
from ..schema import load_yaml

LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")


def read_json(p: Path) -> Any:
    return json.loads(p.read_text()) if p.is_file() else None


def read_jsonl(p: Path) -> list[dict[str, Any]]:
    if not p.is_file():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def run_row(run_dir: Path) -> dict[str, Any] | None:
    """A sweep-style row for a lone run from its eval-task.json / eval-retention.json (None if not evaluated)."""
    ret = read_json(run_dir / "eval-retention.json")
    if not ret or not ret.get("comparison"):
        return None
    task = read_json(run_dir / "eval-task.json")
    summary = read_json(run_dir / "summary.json") or {}
    g = TaskGain.of(task["comparison"]).as_dict() if task and task.get("comparison") else None
    return {
        "run": summary.get("name", run_dir.name), "dir": str(run_dir), "method": summary.get("method", "?"),
        "task": g,
        "n_seeds": 1,
        "retention": RetentionChange.of(ret["comparison"]).as_dict(
            "score", "change", "ci", "abilities", "score_definition", "significant_drops"),
    }


def _run_dir(sweep_dir: Path, recorded: str) -> Path:
    """A sweep row's run directory: as recorded (relative to where the sweep ran, by default), else where the
    sweep keeps its runs (the report is run from elsewhere, or the sweep directory moved)."""
    p = Path(recorded)
    return p if (p / "summary.json").is_file() else sweep_dir / "runs" / p.name


def gather(path: Path) -> dict[str, Any]:
    path = Path(path)
    sweep = read_json(path / "sweep.json")
    if sweep is not None:
        rows = sweep["runs"]
        return {"title": f"sweep {sweep['name']}", "kind": "sweep", "sweep": sweep, "rows": rows,
                "runs": [_run_dir(path, d) for r in rows for d in r.get("dirs", [r["dir"]])],
                "budget": sweep.get("budget"),
                "recommended": sweep.get("recommended"), "decide_on": sweep.get("decide_on", "point"),
                "abilities": ability_names(rows)}
    if (path / "summary.json").is_file() or (path / "recipe.yaml").is_file():
        row = run_row(path)
        rec = load_yaml((path / "recipe.yaml").read_text()) if (path / "recipe.yaml").is_file() else {}
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
    summary = read_json(run_dir / "summary.json")
    if not summary or not (run_dir / "final").is_dir():
        return None
    base_path = summary["model"]["path"]
    # torch and the model loaders only here: reading a run's files needs neither
    import torch

    from ..retention.api import load_for_eval
    from ..train.model import load_model

    try:  # a local directory, or a hub id (from the Hugging Face cache the run filled, or the hub)
        base, _ = load_model(base_path)
    except (ForgetlessError, OSError, ValueError):  # the folder is gone; the hub id neither cached nor reachable
        return None
    tuned, _, _ = load_for_eval(str(run_dir))
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


# ---------------------------------------------------------------- tables


def retention_tables(run_dirs: list[Path], max_flips: int = 3) -> list[dict[str, Any]]:
    out = []
    for d in run_dirs:
        for kind in ("task", "retention"):
            rep = read_json(d / f"eval-{kind}.json")
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
