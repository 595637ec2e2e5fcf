"""How precise is the retention score? Scores a few tuned models against the base on a retention suite and
reports, per task, per ability and for the score: the paired 95% item half-width, each task's share of the
score's item variance, the seed-to-seed spread next to it, and the time of one scoring.

    python bench/retention_precision.py                                # med, full FT + LoRA + EWC, 2 seeds each
    python bench/retention_precision.py --recipes full-lr1e-4 --seeds 42,43,44
    python bench/retention_precision.py --analyse runs/bench-precision-med   # re-read a finished sweep, no training

It trains with the forgetting bench's data and recipes (bench/forgetting.py: MedMCQA chat data, quick-scale
steps and batch), as one forgetless sweep with `seeds:` (resumable: re-running skips finished runs), each run
scored on the retention suite (default: the built-in `general`, every item count as the suite defines it).
The evidence for issue 23's target: on a plain full-FT med run of smollm2-135m-instruct, the score's paired
95% half-width at most 0.4 points (100 x (score - 1)), one scoring at most 3 minutes on a 2-core CPU with
native bf16.

Writes bench/results/retention-precision-<scenario>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
DEFAULT_RECIPES = ("full-lr1e-4", "lora-r16", "full-ewc")
TARGET_HALF_WIDTH = 0.4  # points
TARGET_SECONDS = 180.0
PROBE_HALF_WIDTH = 0.6  # points: the monitor's probe must resolve a 1% budget
PROBE_SECONDS = 60.0


def cpu_info() -> dict[str, Any]:
    """The CPU's name and whether it computes bf16 natively (AVX512-BF16 or AMX), from /proc/cpuinfo."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and ":" in line:
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and ":" in line:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    native = sorted(flags & {"avx512_bf16", "amx_bf16"})
    return {"cpu": name, "cpus": os.cpu_count(), "native_bf16": bool(native), "bf16_flags": native,
            "avx2": "avx2" in flags, "avx512f": "avx512f" in flags}


def _half(ci: list[float] | tuple[float, float]) -> float:
    return (ci[1] - ci[0]) / 2


def _sd(xs: list[float]) -> float | None:
    return statistics.stdev(xs) if len(xs) > 1 else None


def analyse_sweep(sweep_dir: str | Path) -> dict[str, Any]:
    """Per recipe (a sweep row, possibly over seeds) and per seed run: the score, abilities and tasks with their
    item half-widths (points), variance shares, seed spreads and scoring times, from each run's eval-retention.json."""
    sweep_dir = Path(sweep_dir)
    state = json.loads((sweep_dir / "sweep.json").read_text())
    recipes = []
    for row in state["runs"]:
        dirs = [Path(d) for d in row.get("dirs", [row["dir"]])]
        seeds = []
        for d in dirs:
            rep = json.loads((d / "eval-retention.json").read_text())
            cmp = rep["comparison"]
            seconds = sum(t.get("seconds", 0.0) for t in rep["candidate"].values())
            seeds.append({
                "run": d.name, "seconds": round(seconds, 1),
                "task_seconds": {n: t.get("seconds") for n, t in rep["candidate"].items()},
                "score_definition": cmp.get("score_definition", 1),
                "score": {"change": 100 * (cmp["retention_score"] - 1), "half_width": 100 * _half(cmp["retention_ci"])},
                "abilities": {a: {"change": 100 * v["change"], "half_width": 100 * _half(v["ci"]), "tasks": v["tasks"]}
                              for a, v in (cmp.get("abilities") or {}).items()},
                "tasks": {n: {"ability": t.get("ability"), "n": t["n"], "main": t["main"],
                              "change": 100 * (t["retention"] - 1),
                              "half_width": 100 * (t.get("half_width") or float("nan")),
                              "variance_share": t.get("variance_share"), "seconds": rep["candidate"][n].get("seconds")}
                          for n, t in cmp["tasks"].items()},
            })
        first = seeds[0]
        out = {"recipe": row["run"], "n_seeds": len(seeds), "seeds": seeds,
               "score": {"change": 100 * row["retention"]["change"], "ci": [100 * x for x in row["retention"]["ci"]],
                         "item_half_width": statistics.mean(s["score"]["half_width"] for s in seeds),
                         "seed_sd": _sd([s["score"]["change"] for s in seeds])},
               "abilities": {}, "tasks": {}, "seconds": statistics.mean(s["seconds"] for s in seeds)}
        for a in first["abilities"]:
            vals = [s["abilities"][a] for s in seeds if a in s["abilities"]]
            out["abilities"][a] = {"change": statistics.mean(v["change"] for v in vals),
                                   "item_half_width": statistics.mean(v["half_width"] for v in vals),
                                   "seed_sd": _sd([v["change"] for v in vals]), "tasks": vals[0]["tasks"]}
        for n in first["tasks"]:
            vals = [s["tasks"][n] for s in seeds if n in s["tasks"]]
            shares = [v["variance_share"] for v in vals if v["variance_share"] is not None]
            out["tasks"][n] = {"ability": vals[0]["ability"], "n": vals[0]["n"], "main": vals[0]["main"],
                               "change": statistics.mean(v["change"] for v in vals),
                               "item_half_width": statistics.mean(v["half_width"] for v in vals),
                               "variance_share": statistics.mean(shares) if shares else None,
                               "seed_sd": _sd([v["change"] for v in vals]),
                               "seconds": statistics.mean(v["seconds"] or 0.0 for v in vals)}
        recipes.append(out)
    prec = state.get("eval_precision") or {}
    return {"sweep": str(sweep_dir), "retention_suite": state.get("retention_suite"), "recipes": recipes,
            "eval_precision": (f"{prec.get('dtype', '?')} ({prec.get('reason', 'not recorded')})" if prec
                               else "not recorded")}


def suite_counts(suite: str) -> dict[str, int | None]:
    """Items per task of a built-in suite (its `limit:`, or the prompts a self_reference task generates; None: the
    whole file)."""
    from forgetless.retention.suite import load_suite

    return {t.name: (getattr(t, "n_generated", None) if getattr(t, "prompts", None) == "generated" else t.limit)
            for t in load_suite(suite).tasks}


def project(seed_run: dict[str, Any], counts: dict[str, int | None]) -> dict[str, float]:
    """The score's item half-width and one scoring's time for the same tasks at other item counts (a projection,
    not a measurement). Tasks are independent item samples: the score's item variance is the sum of the tasks'
    contributions (their `variance_share` of it, from the same bootstrap), and a task's contribution scales as
    n / n' with its item count, so half-width' = half-width x sqrt(sum_t share_t x n_t / n'_t); its time scales
    as n' / n. A task not in `counts` (or None there) keeps its items."""
    factor, seconds = 0.0, 0.0
    for name, t in seed_run["tasks"].items():
        scale = t["n"] / ((counts or {}).get(name) or t["n"])
        factor += (t["variance_share"] or 0.0) * scale
        seconds += (t["seconds"] or 0.0) / scale
    return {"half_width": seed_run["score"]["half_width"] * math.sqrt(factor), "seconds": seconds}


def projections(result: dict[str, Any], probe_suite: str = "general-probe") -> dict[str, Any]:
    """Per seed run: the score's half-width and time projected to `probe_suite`'s item counts."""
    counts = suite_counts(probe_suite)
    rows = []
    for r in result["recipes"]:
        for s in r["seeds"]:
            probe = project(s, counts)
            rows.append({"run": s["run"], "measured_half_width": s["score"]["half_width"],
                         "measured_seconds": s["seconds"], "probe_half_width": probe["half_width"],
                         "probe_seconds": probe["seconds"]})
    return {"suite": probe_suite, "counts": counts, "runs": rows}


def probe_measured(paths: list[Path]) -> list[dict[str, Any]]:
    """The probe suite as measured: `forgetless eval --suite general-probe --out FILE` reports of tuned runs against
    their base (score change, paired item half-width, the candidate's scoring time, per-task shares)."""
    out = []
    for p in paths:
        rep = json.loads(Path(p).read_text())
        cmp = rep["comparison"]
        out.append({"report": str(p), "model": rep.get("model"), "suite": rep.get("suite"),
                    "precision": (rep.get("settings") or {}).get("precision"),
                    "change": 100 * (cmp["retention_score"] - 1), "half_width": 100 * _half(cmp["retention_ci"]),
                    "seconds": round(sum(t.get("seconds", 0.0) for t in rep["candidate"].values()), 1),
                    "tasks": {n: {"n": t["n"], "half_width": 100 * (t.get("half_width") or float("nan")),
                                  "variance_share": t.get("variance_share"),
                                  "seconds": rep["candidate"][n].get("seconds")} for n, t in cmp["tasks"].items()}})
    return out


def _f(x: float | None, fmt: str = "{:.2f}") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else fmt.format(x)


def markdown(result: dict[str, Any]) -> str:
    """The short table: score, abilities and tasks per recipe (item half-width, variance share, seed spread, time)."""
    from forgetless.provenance import machine_line

    m = result.get("machine", {})
    lines = [f"# retention precision: {result.get('scenario', '?')}, {result.get('model', '?')}", "",
             f"Machine: {m.get('cpu', '?')}, {m.get('cpus', '?')} CPUs, native bf16: {m.get('native_bf16', '?')}; "
             f"evaluation compute: {result.get('eval_precision', '?')}. Retention suite: "
             f"{result.get('retention_suite')}. Points = 100 x (score - 1). Item half-width: the paired 95% bootstrap "
             "interval's half-width over items (one seed's scoring). Seed sd: the standard deviation of the change "
             "across training seeds. Share: the task's share of the score's item variance.", "",
             *([f"Provenance: {machine_line(result['provenance'])}.", ""] if result.get("provenance") else [])]
    worst = []
    for r in result["recipes"]:
        sc = r["score"]
        worst.append(sc["item_half_width"])
        lines += [f"## {r['recipe']} ({r['n_seeds']} seed{'s' if r['n_seeds'] > 1 else ''}, one scoring "
                  f"{r['seconds']:.0f} s)", "",
                  f"Score: {sc['change']:+.2f} points, 95% CI [{sc['ci'][0]:+.2f}, {sc['ci'][1]:+.2f}] (items and "
                  f"seeds); item half-width {sc['item_half_width']:.2f} points (target <= {TARGET_HALF_WIDTH}); seed "
                  f"sd {_f(sc['seed_sd'])}.", "",
                  "| ability / task | n | main | change (points) | item half-width | share of score variance | seed sd "
                  "| seconds |",
                  "|---|---|---|---|---|---|---|---|"]
        for a, v in r["abilities"].items():
            lines.append(
                f"| **{a}** | | | {v['change']:+.2f} | {v['item_half_width']:.2f} | "
                f"{_f(sum(r['tasks'][t]['variance_share'] or 0 for t in v['tasks'] if t in r['tasks']), '{:.0%}')} | "
                f"{_f(v['seed_sd'])} | |")
            for t in v["tasks"]:
                x = r["tasks"].get(t)
                if x:
                    lines.append(f"| {t} | {x['n']} | {x['main']} | {x['change']:+.2f} | {x['item_half_width']:.2f} | "
                                 f"{_f(x['variance_share'], '{:.0%}')} | {_f(x['seed_sd'])} | "
                                 f"{_f(x['seconds'], '{:.0f}')} |")
        lines.append("")
    proj = result.get("probe_projection")
    if proj and proj["runs"]:
        lines += [f"## Projected for the monitor's probe ({proj['suite']}, not measured)", "",
                  "The score's measured item half-width scaled by sqrt(sum over tasks of share x n / n_probe), "
                  "each task's time by n_probe / n (the candidate's scoring only: the probe's reference is scored "
                  "once per run). Probe counts: " + ", ".join(f"{k} {v}" for k, v in proj["counts"].items()) + ".",
                  "", "| run | measured half-width | measured seconds | probe half-width (projected) | probe seconds "
                  "(projected) |", "|---|---|---|---|---|"]
        for x in proj["runs"]:
            lines.append(f"| {x['run']} | {x['measured_half_width']:.2f} | {x['measured_seconds']:.0f} | "
                         f"{x['probe_half_width']:.2f} | {x['probe_seconds']:.0f} |")
        lines.append("")
    native = bool(m.get("native_bf16")) and "bf16" in str(result.get("eval_precision", ""))

    def timed(seconds: float, target: float) -> str:
        """The time against its target, judged only where it was measured as the target states (native bf16)."""
        if native:
            return f"target <= {target:.0f} s on a native-bf16 2-core CPU: {'MET' if seconds <= target else 'NOT MET'}"
        return f"target <= {target:.0f} s on a native-bf16 2-core CPU; this one is not, so not judged here"

    for x in result.get("probe_measured") or []:
        ok = x["half_width"] <= PROBE_HALF_WIDTH
        lines += [f"Probe measured ({x['suite']}, {x['model']}, {x['precision']}): {x['change']:+.2f} points, item "
                  f"half-width {x['half_width']:.2f} (target <= {PROBE_HALF_WIDTH}: {'MET' if ok else 'NOT MET'}), "
                  f"one scoring {x['seconds']:.0f} s ({timed(x['seconds'], PROBE_SECONDS)}). Shares: "
                  + ", ".join(f"{n} {t['variance_share']:.0%}" for n, t in x["tasks"].items()
                              if t["variance_share"] is not None) + ".", ""]
    if worst:
        ok = max(worst) <= TARGET_HALF_WIDTH
        lines.append(f"Largest item half-width of the score: {max(worst):.2f} points: target (<= {TARGET_HALF_WIDTH}) "
                     f"{'MET' if ok else 'NOT MET'}. Slowest scoring: "
                     f"{max(r['seconds'] for r in result['recipes']):.0f} s "
                     f"({timed(max(r['seconds'] for r in result['recipes']), TARGET_SECONDS)}).")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenario", choices=["med", "math"], default="med")
    ap.add_argument("--recipes", default=",".join(DEFAULT_RECIPES), help="comma-separated names from bench/recipes/")
    ap.add_argument("--seeds", default="42,43", help="training seeds, comma-separated")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--suite", default="general", help="retention suite (built-in name or YAML file)")
    ap.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--steps", type=int, default=None, help="override the quick scale's steps (smoke tests)")
    ap.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                    help="evaluation compute (the sweep's eval_precision; auto: bf16 where it is faster on this "
                         "machine)")
    ap.add_argument("--out", type=Path, default=None, help="sweep directory (default: runs/bench-precision-<scenario>)")
    ap.add_argument("--analyse", type=Path, default=None, help="only analyse this finished sweep directory")
    ap.add_argument("--results", type=Path, default=RESULTS, help="where the JSON and markdown go")
    ap.add_argument("--probe-eval", type=Path, nargs="*", default=[],
                    help="forgetless eval --suite general-probe --out reports of tuned runs: the probe as measured")
    ap.add_argument("--render", type=Path, default=None,
                    help="only re-render the markdown of this saved JSON result (beside it) and exit")
    args = ap.parse_args()
    if args.render:
        from _saved_result import rerender

        rerender(args.render, markdown)
        return
    os.chdir(ROOT)
    sys.path.insert(0, str(ROOT / "bench"))
    import forgetting as fb

    from forgetless import provenance

    if args.analyse is None:
        from forgetless.models import resolve_model
        from forgetless.sweep import SweepConfig, Variant, run_sweep

        scale = fb.scale_for("quick", args.scenario)
        if args.steps:
            scale["steps"] = args.steps
        files = (fb.prepare_med if args.scenario == "med" else fb.prepare_math)(args.data_root, scale["n_test"],
                                                                                scale["n_val"])
        tsuite = fb.task_suite(args.scenario, files, scale["n_exact"])
        recipes = fb.load_recipes(args.recipes.split(","))
        base = json.loads(json.dumps(next(iter(recipes.values()))))
        base["model"] = args.model
        common = {"data.train": str(files["train"]), "data.validation": str(files["val"]),
                  "data.max_length": scale["max_length"],
                  "optim.max_steps": scale["steps"], "optim.batch_size": scale["batch"], "train.device": args.device,
                  "train.save_steps": None, "train.progress": True}
        runs = []
        for name, r in recipes.items():
            runs.append(Variant(name=name, set={**fb.recipe_set(r), **common}))
        out = args.out or ROOT / "runs" / f"bench-precision-{args.scenario}"
        spec = {"name": f"precision-{args.scenario}", "base": base, "runs": runs, "task_suite": str(tsuite),
                "retention_suite": args.suite, "seeds": [int(s) for s in args.seeds.split(",")], "budget": 0.01,
                "output_dir": str(out), "data_root": str(args.data_root), "eval_precision": args.precision}
        cfg = SweepConfig.model_validate(spec)
        prec = fb.bench_precision(resolve_model(args.model).path, args.device)
        prov = provenance.collect(prec, device=prec["device"])
        # saved beside the sweep directory; a resumed sweep must be on the same CPU and precision path
        start = fb.resume_guard(out.with_name(out.name + ".provenance.json"), prov, f"sweep {out}",
                                resuming=(out / "sweep.json").is_file())
        run_sweep(cfg, folder=ROOT, report=False)
        sweep_dir = out
    else:
        sweep_dir = args.analyse
        saved = sweep_dir.with_name(sweep_dir.name + ".provenance.json")
        prov = json.loads(saved.read_text()) if saved.is_file() else provenance.collect("not recorded")
        start = None
    result = {"bench": "retention_precision", "scenario": args.scenario, "model": args.model, "machine": cpu_info(),
              "platform": platform.platform(), "provenance": provenance.finish(prov),
              "resumed_from": fb.started(start), **analyse_sweep(sweep_dir)}
    result["probe_projection"] = projections(result)
    result["probe_measured"] = probe_measured(args.probe_eval)
    args.results.mkdir(parents=True, exist_ok=True)
    stem = args.results / f"retention-precision-{args.scenario}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    md = markdown(result)
    stem.with_suffix(".md").write_text(md)
    print(md)


if __name__ == "__main__":
    sys.exit(main())
